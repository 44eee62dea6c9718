"""``jaxrlhf demo``: the whole RLHF pipeline, from nothing, on a task with a known gold reward.

1. build the task; train a tiny GPT from scratch on the behaviour policy's demonstrations (``train_sft``)
2. sample response pairs from the SFT policy; label them with the simulated annotator
3. train the proxy reward model on the labels (``train_reward_model``), refit its normalisation on fresh
   samples of the SFT policy; train the reward-model ensemble (one vmapped computation) if a method needs it
4. train every method of the comparison (:data:`~jaxrlhf.experiments.demo_methods.METHODS`, those in
   ``methods``) with each of ``run.seeds`` seeds, from the same SFT policy, on the same feedback
5. evaluate SFT, best-of-n and every run along training on held-out prompts (gold, proxy, KL, optimal),
   the same prompts and sampling keys for every policy
6. statistics (:mod:`~jaxrlhf.experiments.demo_analysis`), ``report.md``, plots and ``results.json``

Prompts: the SFT demonstrations, the feedback, the RL prompts and the evaluation come from disjoint splits of
the task's prompt space (``Task.sample_prompts(split=...)``); the report prints the counts and overlaps.

Every stage writes its data as JSONL in ``<run>/data`` and runs the ordinary trainer on it in its own
sub-directory (config, metrics JSONL, TensorBoard, checkpoints, Hugging Face export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxrlhf.config import to_dict
from jaxrlhf.data import write_jsonl
from jaxrlhf.experiments.curves import CurvePoint
from jaxrlhf.experiments.demo_analysis import analyse
from jaxrlhf.experiments.demo_config import DemoConfig
from jaxrlhf.experiments.demo_methods import METHODS, DemoContext, Method, gold_reward_spec
from jaxrlhf.experiments.demo_stages import (
    FEEDBACK_FILES,
    DemoPaths,
    build_task,
    feedback_pool,
    generation_config,
    lengths,
    prompt_arrays,
    relative,
    reward_config,
    sft_config,
    split_feedback,
    write_stage_config,
)
from jaxrlhf.experiments.plots import plot_reward_vs_sqrt_kl
from jaxrlhf.experiments.policy_evaluation import EvaluationResults, evaluate_policies
from jaxrlhf.experiments.policy_scoring import sample_rollouts
from jaxrlhf.experiments.report import render_report, render_summary
from jaxrlhf.experiments.rm_ensemble import normalize_members, train_ensemble
from jaxrlhf.oracle import annotate_pool, coverage_report, register_reward
from jaxrlhf.oracle.tasks.splits import prompt_overlap_report
from jaxrlhf.rl import fit_reward_normalization
from jaxrlhf.steps.reward_model import make_reward_scorer
from jaxrlhf.train.data_setup import load_dataset, make_collate
from jaxrlhf.train.metrics import setup_logging
from jaxrlhf.train.model_setup import NORMALIZATION_FILE, load_model, load_reward_model
from jaxrlhf.train.reward import train_reward_model
from jaxrlhf.train.run_config import ModelSection, RewardSection
from jaxrlhf.train.sft import train_sft

log = logging.getLogger("jaxrlhf")
STAGES = 6
NORMALIZATION_SAMPLES = 512  # fresh SFT samples the reward normalisation is fitted on


@dataclasses.dataclass
class DemoResult:
    """What ``jaxrlhf demo`` leaves: the run directory, the report, the results dict and the summary."""

    run_dir: str
    report: str
    results: dict[str, Any]
    summary: str


class StageClock:
    """Announces each stage on stderr and records its wall time."""

    def __init__(self, level: str) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()
        self.level = level

    @contextlib.contextmanager
    def __call__(self, index: int, name: str, title: str, run_dir: Path) -> Iterator[None]:
        print(f"[demo {index}/{STAGES}] {title}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        # A trainer points the log file at its own sub-directory; take it back.
        setup_logging(self.level, run_dir)

    def total(self) -> float:
        return time.perf_counter() - self.start


def default_run_dir() -> str:
    return time.strftime("runs/demo-%Y%m%d-%H%M%S")


def demo(cfg: DemoConfig) -> DemoResult:
    """Run every stage of the demo (see the module docstring); prints the summary and returns it."""
    quick = cfg.run.quick
    task, oracle = build_task(cfg.task)  # a bad task or oracle fails here, before the run directory exists
    paths = DemoPaths(Path(cfg.run.dir or default_run_dir()).absolute())
    paths.make()
    setup_logging(cfg.run.log_level, paths.root)
    preset = " (the --quick preset is folded in)" if quick else " (the --full preset is folded in)" \
        if cfg.run.full else ""
    (paths.root / "config.yaml").write_text(
        f"# jaxrlhf demo --config {paths.root / 'config.yaml'} reruns this demo{preset}\n"
        + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    clock, seed = StageClock(cfg.run.log_level), cfg.run.seed
    files: dict[str, str] = {}
    configs: dict[str, str] = {}
    methods = [METHODS[m] for m in cfg.methods]
    prompt_lists: dict[str, list[str]] = {}

    with clock(1, "sft", "task and demonstrations; SFT of a tiny GPT from scratch", paths.root):
        task.save_tokenizer(paths.tokenizer)
        demos = task.demonstrations(np.random.default_rng([seed, 0]), cfg.sft.demonstrations, split="sft")
        held_demos = task.demonstrations(np.random.default_rng([seed, 1]), cfg.sft.eval_demonstrations,
                                         split="sft")
        prompt_lists["SFT"] = [d["prompt"] for d in demos + held_demos]
        files["demonstrations"] = _write(paths, "demonstrations.jsonl", demos)
        files["held-out demonstrations"] = _write(paths, "demonstrations_eval.jsonl", held_demos)
        sft_cfg = sft_config(cfg, task, paths, files["demonstrations"], files["held-out demonstrations"])
        configs["sft"] = write_stage_config(paths, "sft", sft_cfg)
        sft_result = train_sft(sft_cfg)

    with clock(2, "feedback", "sampling SFT responses and labelling them with the simulated annotator",
               paths.root):
        sft = load_model(ModelSection(path=str(paths.export("sft"))), jax.random.key(seed), "SFT export")
        prompts, responses, gold, dropped = feedback_pool(sft.model, sft.params, sft.tokenizer, task, oracle,
                                                          cfg, jax.random.key(seed + 1))
        prompt_lists["feedback"] = prompts
        records = annotate_pool(jax.random.key(seed + 2), prompts, responses, gold, cfg.feedback.annotator)
        train_records, eval_records = split_feedback(records, cfg.feedback.eval_fraction, seed)
        stem = FEEDBACK_FILES[cfg.feedback.annotator.kind]
        files["feedback"] = _write(paths, f"{stem}.jsonl", train_records)
        files["held-out feedback"] = _write(paths, f"{stem}_eval.jsonl", eval_records)
        feedback = {"kind": cfg.feedback.annotator.kind, "train_records": len(train_records),
                    "eval_records": len(eval_records), "dropped_unfinished": dropped,
                    "coverage": coverage_report(train_records)}

    ctx = DemoContext(cfg, task, oracle, paths, files)
    with clock(3, "reward", "training the proxy reward model (and the ensemble); normalising on fresh SFT "
               "samples", paths.root):
        reward_cfg = reward_config(cfg, task, paths, files["feedback"], files["held-out feedback"])
        configs["reward"] = write_stage_config(paths, "reward", reward_cfg)
        reward_result = train_reward_model(reward_cfg)
        rl_prompts = task.sample_prompts(np.random.default_rng([seed, 4]), cfg.ppo.prompts, split="rl")
        prompt_lists["RL"] = rl_prompts
        files["RL prompts"] = _write(paths, "prompts.jsonl", [{"prompt": p} for p in rl_prompts])
        fresh = fresh_samples(sft, task, cfg, rl_prompts, jax.random.key(seed + 3))
        normalization = renormalize_reward_model(paths.export("reward"), fresh)
        ctx.rewards["proxy"] = RewardSection(model_path=str(paths.export("reward")))
        ctx.rewards["gold"] = RewardSection(function=gold_reward_spec(cfg))
        ensemble_info = None
        if any(m.ensemble for m in methods):
            ensemble_info = build_ensemble(ctx, sft, reward_cfg, fresh)

    with clock(4, "rl", f"training {', '.join(m.name for m in methods)} "
               f"({cfg.run.seeds} seed{'s' if cfg.run.seeds > 1 else ''} each)", paths.root):
        for method in methods:
            for s in range(cfg.run.seeds):
                run_cfg = method.build(ctx, method.stage(s), seed + s)
                if s == 0 and method.command is not None:
                    configs[method.key] = write_stage_config(paths, method.key, run_cfg)
                method.train(run_cfg)

    with clock(5, "evaluation", "evaluating SFT, best-of-n and every method on held-out prompts", paths.root):
        evaluation = evaluate_policies(ctx)
        prompt_lists["evaluation"] = evaluation.prompts
        prompt_lists["best-of-n evaluation"] = evaluation.best_of_n_prompts

    with clock(6, "report", "statistics, fits, report and plots", paths.root):
        analysis = analyse(evaluation, methods)
        results = _results(cfg, quick, task, oracle, paths, files, configs, feedback, evaluation,
                           sft_result.metrics, reward_result.metrics, clock, methods, analysis)
        results["normalization"] = normalization
        results["ensemble"] = ensemble_info
        results["prompt_overlap"] = overlap_dict(prompt_lists, getattr(task, "disjoint_splits", False))
        results["plots"] = _plots(paths, analysis, task, methods)
        report = render_report(results)
        (paths.root / "report.md").write_text(report)
    results["timings"]["report"] = clock.seconds["report"]
    results["timings"]["total"] = clock.total()
    (paths.root / "results.json").write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    (paths.root / "report.md").write_text(render_report(results))  # with the final timings
    summary = render_summary(results)
    print(summary, flush=True)
    return DemoResult(str(paths.root), str(paths.root / "report.md"), results, summary)


def fresh_samples(sft: Any, task: Any, cfg: DemoConfig, prompts: list[str],
                  key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """One fresh sample of the SFT policy per prompt (at most :data:`NORMALIZATION_SAMPLES`): the full
    [R, S] sequences and masks the reward normalisation is fitted on (Ziegler et al. 2019)."""
    p_len, n_len = lengths(task, cfg.task.add_bos)
    tokens, mask = prompt_arrays(prompts[:NORMALIZATION_SAMPLES], sft.tokenizer, p_len, cfg.task.add_bos)
    gen = generation_config(sft.tokenizer, n_len, cfg.evaluation.temperature)
    seqs, masks = [], []
    for rows, rollout in sample_rollouts(sft.model, sft.params, tokens, mask, key, gen,
                                         cfg.evaluation.chunk_size):
        seqs.append(np.asarray(rollout.sequences)[rows])
        masks.append(np.asarray(rollout.sequence_mask)[rows])
    return np.concatenate(seqs), np.concatenate(masks)


def renormalize_reward_model(export: Path, fresh: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Refit the reward model's (gain, bias) on fresh SFT samples and rewrite its
    ``reward_normalization.json``; returns both fits (the trainer's, on the dataset's responses, and this
    one) and the raw rewards' mean and std on the fresh samples."""
    rm, before = load_reward_model(str(export))
    score = jax.jit(make_reward_scorer(rm.model))
    tokens, mask = fresh
    raw = np.concatenate([np.asarray(score(rm.params, jnp.asarray(tokens[i:i + 256]),
                                           jnp.asarray(mask[i:i + 256])))
                          for i in range(0, tokens.shape[0], 256)])
    norm = fit_reward_normalization(jnp.asarray(raw))
    (export / NORMALIZATION_FILE).write_text(
        json.dumps({"gain": float(norm.gain), "bias": float(norm.bias)}, indent=2) + "\n")
    out = {"samples": int(raw.size), "raw_mean": float(raw.mean()), "raw_std": float(raw.std()),
           "gain": float(norm.gain), "bias": float(norm.bias)}
    if before is not None:
        out["dataset_gain"], out["dataset_bias"] = float(before.gain), float(before.bias)
        shifted = float(before.gain) * raw + float(before.bias)
        out["dataset_fit_on_fresh_mean"], out["dataset_fit_on_fresh_std"] = float(shifted.mean()), \
            float(shifted.std())
    return out


def build_ensemble(ctx: DemoContext, sft: Any, reward_cfg: Any, fresh: tuple[np.ndarray, np.ndarray]) -> dict:
    """Train the reward-model ensemble (one vmapped computation), normalise each member on the fresh SFT
    samples, and register its WCO / UWO rewards for the RL trainers (``ctx.rewards["wco"|"uwo"]``)."""
    cfg = ctx.cfg
    data = reward_cfg.data
    examples = load_dataset(data.train_file, "preference", sft.tokenizer, data)
    held_out = load_dataset(data.eval_file, "preference", sft.tokenizer, data)
    collate = make_collate("preference", data, sft.tokenizer)
    ens = train_ensemble(sft.model, sft.params, examples, held_out, collate, cfg.ensemble.members,
                         cfg.reward.steps, cfg.reward.batch_size, cfg.reward.optimizer,
                         reward_cfg.reward_model, cfg.ensemble.bootstrap, cfg.run.seed)
    ens = normalize_members(ens, *fresh)
    for combination in ("wco", "uwo"):
        name = f"demo_rm_ensemble_{combination}"
        register_reward(name, ens.reward_function(combination, cfg.ensemble.uwo_lambda), jittable=True,
                        overwrite=True)
        ctx.rewards[combination] = RewardSection(function=name)
    return {"members": ens.members, "bootstrap": cfg.ensemble.bootstrap,
            "uwo_lambda": cfg.ensemble.uwo_lambda,
            "eval_accuracy": ens.eval_accuracy, "gain": ens.gain.tolist(), "bias": ens.bias.tolist(),
            "seconds": ens.seconds, "steps": cfg.reward.steps}


def overlap_dict(lists: dict[str, list[str]], disjoint: bool) -> dict[str, Any]:
    """Counts of each prompt list and the overlap of each evaluation list with each training list."""
    report = prompt_overlap_report(lists)
    evaluation = ("evaluation", "best-of-n evaluation")
    pairs = {f"{a} / {b}": report.overlap(a, b) for a in evaluation if a in lists
             for b in lists if b not in evaluation}
    return {"counts": report.counts, "distinct": report.distinct, "overlaps": pairs,
            "max_overlap": max(pairs.values(), default=0), "disjoint_splits": disjoint}


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null: results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write(paths: DemoPaths, name: str, records: list[dict]) -> str:
    path = paths.data / name
    write_jsonl(path, records)
    return str(path)


def _plots(paths: DemoPaths, analysis: dict, task: Any, methods: list[Method]) -> dict[str, str]:
    curves = {m.name: [CurvePoint(**p) for p in analysis["methods"][m.key]["curve"]] for m in methods}
    curves["best-of-n"] = [CurvePoint(**{k: v for k, v in p.items() if k != "kl_bound"})
                           for p in analysis["best_of_n"]["points"]]
    fits = {m.name: analysis["methods"][m.key]["gao"] for m in methods}
    fits["best-of-n"] = analysis["best_of_n"]["gao"]
    out = {}
    for metric in ("gold", "proxy"):
        path = plot_reward_vs_sqrt_kl(
            curves, metric, paths.plots / f"{metric}_vs_sqrt_kl.png",
            optimum=task.optimal_score if metric == "gold" else None,
            fits=fits if metric == "gold" else None)
        out[metric] = relative(path, paths.root)
    return out


def _results(cfg: DemoConfig, quick: bool, task: Any, oracle: Any, paths: DemoPaths, files: dict[str, str],
             configs: dict[str, str], feedback: dict, evaluation: EvaluationResults,
             sft_metrics: dict[str, float], reward_metrics: dict[str, float],
             clock: StageClock, methods: list[Method], analysis: dict) -> dict[str, Any]:
    root = paths.root
    ev = cfg.evaluation

    def rl_line(key: str, section: Any, extra: str = "") -> str:
        algo = section.algorithm
        return (f"{section.iterations} iterations × {section.batch_size} prompts{extra}, lr "
                f"{section.optimizer.learning_rate:g}, β={algo.kl_coef:g}")

    settings = [
        ["task", f"{cfg.task.name} (seed {cfg.task.seed}, options {dict(cfg.task.options)})"],
        ["model", f"{cfg.model.family}, d={cfg.model.hidden_size}, {cfg.model.num_layers} layers, "
                  f"{cfg.model.num_heads} heads, from scratch"],
        ["SFT", f"{cfg.sft.demonstrations} demonstrations, {cfg.sft.steps} steps × {cfg.sft.batch_size}, "
                f"lr {cfg.sft.optimizer.learning_rate:g}"],
        ["feedback", f"{cfg.feedback.prompts} prompts × {cfg.feedback.responses_per_prompt} SFT samples, "
                     f"{cfg.feedback.annotator.kind} annotator τ={cfg.feedback.annotator.temperature:g}, "
                     f"flip ε={cfg.feedback.annotator.flip_prob:g}"],
        ["reward model", f"{cfg.reward.steps} steps × {cfg.reward.batch_size}, "
                         f"lr {cfg.reward.optimizer.learning_rate:g}; normalised on "
                         f"{min(cfg.ppo.prompts, NORMALIZATION_SAMPLES)} fresh SFT samples"],
        ["PPO", rl_line("ppo", cfg.ppo, f", {cfg.ppo.algorithm.epochs} epochs")],
        ["A2C", rl_line("a2c", cfg.a2c)],
        ["GRPO", rl_line("grpo", cfg.grpo, f" × {cfg.grpo.algorithm.group_size} samples")],
        ["RLOO", rl_line("rloo", cfg.rloo, f" × {cfg.rloo.algorithm.group_size} samples")],
        ["DPO", f"{cfg.dpo.steps} steps × {cfg.dpo.batch_size} pairs, "
                f"lr {cfg.dpo.optimizer.learning_rate:g}, "
                f"β={cfg.dpo.algorithm.beta:g}, {cfg.dpo.algorithm.loss} loss"],
        ["value-guided decoding",
         f"ILQL on {cfg.vgd.samples_per_prompt} SFT samples × {cfg.ppo.prompts} RL prompts scored by the "
         f"reward model, {cfg.vgd.steps} steps × {cfg.vgd.batch_size} rows, lr {cfg.vgd.learning_rate:g}, "
         f"frozen backbone; β ∈ {list(cfg.vgd.betas)}"],
        ["RM ensemble", f"{cfg.ensemble.members} members (one vmapped computation), bootstrap "
                        f"{cfg.ensemble.bootstrap}, UWO λ={cfg.ensemble.uwo_lambda:g}"],
        ["methods", ", ".join(m.name for m in methods)],
        ["seeds", f"{cfg.run.seeds} per method (run.seed {cfg.run.seed} + 0…{cfg.run.seeds - 1}); SFT, "
                  "feedback "
                  "and reward model shared"],
        ["evaluation", f"{ev.prompts} held-out prompts × {ev.samples_per_prompt} samples per policy; "
                       f"best-of-n from {ev.best_of_n_samples} samples × {ev.best_of_n_prompts} prompts; "
                       f"{ev.rl_points} checkpoints per run"],
        ["seed", str(cfg.run.seed)], ["JAX devices", f"{jax.device_count()} × {jax.devices()[0].platform}"],
    ]
    exports = {"SFT": relative(paths.export("sft"), root),
               "reward model": relative(paths.export("reward"), root)}
    exports.update({m.name: relative(paths.export(m.key), root) for m in methods if m.exports})
    logs = {"demo evaluation metrics (JSONL, TensorBoard)": "metrics.jsonl"}
    logs.update({f"{s} trainer metrics, TensorBoard events, checkpoints": s
                 for s in ("sft", "reward", *(m.key for m in methods if m.exports))})
    logs.update({f"{m.key} ILQL step metrics (JSONL)": f"{m.key}/ilql_metrics.jsonl"
                 for m in methods if not m.exports})
    return {
        "run_dir": str(root), "quick": quick, "full": cfg.run.full,
        "task": {"name": cfg.task.name, "description": task.describe(),
                 "oracle": cfg.task.oracle or f"the task's own ({getattr(oracle, 'name', 'oracle')})",
                 "own_oracle": cfg.task.oracle is None},
        "settings": settings, "timings": dict(clock.seconds),
        "data": {"files": {k: relative(v, root) for k, v in files.items()}, "feedback": feedback},
        "sft": {"eval_loss": sft_metrics.get("eval/loss", math.nan),
                "eval_token_accuracy": sft_metrics.get("eval/token_accuracy", math.nan)},
        "reward_model": {"eval_accuracy": reward_metrics.get("eval/accuracy", math.nan),
                         "eval_records": feedback["eval_records"],
                         "agreement": evaluation.agreement, "agreement_pairs": evaluation.agreement_pairs},
        "analysis": analysis,
        "methods": [m.key for m in methods],
        "exports": exports, "logs": logs,
        "configs": {k: relative(v, root) for k, v in configs.items()},
        "commands": {"sft": "sft", "reward": "reward", **{m.key: m.command for m in methods if m.command}},
    }

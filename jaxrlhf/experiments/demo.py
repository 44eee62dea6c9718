"""``jaxrlhf demo``: the whole RLHF pipeline, from nothing, on a task with a known gold reward.

1. build the task; train a tiny GPT from scratch on the behaviour policy's demonstrations (``train_sft``)
2. sample response pairs from the SFT policy; label them with the simulated annotator
3. train the proxy reward model on the labels (``train_reward_model``)
4. fine-tune the SFT policy against the proxy with PPO and with A2C, KL-tied to it (``train_rl``)
5. evaluate SFT, best-of-n, and PPO / A2C along training on held-out prompts (gold, proxy, KL, optimal)
6. write ``report.md`` with the comparison table, the plots and ``results.json``

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
import numpy as np
import yaml

from jaxrlhf.config import to_dict
from jaxrlhf.data import write_jsonl
from jaxrlhf.experiments.curves import OVEROPTIMIZATION_RULE, intervals_separated
from jaxrlhf.experiments.demo_config import DemoConfig
from jaxrlhf.experiments.demo_stages import (
    FEEDBACK_FILES,
    DemoPaths,
    build_task,
    feedback_pool,
    relative,
    reward_config,
    rl_config,
    sft_config,
    split_feedback,
    write_stage_config,
)
from jaxrlhf.experiments.plots import plot_reward_vs_sqrt_kl
from jaxrlhf.experiments.policy_evaluation import EvaluationResults, evaluate_policies
from jaxrlhf.experiments.report import render_report, render_summary
from jaxrlhf.oracle import annotate_pool, coverage_report
from jaxrlhf.train.metrics import setup_logging
from jaxrlhf.train.model_setup import load_model
from jaxrlhf.train.reward import train_reward_model
from jaxrlhf.train.rl import train_rl
from jaxrlhf.train.run_config import ModelSection
from jaxrlhf.train.sft import train_sft

log = logging.getLogger("jaxrlhf")
STAGES = 6


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
    paths = DemoPaths(Path(cfg.run.dir or default_run_dir()).absolute())
    paths.make()
    setup_logging(cfg.run.log_level, paths.root)
    (paths.root / "config.yaml").write_text(
        f"# jaxrlhf demo --config {paths.root / 'config.yaml'} reruns this demo"
        f"{' (the --quick preset is folded in)' if quick else ''}\n"
        + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    clock, seed = StageClock(cfg.run.log_level), cfg.run.seed
    files: dict[str, str] = {}
    configs: dict[str, str] = {}

    with clock(1, "sft", "task and demonstrations; SFT of a tiny GPT from scratch", paths.root):
        task, oracle = build_task(cfg.task)
        task.save_tokenizer(paths.tokenizer)
        files["demonstrations"] = _write(paths, "demonstrations.jsonl", task.demonstrations(
            np.random.default_rng([seed, 0]), cfg.sft.demonstrations))
        files["held-out demonstrations"] = _write(paths, "demonstrations_eval.jsonl", task.demonstrations(
            np.random.default_rng([seed, 1]), cfg.sft.eval_demonstrations))
        sft_cfg = sft_config(cfg, task, paths, files["demonstrations"], files["held-out demonstrations"])
        configs["sft"] = write_stage_config(paths, "sft", sft_cfg)
        sft_result = train_sft(sft_cfg)

    with clock(2, "feedback", "sampling SFT responses and labelling them with the simulated annotator",
               paths.root):
        sft = load_model(ModelSection(path=str(paths.export("sft"))), jax.random.key(seed), "SFT export")
        prompts, responses, gold, dropped = feedback_pool(sft.model, sft.params, sft.tokenizer, task, oracle,
                                                          cfg, jax.random.key(seed + 1))
        records = annotate_pool(jax.random.key(seed + 2), prompts, responses, gold, cfg.feedback.annotator)
        train_records, eval_records = split_feedback(records, cfg.feedback.eval_fraction, seed)
        stem = FEEDBACK_FILES[cfg.feedback.annotator.kind]
        files["feedback"] = _write(paths, f"{stem}.jsonl", train_records)
        files["held-out feedback"] = _write(paths, f"{stem}_eval.jsonl", eval_records)
        feedback = {"kind": cfg.feedback.annotator.kind, "train_records": len(train_records),
                    "eval_records": len(eval_records), "dropped_unfinished": dropped,
                    "coverage": coverage_report(train_records)}

    with clock(3, "reward", "training the proxy reward model", paths.root):
        reward_cfg = reward_config(cfg, task, paths, files["feedback"], files["held-out feedback"])
        configs["reward"] = write_stage_config(paths, "reward", reward_cfg)
        reward_result = train_reward_model(reward_cfg)

    with clock(4, "rl", "PPO and A2C against the proxy, KL-tied to the SFT policy", paths.root):
        rl_prompts = task.sample_prompts(np.random.default_rng([seed, 4]), cfg.ppo.prompts)
        files["RL prompts"] = _write(paths, "prompts.jsonl", [{"prompt": p} for p in rl_prompts])
        for algo in ("ppo", "a2c"):
            rl_cfg = rl_config(cfg, task, paths, algo, files["RL prompts"])
            configs[algo] = write_stage_config(paths, algo, rl_cfg)
            train_rl(rl_cfg)

    with clock(5, "evaluation", "evaluating SFT, best-of-n, PPO and A2C on held-out prompts", paths.root):
        evaluation = evaluate_policies(cfg, task, oracle, paths, files)

    with clock(6, "report", "writing the report and plots", paths.root):
        results = _results(cfg, quick, task, oracle, paths, files, configs, feedback, evaluation,
                           sft_result.metrics, reward_result.metrics, clock)
        results["plots"] = _plots(paths, evaluation, task)
        report = render_report(results)
        (paths.root / "report.md").write_text(report)
    results["timings"]["report"] = clock.seconds["report"]
    results["timings"]["total"] = clock.total()
    (paths.root / "results.json").write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    (paths.root / "report.md").write_text(render_report(results))  # with the final timings
    summary = render_summary(results)
    print(summary, flush=True)
    return DemoResult(str(paths.root), str(paths.root / "report.md"), results, summary)


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


def _plots(paths: DemoPaths, evaluation: EvaluationResults, task: Any) -> dict[str, str]:
    curves = {**evaluation.curves, "best-of-n": evaluation.best_of_n}
    out = {}
    for metric in ("gold", "proxy"):
        path = plot_reward_vs_sqrt_kl(
            curves, metric, paths.plots / f"{metric}_vs_sqrt_kl.png",
            optimum=task.optimal_score if metric == "gold" else None)
        out[metric] = relative(path, paths.root)
    return out


def _results(cfg: DemoConfig, quick: bool, task: Any, oracle: Any, paths: DemoPaths, files: dict[str, str],
             configs: dict[str, str], feedback: dict, evaluation: EvaluationResults,
             sft_metrics: dict[str, float], reward_metrics: dict[str, float],
             clock: StageClock) -> dict[str, Any]:
    root = paths.root
    sft, ppo = evaluation.policies["SFT"], evaluation.policies["PPO"]
    ev = cfg.evaluation
    settings = [
        ["task", f"{cfg.task.name} (seed {cfg.task.seed})"],
        ["model", f"{cfg.model.family}, d={cfg.model.hidden_size}, {cfg.model.num_layers} layers, "
                  f"{cfg.model.num_heads} heads, from scratch"],
        ["SFT", f"{cfg.sft.demonstrations} demonstrations, {cfg.sft.steps} steps × {cfg.sft.batch_size}, "
                f"lr {cfg.sft.optimizer.learning_rate:g}"],
        ["feedback", f"{cfg.feedback.prompts} prompts × {cfg.feedback.responses_per_prompt} SFT samples, "
                     f"{cfg.feedback.annotator.kind} annotator τ={cfg.feedback.annotator.temperature:g}, "
                     f"flip ε={cfg.feedback.annotator.flip_prob:g}"],
        ["reward model", f"{cfg.reward.steps} steps × {cfg.reward.batch_size}, "
                         f"lr {cfg.reward.optimizer.learning_rate:g}"],
        ["PPO", f"{cfg.ppo.iterations} iterations × {cfg.ppo.batch_size} prompts, "
                f"lr {cfg.ppo.optimizer.learning_rate:g}, β={cfg.ppo.algorithm.kl_coef:g}, "
                f"{cfg.ppo.algorithm.epochs} epochs"],
        ["A2C", f"{cfg.a2c.iterations} iterations × {cfg.a2c.batch_size} prompts, "
                f"lr {cfg.a2c.optimizer.learning_rate:g}, β={cfg.a2c.algorithm.kl_coef:g}"],
        ["evaluation", f"{ev.prompts} held-out prompts × {ev.samples_per_prompt} samples per policy; "
                       f"best-of-n from {ev.best_of_n_samples} samples × {ev.best_of_n_prompts} prompts"],
        ["seed", str(cfg.run.seed)], ["JAX devices", f"{jax.device_count()} × {jax.devices()[0].platform}"],
    ]
    stages = (("SFT", "sft"), ("reward model", "reward"), ("PPO", "ppo"), ("A2C", "a2c"))
    exports = {name: relative(paths.export(stage), root) for name, stage in stages}
    logs = {"demo evaluation metrics (JSONL, TensorBoard)": "metrics.jsonl"}
    logs.update({f"{s} trainer metrics, TensorBoard events, checkpoints": s for s in ("sft", "reward", "ppo",
                                                                                     "a2c")})
    return {
        "run_dir": str(root), "quick": quick,
        "task": {"name": cfg.task.name, "description": task.describe(),
                 "oracle": cfg.task.oracle or f"the task's own ({getattr(oracle, 'name', 'oracle')})"},
        "settings": settings, "timings": dict(clock.seconds),
        "data": {"files": {k: relative(v, root) for k, v in files.items()}, "feedback": feedback},
        "sft": {"eval_loss": sft_metrics.get("eval/loss", math.nan),
                "eval_token_accuracy": sft_metrics.get("eval/token_accuracy", math.nan)},
        "reward_model": {"eval_accuracy": reward_metrics.get("eval/accuracy", math.nan),
                         "agreement": evaluation.agreement, "agreement_pairs": evaluation.agreement_pairs},
        "policies": {k: dataclasses.asdict(v) for k, v in evaluation.policies.items()},
        "best_of_n": [dataclasses.asdict(p) for p in evaluation.best_of_n],
        "curves": {k: [dataclasses.asdict(p) for p in v] for k, v in evaluation.curves.items()},
        "verdicts": {k: {"overoptimized": v.overoptimized, "text": v.text}
                     for k, v in evaluation.verdicts.items()},
        "rule": OVEROPTIMIZATION_RULE,
        "acceptance": {"ppo_beats_sft": intervals_separated(ppo.gold, ppo.gold_ci, sft.gold, sft.gold_ci)},
        "exports": exports, "logs": logs,
        "configs": {k: relative(v, root) for k, v in configs.items()},
    }

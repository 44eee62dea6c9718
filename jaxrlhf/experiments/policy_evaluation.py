"""The demo's evaluation stage: SFT, best-of-n from SFT, and every method of the comparison at every
checkpoint of every seed, on the same held-out prompts with the same sampling keys (common random numbers:
the differences between policies are less noisy than the policies' own intervals, and the per-prompt
differences are what the paired tests use).

Metrics go to ``<run>/metrics.jsonl`` and TensorBoard through the one metrics logger: ``sft/eval/*`` at
step 0, ``<method stage>/eval/*`` at each checkpoint's step, ``best_of_n/eval/*`` at step n.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import write_jsonl
from jaxrlhf.experiments.curves import CurvePoint, best_of_n_by_prompt, best_of_n_points, pair_agreement
from jaxrlhf.experiments.demo_methods import METHODS, DemoContext
from jaxrlhf.experiments.demo_stages import generation_config, lengths, prompt_arrays
from jaxrlhf.experiments.policy_scoring import PolicyEval, PolicyEvaluator, summarize
from jaxrlhf.rl.best_of_n import best_of_n_kl_estimate
from jaxrlhf.train.metrics import MetricsLogger, progress
from jaxrlhf.train.model_setup import load_model, load_reward_model
from jaxrlhf.train.run_config import ModelSection


@dataclasses.dataclass
class MethodRun:
    """One method trained with one seed, evaluated at each checkpoint (step 0: the SFT policy)."""

    seed_index: int
    points: list[CurvePoint]
    gold: np.ndarray  # [points, prompts]: per-prompt mean gold (the unit of every interval)
    proxy: np.ndarray  # [points, prompts]
    kl: np.ndarray  # [points, prompts]
    final: PolicyEval


@dataclasses.dataclass
class EvaluationResults:
    sft: PolicyEval
    sft_gold: np.ndarray  # [prompts] per-prompt mean gold of the SFT policy
    best_of_n: list[CurvePoint]  # KL: the sample-based estimate (rl.best_of_n_kl_estimate)
    best_of_n_gold: np.ndarray  # [len(ns), best-of-n prompts] per-prompt best-of-n gold
    best_of_n_kl_bound: list[float]  # log n − (n−1)/n beside each point
    runs: dict[str, list[MethodRun]]  # method key -> one per seed
    agreement: float
    agreement_pairs: int
    prompts: list[str]
    best_of_n_prompts: list[str]


def _repeat(tokens: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(tokens, k, axis=0), np.repeat(mask, k, axis=0)


def response_groups(rollouts: list[Any], samples_per_prompt: int) -> np.ndarray:
    """An id per sample, equal for identical responses (tokens under the mask), [prompts, N]."""
    tokens = np.concatenate([np.asarray(r.response_tokens) * np.asarray(r.response_mask) for r in rollouts])
    _, ids = np.unique(tokens, axis=0, return_inverse=True)
    return ids.reshape(-1, samples_per_prompt)


def best_of_n_with_kl(proxy: np.ndarray, gold: np.ndarray, optimal: np.ndarray, groups: np.ndarray,
                      ns: list[int]) -> tuple[list[CurvePoint], np.ndarray, list[float]]:
    """Best-of-n points [M, N] grids → points at the sample-based KL estimate (mean over prompts of
    ``best_of_n_kl_estimate``), the per-prompt gold [len(ns), M], and the bound log n − (n−1)/n."""
    points = best_of_n_points(proxy, gold, optimal, ns)
    kl = best_of_n_kl_estimate(proxy, np.asarray(ns), groups=groups).mean(axis=0)  # [J]
    bound = [p.kl for p in points]
    points = [dataclasses.replace(p, kl=float(k)) for p, k in zip(points, kl)]
    return points, best_of_n_by_prompt(proxy, gold, ns).T, bound


def evaluate_policies(ctx: DemoContext) -> EvaluationResults:
    """Evaluate SFT, best-of-n and every method's runs (see the module docstring); adds the prompt files to
    ``ctx.files``."""
    cfg, task, oracle, paths, files = ctx.cfg, ctx.task, ctx.oracle, ctx.paths, ctx.files
    ev, seed = cfg.evaluation, cfg.run.seed
    sft = load_model(ModelSection(path=str(paths.export("sft"))), jax.random.key(0), "SFT export")
    rm, normalization = load_reward_model(str(paths.export("reward")))
    p_len, n_len = lengths(task, cfg.task.add_bos)
    evaluator = PolicyEvaluator(sft.model, sft.params, rm.model, rm.params, normalization, oracle, task,
                                generation_config(sft.tokenizer, n_len, ev.temperature), ev.chunk_size)

    prompts = task.sample_prompts(np.random.default_rng([seed, 5]), ev.prompts, split="eval")
    bon_prompts = task.sample_prompts(np.random.default_rng([seed, 6]), ev.best_of_n_prompts, split="eval")
    files["evaluation prompts"] = str(paths.data / "eval_prompts.jsonl")
    files["best-of-n prompts"] = str(paths.data / "best_of_n_prompts.jsonl")
    write_jsonl(files["evaluation prompts"], [{"prompt": p} for p in prompts])
    write_jsonl(files["best-of-n prompts"], [{"prompt": p} for p in bon_prompts])
    k = ev.samples_per_prompt
    tokens, mask = _repeat(*prompt_arrays(prompts, sft.tokenizer, p_len, cfg.task.add_bos), k)
    key = jax.random.key(seed + 7)

    methods = [METHODS[m] for m in cfg.methods]
    bar = progress(2 + len(methods) * cfg.run.seeds * ev.rl_points, desc="evaluate",
                   enabled=cfg.run.progress_bar)
    logger = MetricsLogger(paths.root, tensorboard=cfg.run.tensorboard)
    try:
        # SFT, and the proxy's agreement with the oracle on pairs of its fresh samples.
        sft_scores, _ = evaluator.scores(sft.params, tokens, mask, key)
        sft_eval = summarize("SFT", sft_scores, k)
        logger.log(0, sft_eval.metrics(), prefix="sft/")
        pairs = slice(0, k // 2 * 2)
        agreement, agreement_pairs = pair_agreement(
            sft_scores["proxy"].reshape(-1, k)[:, pairs].reshape(-1, 2),
            sft_scores["gold"].reshape(-1, k)[:, pairs].reshape(-1, 2))
        logger.log(0, {"reward_model/oracle_agreement": agreement})
        bar.update(1)

        # BEST-OF-N from N samples of the SFT policy per prompt, at the sample-based KL estimate.
        n = ev.best_of_n_samples
        bon_tokens, bon_mask = _repeat(*prompt_arrays(bon_prompts, sft.tokenizer, p_len, cfg.task.add_bos), n)
        bon, rollouts = evaluator.scores(sft.params, bon_tokens, bon_mask, jax.random.fold_in(key, 1),
                                         keep_rollouts=True)
        grid = {name: v.reshape(-1, n) for name, v in bon.items()}
        bon_points, bon_gold, bon_bound = best_of_n_with_kl(grid["proxy"], grid["gold"], grid["optimal"],
                                                            response_groups(rollouts, n), list(ev.best_of_n))
        for p, bound in zip(bon_points, bon_bound):
            logger.log(p.x, {**_point_metrics(p), "eval/kl_bound": bound}, prefix="best_of_n/")
        bar.update(1)

        # Every method, every seed, every checkpoint; the SFT policy is each curve's step 0.
        sft_grid = {name: v.reshape(-1, k).mean(axis=1) for name, v in sft_scores.items()}
        runs: dict[str, list[MethodRun]] = {}
        for method in methods:
            runs[method.key] = []
            for s in range(cfg.run.seeds):
                points, golds, proxies, kls = [sft_eval.point(0)], [sft_grid["gold"]], [sft_grid["proxy"]], \
                    [sft_grid["kl"]]
                final = sft_eval
                for step, scores in method.score_points(ctx, s, evaluator, tokens, mask, key):
                    final = summarize(method.name, scores, k)
                    logger.log(step, final.metrics(), prefix=f"{method.stage(s)}/")
                    points.append(final.point(step))
                    golds.append(scores["gold"].reshape(-1, k).mean(axis=1))
                    proxies.append(scores["proxy"].reshape(-1, k).mean(axis=1))
                    kls.append(scores["kl"].reshape(-1, k).mean(axis=1))
                    bar.update(1)
                grids = (np.stack(golds), np.stack(proxies), np.stack(kls))
                runs[method.key].append(MethodRun(s, points, *grids, final))
    finally:
        bar.close()
        logger.close()
    return EvaluationResults(sft_eval, sft_grid["gold"], bon_points, bon_gold, bon_bound, runs, agreement,
                             agreement_pairs, prompts, bon_prompts)


def _point_metrics(p: CurvePoint) -> dict[str, Any]:
    return {"eval/gold": p.gold, "eval/gold_ci": p.gold_ci, "eval/proxy": p.proxy, "eval/kl": p.kl,
            "eval/sqrt_kl": p.sqrt_kl, "eval/optimal": p.optimal}

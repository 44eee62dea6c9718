"""The demo's evaluation stage: SFT, best-of-n from SFT, and PPO / A2C at every checkpoint, on held-out
prompts, with the same prompts and sampling keys for every policy (common random numbers make the
differences between policies less noisy than the policies' own intervals).

Metrics go to ``<run>/metrics.jsonl`` and TensorBoard through the one metrics logger: ``sft/eval/*`` at
step 0, ``ppo/eval/*`` and ``a2c/eval/*`` at each checkpoint's step, ``best_of_n/eval/*`` at step n.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import write_jsonl
from jaxrlhf.experiments.curves import (
    CurvePoint,
    Verdict,
    best_of_n_points,
    overoptimization_verdict,
    pair_agreement,
)
from jaxrlhf.experiments.demo_config import DemoConfig
from jaxrlhf.experiments.demo_stages import (
    DemoPaths,
    generation_config,
    lengths,
    prompt_arrays,
)
from jaxrlhf.experiments.policy_scoring import PolicyEval, PolicyEvaluator, summarize
from jaxrlhf.oracle import Oracle, Task
from jaxrlhf.train.metrics import MetricsLogger, progress
from jaxrlhf.train.model_setup import load_model, load_reward_model
from jaxrlhf.train.rl import checkpoint_steps, policy_lm_params
from jaxrlhf.train.run_config import ModelSection

RL_NAMES = {"ppo": "PPO", "a2c": "A2C"}


@dataclasses.dataclass
class EvaluationResults:
    policies: dict[str, PolicyEval]  # "SFT", "PPO", "A2C" (the final policies)
    best_of_n: list[CurvePoint]
    curves: dict[str, list[CurvePoint]]  # "PPO", "A2C": from the SFT policy (step 0) to the final step
    verdicts: dict[str, Verdict]
    agreement: float
    agreement_pairs: int


def _repeat(tokens: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(tokens, k, axis=0), np.repeat(mask, k, axis=0)


def evaluate_policies(cfg: DemoConfig, task: Task, oracle: Oracle, paths: DemoPaths,
                      files: dict[str, str]) -> EvaluationResults:
    """Evaluate every policy of the run (see the module docstring); adds the prompt files to ``files``."""
    ev, seed = cfg.evaluation, cfg.run.seed
    sft = load_model(ModelSection(path=str(paths.export("sft"))), jax.random.key(0), "SFT export")
    rm, normalization = load_reward_model(str(paths.export("reward")))
    p_len, n_len = lengths(task, cfg.task.add_bos)
    evaluator = PolicyEvaluator(sft.model, sft.params, rm.model, rm.params, normalization, oracle, task,
                                generation_config(sft.tokenizer, n_len, ev.temperature), ev.chunk_size)

    prompts = task.sample_prompts(np.random.default_rng([seed, 5]), ev.prompts)
    bon_prompts = task.sample_prompts(np.random.default_rng([seed, 6]), ev.best_of_n_prompts)
    files["evaluation prompts"] = str(paths.data / "eval_prompts.jsonl")
    files["best-of-n prompts"] = str(paths.data / "best_of_n_prompts.jsonl")
    write_jsonl(files["evaluation prompts"], [{"prompt": p} for p in prompts])
    write_jsonl(files["best-of-n prompts"], [{"prompt": p} for p in bon_prompts])
    k = ev.samples_per_prompt
    tokens, mask = _repeat(*prompt_arrays(prompts, sft.tokenizer, p_len, cfg.task.add_bos), k)
    key = jax.random.key(seed + 7)

    rl_steps = {algo: checkpoint_steps(paths.stage(algo)) for algo in RL_NAMES}
    bar = progress(2 + sum(len(s) for s in rl_steps.values()), desc="evaluate",
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

        # BEST-OF-N from N samples of the SFT policy per prompt.
        n = ev.best_of_n_samples
        bon_tokens, bon_mask = _repeat(*prompt_arrays(bon_prompts, sft.tokenizer, p_len, cfg.task.add_bos), n)
        bon, _ = evaluator.scores(sft.params, bon_tokens, bon_mask, jax.random.fold_in(key, 1))
        grid = {name: v.reshape(-1, n) for name, v in bon.items()}
        bon_points = best_of_n_points(grid["proxy"], grid["gold"], grid["optimal"], ev.best_of_n)
        for p in bon_points:
            logger.log(p.x, _point_metrics(p), prefix="best_of_n/")
        bar.update(1)

        # RL: every checkpoint; the final policy from its Hugging Face export.
        policies, curves = {"SFT": sft_eval}, {}
        for algo, name in RL_NAMES.items():
            points = [sft_eval.point(0)]
            for step in rl_steps[algo]:
                final = step == rl_steps[algo][-1]
                params = (load_model(ModelSection(path=str(paths.export(algo))), key, f"{name} export").params
                          if final else policy_lm_params(paths.stage(algo), step, sft.model))
                result = evaluator.evaluate(name, params, tokens, mask, key, k)
                logger.log(step, result.metrics(), prefix=f"{algo}/")
                points.append(result.point(step))
                if final:
                    policies[name] = result
                bar.update(1)
            curves[name] = points
    finally:
        bar.close()
        logger.close()
    verdicts: dict[str, Verdict] = {name: overoptimization_verdict(points) for name, points in curves.items()}
    verdicts["best-of-n"] = overoptimization_verdict(bon_points, unit="n")
    return EvaluationResults(policies, bon_points, curves, verdicts, agreement, agreement_pairs)


def _point_metrics(p: CurvePoint) -> dict[str, Any]:
    return {"eval/gold": p.gold, "eval/gold_ci": p.gold_ci, "eval/proxy": p.proxy, "eval/kl": p.kl,
            "eval/sqrt_kl": p.sqrt_kl, "eval/optimal": p.optimal}

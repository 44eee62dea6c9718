"""Value-guided decoding in the oracle comparison (the value-based family beside the policy gradients).

ILQL (``jaxrlhf.experiments.value_based``) is trained offline, on a frozen SFT backbone, on the SFT policy's
own samples of the RL prompts scored once each by the proxy reward model — the feedback the RL methods get
through the same reward model. The method's curve is value-guided decoding π_β ∝ π_SFT·exp(β·(Q − V)) at
each β of ``vgd.betas`` (x = β; β = 0 is the SFT policy, the curve's first point), scored on the same
held-out prompts with the same keys as every method; its KL is the rollout's exact per-step
KL(π_β ‖ π_SFT) summed along each response (an unbiased estimate of the sequence KL, like the others').
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import write_jsonl
from jaxrlhf.experiments.demo_stages import generation_config, lengths, prompt_arrays
from jaxrlhf.experiments.value_based import ValueBasedBudget, ValueBasedResult, train_value_based
from jaxrlhf.steps.reward_model import RewardModelScorer
from jaxrlhf.train.model_setup import load_model, load_reward_model
from jaxrlhf.train.run_config import ModelSection


@dataclasses.dataclass(frozen=True)
class VGDRun:
    """What one seed of the method trains on: the demo's context, its stage and seed."""

    ctx: Any  # jaxrlhf.experiments.demo_methods.DemoContext
    stage: str
    seed: int


def build_vgd(ctx: Any, stage: str, seed: int) -> VGDRun:
    return VGDRun(ctx, stage, seed)


def train_vgd(run: VGDRun) -> ValueBasedResult:
    """Collect and score the SFT policy's samples, train ILQL; the result is kept in ``ctx.trained``."""
    ctx = run.ctx
    cfg, paths = ctx.cfg, ctx.paths
    stage_cfg = cfg.vgd
    sft = load_model(ModelSection(path=str(paths.export("sft"))), jax.random.key(0), "SFT export")
    rm, normalization = load_reward_model(str(paths.export("reward")))
    scorer = RewardModelScorer(rm.model, normalization)
    reward = jax.jit(lambda rollout: scorer(rm.params, rollout))
    with open(ctx.files["RL prompts"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    p_len, n_len = lengths(ctx.task, cfg.task.add_bos)
    tokens, mask = prompt_arrays(prompts, sft.tokenizer, p_len, cfg.task.add_bos)
    budget = ValueBasedBudget(
        samples_per_prompt=stage_cfg.samples_per_prompt, steps=stage_cfg.steps,
        batch_size=stage_cfg.batch_size,
        learning_rate=stage_cfg.learning_rate, prompts_per_call=cfg.evaluation.chunk_size,
        ilql=dataclasses.replace(stage_cfg.algorithm, freeze_backbone=True))
    result = train_value_based(sft.model, sft.params, reward, tokens, mask, jax.random.key(run.seed + 11),
                               generation_config(sft.tokenizer, n_len, cfg.evaluation.temperature), budget)
    ctx.trained[run.stage] = result
    history = paths.stage(run.stage)
    history.mkdir(parents=True, exist_ok=True)
    write_jsonl(history / "ilql_metrics.jsonl", [{"step": i + 1, **m} for i, m in enumerate(result.history)])
    return result


def vgd_points(ctx: Any, seed_index: int, evaluator: Any, tokens: np.ndarray, mask: np.ndarray,
               key: jax.Array) -> list[tuple[int, dict[str, np.ndarray]]]:
    """:attr:`Method.points` of value-guided decoding: the per-sample scores at each β of ``vgd.betas``,
    sampled with the evaluation's prompts and key."""
    from jaxrlhf.experiments.demo_methods import METHODS  # the table imports this module

    result: ValueBasedResult = ctx.trained[METHODS["vgd"].stage(seed_index)]
    out = []
    for beta in ctx.cfg.vgd.betas:
        scores, _ = evaluator.scores(evaluator.reference_params, tokens, mask, key,
                                     sampler=result.sampler(float(beta), evaluator.generation))
        out.append((beta, scores))
    return out

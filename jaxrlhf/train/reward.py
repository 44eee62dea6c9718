"""``jaxrlhf reward``: train a reward model (backbone + scalar head) on preferences, rankings or ratings.

After training, a normalisation ``r' = gain·r + bias`` is fitted so that the rewards of a reference sample
(every response of the eval file, else of the train file) have mean 0 and std 1; it is exported with the
model (``reward_normalization.json``) and applied by the RL trainers. Held-out accuracy is logged as
``eval/accuracy``.

With ``lora.enabled`` the backbone trains adapters on its frozen base (the head is trained whole);
checkpoints hold only the adapters and the head, and the export is the merged reward model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.data import Kind, SequenceExample
from jaxrlhf.models.heads import init_reward_head
from jaxrlhf.models.lora import LoRAConfig
from jaxrlhf.parallel import ParallelConfig
from jaxrlhf.rl import RewardNormalization, fit_reward_normalization
from jaxrlhf.steps import OptimizerConfig, RewardModelParams, create_train_state, make_optimizer
from jaxrlhf.steps.reward_model import (
    RewardModelConfig,
    make_reward_model_eval,
    make_reward_model_step,
    make_reward_scorer,
)
from jaxrlhf.steps.state import model_params
from jaxrlhf.train.data_setup import (
    eval_batches,
    make_collate,
    ranking_items,
    train_and_eval_sets,
    train_iterator,
)
from jaxrlhf.train.dpo_data import drop_identical_pairs, drop_repeated_responses
from jaxrlhf.train.loop import training_loop
from jaxrlhf.train.lora_setup import lora_model, merged_lm
from jaxrlhf.train.model_setup import check_length, export_model, flops_per_token, load_model
from jaxrlhf.train.reporting import host_scalars
from jaxrlhf.train.run import Run, RunResult, compile_step, total_steps
from jaxrlhf.train.run_config import (
    CheckpointSection,
    DataSection,
    LoggingSection,
    ModelSection,
    TrainSection,
    check_common,
    check_grad_accum,
)
from jaxrlhf.train.supervised import supervised_hooks

log = logging.getLogger("jaxrlhf")

DATA_KIND: dict[str, Kind] = {"pairwise": "preference", "ranking": "ranking", "rating": "rating"}
EVAL_KEYS = ("loss", "accuracy", "margin", "mae")


@dataclasses.dataclass(frozen=True)
class RewardRunConfig:
    """``jaxrlhf reward`` (see configs/reward.yaml); ``reward_model.loss`` picks the data format."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    reward_model: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=lambda: LoggingSection(run_dir="runs/reward"))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


def evaluate_reward_model(evaluate: Any, params: Any, batches: Any) -> dict[str, float]:
    """The eval metrics over the whole eval set, as ``eval/*``: each batch's weighted by its own weight
    (rows for the loss, pairs for accuracy and margin), so the result does not depend on
    ``data.eval_batch_size``; a rating model's pairs are formed across all batches."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    rows: list[dict[str, np.ndarray]] = []
    for batch in batches:
        m = evaluate(params, batch)
        if "rows/reward" in m:
            rows.append({k[5:]: np.asarray(v) for k, v in parallel.to_host(
                {k: v for k, v in m.items() if k.startswith("rows/")}).items()})
        m = host_scalars({k: v for k, v in m.items() if not k.startswith("rows/")})
        for k in EVAL_KEYS:
            if k in m:
                w = m[f"weight/{k}"]
                sums[k] = sums.get(k, 0.0) + m[k] * w
                totals[k] = totals.get(k, 0.0) + w
    out = {k: v / totals[k] if totals[k] > 0 else 0.0 for k, v in sums.items()}
    if rows:
        out.update(rating_pair_summary({k: np.concatenate([r[k] for r in rows]) for k in rows[0]}))
    return {f"eval/{k}": v for k, v in out.items()}


def rating_pair_summary(rows: dict[str, np.ndarray], block: int = 1024) -> dict[str, float]:
    """:func:`~jaxrlhf.steps.reward_model.rating_pair_metrics` over every pair of ``rows`` (reward, rating,
    weight), in blocks of rows so that memory stays O(block · n), in float64."""
    reward, rating, weight = (rows[k].astype(np.float64) for k in ("reward", "rating", "weight"))
    pairs = right = margin = 0.0
    for start in range(0, len(reward), block):
        sl = slice(start, start + block)
        w = weight[sl, None] * weight[None, :] * (rating[sl, None] > rating[None, :])
        diff = reward[sl, None] - reward[None, :]
        pairs += float(w.sum())
        right += float((w * (diff > 0)).sum())
        margin += float((w * diff).sum())
    if pairs == 0:
        return {"accuracy": 0.0, "margin": 0.0}
    return {"accuracy": right / pairs, "margin": margin / pairs}


def reference_responses(examples: Sequence[Any]) -> list[SequenceExample]:
    """Every (prompt, response) of preference / ranking / rating examples, for fitting the normalisation."""
    out = []
    for e in examples:
        responses = (e.chosen, e.rejected) if hasattr(e, "chosen") else getattr(e, "responses", None)
        for r in responses if responses is not None else (e.response,):
            out.append(SequenceExample(e.prompt, r, e.source))
    return out


def fit_normalization(
    score: Any, params: Any, sample: Sequence[SequenceExample], batch_size: int, collate: Any
) -> tuple[RewardNormalization, dict[str, float]]:
    """(gain, bias) making the sample's rewards mean 0 / std 1, and the raw rewards' mean and std."""
    rewards = []
    for batch in eval_batches(sample, batch_size, collate):
        scores = np.asarray(score(params, batch["tokens"], batch["mask"]))
        rewards.append(scores[np.asarray(batch["row_mask"]) > 0])
    raw = np.concatenate(rewards)
    norm = fit_reward_normalization(jnp.asarray(raw))
    stats = {
        "val/reward_mean_raw": float(raw.mean()),
        "val/reward_std_raw": float(raw.std()),
        "val/normalization_gain": float(norm.gain),
        "val/normalization_bias": float(norm.bias),
    }
    return norm, stats


def train_reward_model(cfg: RewardRunConfig) -> RunResult:
    """Run reward-model training, fit the normalisation, export; returns where the run and export are."""
    check_common(cfg.model, cfg.data, cfg.checkpoint, cfg.logging, cfg.train)
    check_grad_accum("reward_model.grad_accum_steps", cfg.reward_model.grad_accum_steps, cfg.data)
    kind = DATA_KIND[cfg.reward_model.loss]
    with Run(
        "reward", cfg, cfg.checkpoint, cfg.logging, cfg.train, cfg.model.dtype, parallel_cfg=cfg.parallel
    ) as run:
        init_key, head_key, rng = jax.random.split(jax.random.key(cfg.train.seed), 3)
        model, lm, tokenizer, heads = load_model(cfg.model, init_key)
        model, lm, base = lora_model(cfg.lora, model, lm, jax.random.fold_in(init_key, 1))
        check_length(model.config, cfg.data.max_prompt_length + cfg.data.max_response_length)
        head = heads.get("reward_head") or init_reward_head(head_key, model.config.hidden_size)
        params = RewardModelParams(lm, jax.tree.map(jnp.asarray, head))

        train_set, eval_set = train_and_eval_sets(kind, tokenizer, cfg.data, cfg.train.seed)
        if kind in ("preference", "ranking"):  # a response tied with itself teaches nothing, scores as lost
            policy, key = cfg.reward_model.identical_pairs, "reward_model.identical_pairs"
            drop = drop_identical_pairs if kind == "preference" else drop_repeated_responses
            train_set = drop(train_set, cfg.data.train_file, policy, key)
            if eval_set is not None:
                eval_path = cfg.data.eval_file or cfg.data.train_file
                eval_set = drop(eval_set, eval_path, policy, key)
        items = ranking_items([*train_set, *(eval_set or [])], cfg.data) if kind == "ranking" else None
        collate = make_collate(kind, cfg.data, tokenizer, items)
        batches = train_iterator(
            train_set, cfg.data.batch_size, cfg.train.seed, collate, cfg.data.shuffle, cfg.data.train_file
        )
        run.check_batch_size("data.batch_size", cfg.data.batch_size)  # before the eval size, its default
        run.check_micro_batch("reward_model.grad_accum_steps",
                              cfg.data.batch_size // cfg.reward_model.grad_accum_steps)
        eval_size = cfg.data.eval_batch_size or cfg.data.batch_size
        evaluate = None
        if eval_set is not None:
            run.check_batch_size("data.eval_batch_size", eval_size)
            evaluate_batch = compile_step(make_reward_model_eval(model, cfg.reward_model), donate=False)
            evaluate_on_mesh = lambda params, batch: evaluate_batch(params, run.shard(batch))
            evaluate = lambda state: evaluate_reward_model(
                evaluate_on_mesh, model_params(state), eval_batches(eval_set, eval_size, collate)
            )
        else:
            log.warning("no evaluation examples: held-out accuracy is not measured")

        total = total_steps(cfg.train, batches.batches_per_epoch)
        optimizer = make_optimizer(cfg.optimizer, total)
        frozen = None if base is None else RewardModelParams(base, None)  # LoRA: the frozen backbone
        state = run.place(create_train_state(params, optimizer, frozen),
                          "reward model params + optimiser state")
        step_fn = compile_step(
            make_reward_model_step(model, optimizer, cfg.reward_model),
            state_shardings=run.state_shardings(state),
        )
        flops = flops_per_token(model.config, training=True, lm_head=False)
        hooks = supervised_hooks(run, step_fn, flops, evaluate, cfg.train.eval_every,
                                 postfix=("loss/reward", "train/accuracy", "lr"))
        state, result = training_loop(run, state, rng, batches, total, hooks)
        if result.stopped_early:
            return result

        # NORMALISE: rewards of the reference sample to mean 0, std 1.
        sample = reference_responses(eval_set if eval_set is not None else train_set)
        score_jit = compile_step(make_reward_scorer(model), donate=False)
        score = lambda params, tokens, mask: score_jit(params, *run.shard((tokens, mask)))
        norm, stats = fit_normalization(
            score, model_params(state), sample, eval_size, make_collate("sft", cfg.data, tokenizer)
        )
        run.report.log_eval(result.step, stats)
        result.metrics.update(stats)
        export = export_model(
            os.path.join(run.run_dir, "export"),
            model,
            merged_lm(cfg.lora, model, state.params.lm, None if state.frozen is None else state.frozen.lm),
            tokenizer,
            heads={"reward_head": state.params.reward_head},
            normalization=norm,
        )
        result.export_dir = str(export)
        if cfg.lora.enabled:
            log.info("LoRA reward model: only the merged export is written (no export_adapter/: the score "
                     "head is trained whole, so the adapters alone do not reproduce the scores)")
        return result

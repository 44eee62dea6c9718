"""``jaxrlhf sft``: supervised fine-tuning on {"prompt", "completion"} (or chat ``messages``) JSONL.

Trains the LM on the completion tokens only, evaluates the held-out loss, and exports the model as a
Hugging Face directory ``<run_dir>/export``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.models.lora import LoRAConfig
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask
from jaxrlhf.parallel import ParallelConfig
from jaxrlhf.steps import OptimizerConfig, SFTConfig, create_train_state, make_optimizer, make_sft_step
from jaxrlhf.steps.sft import sft_loss, target_mask
from jaxrlhf.steps.state import model_params
from jaxrlhf.train.data_setup import eval_batches, make_collate, train_and_eval_sets, train_iterator
from jaxrlhf.train.loop import training_loop
from jaxrlhf.train.lora_setup import export_adapters, lora_model, merged_lm
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


@dataclasses.dataclass(frozen=True)
class SFTRunConfig:
    """``jaxrlhf sft`` (see configs/sft.yaml)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=lambda: LoggingSection(run_dir="runs/sft"))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


def make_sft_eval(model: LanguageModel) -> Any:
    """Jitted ``eval(params, batch) -> {"loss", "accuracy", "tokens"}`` (masked CE of the completions)."""

    def evaluate(params: Any, batch: dict) -> dict:
        tokens, mask = batch["tokens"], batch["mask"]
        logits, _, _ = model.apply(params, tokens, positions_from_mask(mask), mask)
        weights = target_mask(batch)
        loss, metrics = sft_loss(logits, tokens, weights)
        return {"loss": loss, "accuracy": metrics["accuracy"], "tokens": jnp.sum(weights)}

    return compile_step(evaluate, donate=False)


def evaluate_sft(evaluate: Any, params: Any, batches: Any) -> dict[str, float]:
    """Token-weighted mean loss and accuracy over all eval batches: ``eval/loss``, ``eval/token_accuracy``."""
    sums = {"loss": 0.0, "accuracy": 0.0}
    tokens = 0.0
    for batch in batches:
        m = host_scalars(evaluate(params, batch))
        for k in sums:
            sums[k] += m[k] * m["tokens"]
        tokens += m["tokens"]
    tokens = max(tokens, 1.0)
    return {"eval/loss": sums["loss"] / tokens, "eval/token_accuracy": sums["accuracy"] / tokens}


def train_sft(cfg: SFTRunConfig) -> RunResult:
    """Run supervised fine-tuning end to end; returns where the run and its export are."""
    check_common(cfg.model, cfg.data, cfg.checkpoint, cfg.logging, cfg.train)
    check_grad_accum("sft.grad_accum_steps", cfg.sft.grad_accum_steps, cfg.data)
    with Run(
        "sft", cfg, cfg.checkpoint, cfg.logging, cfg.train, cfg.model.dtype, parallel_cfg=cfg.parallel
    ) as run:
        init_key, rng = jax.random.split(jax.random.key(cfg.train.seed))
        model, params, tokenizer, _ = load_model(cfg.model, init_key)
        model, params, frozen = lora_model(cfg.lora, model, params, jax.random.fold_in(init_key, 1))
        check_length(model.config, cfg.data.max_prompt_length + cfg.data.max_response_length)
        collate = make_collate("sft", cfg.data, tokenizer)
        train_set, eval_set = train_and_eval_sets("sft", tokenizer, cfg.data, cfg.train.seed)
        batches = train_iterator(
            train_set, cfg.data.batch_size, cfg.train.seed, collate, cfg.data.shuffle, cfg.data.train_file
        )
        run.check_batch_size("data.batch_size", cfg.data.batch_size)  # before the eval size, its default
        run.check_micro_batch("sft.grad_accum_steps", cfg.data.batch_size // cfg.sft.grad_accum_steps)
        evaluate = None
        if eval_set is not None:
            evaluate_batch = make_sft_eval(model)
            size = cfg.data.eval_batch_size or cfg.data.batch_size
            run.check_batch_size("data.eval_batch_size", size)
            evaluate_on_mesh = lambda params, batch: evaluate_batch(params, run.shard(batch))
            evaluate = lambda s: evaluate_sft(
                evaluate_on_mesh, model_params(s), eval_batches(eval_set, size, collate))
        total = total_steps(cfg.train, batches.batches_per_epoch)
        optimizer = make_optimizer(cfg.optimizer, total)
        state = run.place(create_train_state(params, optimizer, frozen), "SFT params + optimiser state")
        step_fn = compile_step(
            make_sft_step(model, optimizer, cfg.sft), state_shardings=run.state_shardings(state)
        )
        hooks = supervised_hooks(run, step_fn, flops_per_token(model.config, training=True), evaluate,
                                 cfg.train.eval_every, postfix=("loss/sft", "train/accuracy", "lr"))
        state, result = training_loop(run, state, rng, batches, total, hooks)
        if not result.stopped_early:
            lm = merged_lm(cfg.lora, model, state.params, state.frozen)
            export = export_model(os.path.join(run.run_dir, "export"), model, lm, tokenizer,
                                  source=cfg.model.path)
            if cfg.lora.enabled:
                export_adapters(run.run_dir, cfg.lora, model, state.params, cfg.model.path)
            result.export_dir = str(export)
        return result

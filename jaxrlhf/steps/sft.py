"""Supervised fine-tuning: masked next-token cross-entropy over the response tokens of a batch.

Batch (see ``jaxrlhf.data.batching``): ``tokens, mask, loss_mask`` [B, L] and optionally ``row_mask`` [B].
``loss_mask`` marks the target tokens, so logits[:, :-1] predict tokens[:, 1:] under loss_mask[:, 1:].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.transformer import LanguageModel, positions_from_mask
from jaxrlhf.rl.masked import masked_count, masked_mean
from jaxrlhf.rl.policy_losses import token_logprobs
from jaxrlhf.steps.accumulate import accumulate_gradients
from jaxrlhf.steps.guard import apply_gradients_if_finite
from jaxrlhf.steps.optim import current_learning_rate
from jaxrlhf.steps.state import TrainState, split_frozen, with_frozen

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """grad_accum_steps: micro-batches per update (the batch size must be divisible by it)."""

    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.grad_accum_steps < 1:
            raise ValueError(f"SFTConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


def target_mask(batch: Batch) -> jax.Array:
    """loss_mask[:, 1:] (times row_mask when present) as float32: each target token's weight. [B, L−1]."""
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if "row_mask" in batch:
        mask = mask * batch["row_mask"][:, None].astype(jnp.float32)
    return mask


def sft_loss(logits: jax.Array, tokens: jax.Array, target_mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """CE = Σ_{b,j} m[b,j]·(−log softmax(logits[b,j])[tokens[b,j+1]]) / Σ m  over j < L−1.

    logits [B, L, V], tokens [B, L], target_mask [B, L−1] (weight of target token j+1). Metrics:
    "accuracy" (share of target tokens that are the arg-max prediction).
    """
    chex.assert_rank([logits, tokens, target_mask], [3, 2, 2])
    targets = tokens[:, 1:]
    chex.assert_equal_shape([targets, target_mask])
    logits = logits[:, :-1]
    nll = -token_logprobs(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    return masked_mean(nll, target_mask), {"accuracy": masked_mean(correct, target_mask)}


def make_sft_step(
    model: LanguageModel, optimizer: optax.GradientTransformation, cfg: SFTConfig
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``step(state, batch, key) -> (state, metrics)``: one (guarded) update on the masked CE.

    ``state.params`` are the LM params (LoRA: the adapters, ``state.frozen`` the base). Metrics (their
    logged names): loss/sft, train/accuracy (of the arg-max next-token prediction), train/grad_norm (before
    clipping), train/skipped_updates (1 when the update was not finite and skipped), lr.
    """

    def loss_fn(params: Any, batch: Batch):
        tokens, mask = batch["tokens"], batch["mask"]
        logits, _, _ = model.apply(params, tokens, positions_from_mask(mask), mask)
        weights = target_mask(batch)
        loss, metrics = sft_loss(logits, tokens, weights)
        return loss, (masked_count(weights), metrics)

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, Metrics]:
        del key  # no randomness: dropout is off in every model
        state, frozen = split_frozen(state)
        loss, grads, metrics = accumulate_gradients(with_frozen(loss_fn, frozen), state.params, batch,
                                                    cfg.grad_accum_steps)
        state, ok = apply_gradients_if_finite(state, optimizer, grads, loss)
        state = state._replace(frozen=frozen)
        metrics = {
            "loss/sft": loss,
            "train/accuracy": metrics["accuracy"],
            "train/grad_norm": optax.tree.norm(grads),
            "train/skipped_updates": 1.0 - ok.astype(jnp.float32),
            "lr": current_learning_rate(state.opt_state),
        }
        return state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    return step

"""Gradient accumulation: one update's gradient summed over micro-batches in a ``lax.scan``.

A micro-batch loss is a weighted mean (over tokens or rows) whose total weight the loss function reports;
the combined loss, gradient and metrics are Σ_i w_i·x_i / Σ_i w_i, which is exactly the value the whole
batch would give in one pass (up to float rounding), whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.steps.sharding import shard_rows

# loss_fn(params, batch) -> (loss, (weight, metrics)): loss is a mean with total weight `weight`.
WeightedLossFn = Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]


def split_microbatches(batch: Any, num_micro: int) -> Any:
    """[B, ...] leaves → [num_micro, B/num_micro, ...]; micro-batch i holds rows i, i + A, i + 2A, …

    The strided split keeps each device's contiguous block of a data-parallel batch on that device: every
    device contributes its share of every micro-batch, and no rows move between devices.
    """

    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % num_micro:
            raise ValueError(
                f"split_microbatches: batch size {x.shape[:1]} is not divisible by {num_micro} micro-batches"
            )
        return x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of :func:`split_microbatches` for one array: [A, B/A, ...] → [B, ...] in the original order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def accumulate_gradients(
    loss_fn: WeightedLossFn, params: Any, batch: Any, num_micro: int
) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """(loss, grads, metrics) of ``loss_fn`` over ``batch`` computed in ``num_micro`` micro-batches.

    L = Σ_i w_i·L_i / Σ_i w_i,  ∇L = Σ_i w_i·∇L_i / Σ_i w_i, metrics likewise (0 when Σ w = 0).
    With ``num_micro == 1`` this is a plain ``value_and_grad``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, (_, metrics)), grads = grad_fn(params, batch)
        return loss, grads, metrics

    def weighted(tree, w):
        return jax.tree.map(lambda x: x * w.astype(x.dtype), tree)

    def body(carry, micro):
        (loss, (w, metrics)), grads = grad_fn(params, shard_rows(micro))
        w = jnp.asarray(w, jnp.float32)
        term = (loss * w, weighted(grads, w), weighted(metrics, w), w)
        return jax.tree.map(jnp.add, carry, term), None

    micro_batches = split_microbatches(batch, num_micro)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(grad_fn, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss0, (_, metrics0)), grads0 = zeros
    init = (loss0, grads0, metrics0, jnp.zeros((), jnp.float32))
    (loss, grads, metrics, total), _ = jax.lax.scan(body, init, micro_batches)
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    return loss * scale, weighted(grads, scale), weighted(metrics, scale)

"""Gradient accumulation: one update's gradient summed over micro-batches in a ``lax.scan``.

A micro-batch loss is a weighted mean (over tokens or rows) whose total weight the loss function reports;
the combined loss, gradient and metrics are Σ_i w_i·x_i / Σ_i w_i, which is exactly the value the whole
batch would give in one pass (up to float rounding), whatever the split. A metric that is a mean over other
units than the loss (token means beside a loss averaged over sequences) reports its own weight, and a
metric that is a (population) variance is merged with its mean's (Chan et al.), so that it too equals the
whole batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.steps.sharding import shard_rows

# loss_fn(params, batch) -> (loss, (weight, metrics)), (loss, (weight, metrics, metric_weights)) or
# (loss, (weight, metrics, metric_weights, rows)): loss is a mean with total weight `weight`;
# metric_weights[k], where given, is metric k's own weight (else `weight`); rows, where given, are per-row
# outputs ([b, ...] leaves) from which `row_metrics` computes metrics over the whole batch.
WeightedLossFn = Callable[[Any, Any], tuple[jax.Array, tuple[Any, ...]]]


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
    loss_fn: WeightedLossFn, params: Any, batch: Any, num_micro: int,
    variances: Mapping[str, str] | None = None,
    row_metrics: Callable[[Any], dict[str, jax.Array]] | None = None,
) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """(loss, grads, metrics) of ``loss_fn`` over ``batch`` computed in ``num_micro`` micro-batches.

    L = Σ_i w_i·L_i / Σ_i w_i,  ∇L = Σ_i w_i·∇L_i / Σ_i w_i, metrics likewise with their own weights where
    the loss function gives them (0 when Σ w = 0). ``variances`` maps a variance metric to the mean metric it
    is taken about (same weights): merged as M2 = Σ_i w_i·var_i + Σ_i δ_i²·W_{<i}·w_i/W_{≤i}, δ_i the i-th
    mean minus the mean of those before, var = M2 / Σ w. A metric over pairs of rows that may fall in
    different micro-batches (a rating model's ordered pairs) cannot be merged from per-micro-batch values:
    ``row_metrics(rows)`` computes it from the loss function's per-row outputs of the whole batch. With
    ``num_micro == 1`` this is a plain ``value_and_grad``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    variances = dict(variances or {})

    def with_rows(metrics: dict[str, jax.Array], rows: Any) -> dict[str, jax.Array]:
        return metrics if row_metrics is None else {**metrics, **row_metrics(rows)}

    if num_micro == 1:
        (loss, (_, metrics, *given)), grads = grad_fn(params, batch)
        return loss, grads, with_rows(metrics, given[1] if len(given) > 1 else None)

    def weighted(tree, w):
        return jax.tree.map(lambda x: x * w.astype(x.dtype), tree)

    def metric_weights(w, metrics, given):
        given = given[0] if given else {}
        return {k: jnp.asarray(given.get(k, w), jnp.float32) for k in metrics}

    def body(carry, micro):
        loss_sum, grad_sum, sums, total, weights = carry
        (loss, (w, metrics, *given)), grads = grad_fn(params, shard_rows(micro))
        w = jnp.asarray(w, jnp.float32)
        mw = metric_weights(w, metrics, given)
        new_sums = {k: sums[k] + metrics[k] * mw[k] for k in metrics}
        for var, mean in variances.items():  # Chan's merge of (count, mean, M2) with this micro-batch's
            before, n = weights[var], weights[var] + mw[var]
            delta = metrics[mean] - sums[mean] / jnp.where(before > 0, before, 1.0)
            new_sums[var] = (sums[var] + metrics[var] * mw[var]
                             + jnp.square(delta) * before * mw[var] / jnp.where(n > 0, n, 1.0))
        new = (loss_sum + loss * w, jax.tree.map(jnp.add, grad_sum, weighted(grads, w)), new_sums,
               total + w, {k: weights[k] + mw[k] for k in metrics})
        return new, given[1] if len(given) > 1 else None

    micro_batches = split_microbatches(batch, num_micro)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(grad_fn, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss0, (_, metrics0, *_)), grads0 = zeros
    missing = [k for pair in variances.items() for k in pair if k not in metrics0]
    if missing:
        raise ValueError(f"accumulate_gradients: variances name metrics the loss does not return: {missing}")
    zero = jnp.zeros((), jnp.float32)
    init = (loss0, grads0, metrics0, zero, {k: zero for k in metrics0})
    (loss, grads, sums, total, weights), rows = jax.lax.scan(body, init, micro_batches)
    inverse = lambda t: jnp.where(t > 0, 1.0 / jnp.where(t > 0, t, 1.0), 0.0)
    metrics = {k: v * inverse(weights[k]).astype(v.dtype) for k, v in sums.items()}
    rows = jax.tree.map(merge_microbatches, rows)  # the whole batch's rows, in its order
    return loss * inverse(total), weighted(grads, inverse(total)), with_rows(metrics, rows)

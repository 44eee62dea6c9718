"""Epochs × minibatches of guarded gradient updates over one batch: the loop PPO and the critic-free update
share.

    trainables, metrics = minibatch_epochs(loss_fn, params_of, apply, trainables, batch, key, cfg, averaged)

Epochs and minibatches are nested ``lax.scan``s (a fresh permutation of the rows per epoch from ``key``);
each minibatch's rows keep their split over the mesh's batch axes
(:func:`~jaxrlhf.steps.sharding.shard_rows`); its gradient may be accumulated over ``cfg.grad_accum_steps``
micro-batches; an update whose loss or gradients are not finite is skipped (and counted); with
``cfg.target_kl_early_stop`` the first minibatch whose approx-KL exceeds 1.5 × target is not applied and
neither is any after it (nor even computed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.steps.accumulate import WeightedLossFn, accumulate_gradients
from jaxrlhf.steps.guard import all_finite, update_if
from jaxrlhf.steps.rl_config import ClippedEpochsConfig
from jaxrlhf.steps.sharding import shard_rows

Metrics = dict[str, jax.Array]

#: The loss metric that early stopping reads, and the one whose first-minibatch value is reported.
APPROX_KL, RATIO_ABS_DEV = "policy/approxkl_avg", "val/ratio_abs_dev"


class _Carry(NamedTuple):
    trainables: Any
    stopped: jax.Array  # bool: early stop triggered
    sums: Metrics  # metric sums over applied minibatches
    applied: jax.Array  # float32: minibatch updates applied
    skips: jax.Array  # float32: non-finite updates skipped
    first_ratio_abs_dev: jax.Array
    index: jax.Array  # int32: minibatches seen


def check_minibatches(where: str, rows: int, cfg: ClippedEpochsConfig) -> None:
    """ValueError unless ``rows`` split into ``num_minibatches`` × ``grad_accum_steps`` equal parts."""
    if rows % cfg.num_minibatches or (rows // cfg.num_minibatches) % cfg.grad_accum_steps:
        raise ValueError(f"{where}: batch size {rows} does not split into num_minibatches="
                         f"{cfg.num_minibatches} × grad_accum_steps={cfg.grad_accum_steps} equal parts")


def minibatch_epochs(
    loss_fn: WeightedLossFn,
    params_of: Callable[[Any], Any],
    apply: Callable[[Any, Any], Any],
    trainables: Any,
    batch: Any,
    key: jax.Array,
    cfg: ClippedEpochsConfig,
    averaged: Sequence[str],
    variances: Mapping[str, str] | None = None,
) -> tuple[Any, Metrics]:
    """Run ``cfg.epochs`` × ``cfg.num_minibatches`` guarded updates of ``trainables`` on ``batch``.

    loss_fn(params, minibatch) -> (loss, (weight, metrics)) as :func:`accumulate_gradients` takes it; its
    metrics must hold :data:`APPROX_KL` and :data:`RATIO_ABS_DEV` (mean |r − 1|); ``variances`` as
    :func:`accumulate_gradients` takes it (a variance metric → its mean metric). params_of(trainables) -> the
    params to differentiate; apply(trainables, grads) -> the trainables after one optimiser update.

    Returns the trainables and metrics: each of ``averaged`` (loss metrics, or "train/grad_norm", the norm
    before clipping) averaged over the applied minibatches; val/ratio_abs_dev_first_minibatch (the first
    minibatch's mean |r − 1|, before any update: 0 when sampling and training log-probs agree);
    train/skipped_updates (minibatch updates skipped as not finite); train/early_stopped; train/updates
    (minibatch updates applied).
    """
    rows = jax.tree.leaves(batch)[0].shape[0]
    check_minibatches("minibatch_epochs", rows, cfg)
    threshold = math.inf if cfg.target_kl_early_stop is None else 1.5 * cfg.target_kl_early_stop

    def train_minibatch(carry: _Carry, indices: jax.Array) -> _Carry:
        minibatch = shard_rows(jax.tree.map(lambda x: x[indices], batch))  # rows stay split
        loss, grads, metrics = accumulate_gradients(loss_fn, params_of(carry.trainables), minibatch,
                                                    cfg.grad_accum_steps, variances)
        metrics = {**metrics, "train/grad_norm": optax.tree.norm(grads)}
        finite = all_finite((loss, grads))
        stopped = carry.stopped | (metrics[APPROX_KL] > threshold)
        ok = finite & ~stopped
        trainables = update_if(ok, lambda t: apply(t, grads), carry.trainables)
        # where, not multiply: a skipped minibatch's metrics may be nan.
        sums = {k: carry.sums[k] + jnp.where(ok, metrics[k], 0.0) for k in carry.sums}
        first = jnp.where(carry.index == 0, metrics[RATIO_ABS_DEV], carry.first_ratio_abs_dev)
        skips = carry.skips + (~finite & ~stopped)
        return _Carry(trainables, stopped, sums, carry.applied + ok, skips, first, carry.index + 1)

    def minibatch_step(carry: _Carry, indices: jax.Array) -> tuple[_Carry, None]:
        # Once stopped, the remaining minibatches are not even computed.
        skip = lambda carry, _: carry._replace(index=carry.index + 1)
        return jax.lax.cond(carry.stopped, skip, train_minibatch, carry, indices), None

    def epoch_step(carry: _Carry, epoch_key: jax.Array) -> tuple[_Carry, None]:
        order = jax.random.permutation(epoch_key, rows).reshape(cfg.num_minibatches, -1)
        return jax.lax.scan(minibatch_step, carry, order)[0], None

    zero = jnp.zeros((), jnp.float32)
    init = _Carry(trainables, jnp.zeros((), bool), {k: zero for k in averaged}, zero, zero, zero,
                  jnp.zeros((), jnp.int32))
    carry, _ = jax.lax.scan(epoch_step, init, jax.random.split(key, cfg.epochs))
    applied = jnp.maximum(carry.applied, 1.0)
    metrics = {k: v / applied for k, v in carry.sums.items()}
    metrics |= {
        "val/ratio_abs_dev_first_minibatch": carry.first_ratio_abs_dev,
        "train/skipped_updates": carry.skips,
        "train/early_stopped": carry.stopped,
        "train/updates": carry.applied,
    }
    return carry.trainables, metrics

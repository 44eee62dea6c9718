"""Reward-model losses (pairwise, ranked, rated feedback) and the DPO family of direct preference losses.

Every loss returns (loss, metrics) and averages over the batch; `weights` [B] (1 for a real example,
0 for a padded one, or any non-negative weights) turns the mean into a weighted mean.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.rl.masked import masked_mean

Metrics = dict[str, chex.Array]
DPO_VARIANTS = ("sigmoid", "ipo", "hinge")


def _batch_weights(weights: chex.Array | None, like: chex.Array) -> chex.Array:
    if weights is None:
        return jnp.ones(like.shape, jnp.float32)
    chex.assert_equal_shape([weights, like])
    return weights


def pairwise_accuracy(
    r_chosen: chex.Array, r_rejected: chex.Array, weights: chex.Array | None = None
) -> chex.Array:
    """Share of pairs with r_chosen > r_rejected (ties count as wrong)."""
    chex.assert_equal_shape([r_chosen, r_rejected])
    return masked_mean(r_chosen > r_rejected, _batch_weights(weights, r_chosen))


def bradley_terry_loss(
    r_chosen: chex.Array,
    r_rejected: chex.Array,
    margin: chex.Numeric = 0.0,
    center_coef: chex.Numeric = 0.0,
    weights: chex.Array | None = None,
) -> tuple[chex.Array, Metrics]:
    """L = mean(−log σ(r_c − r_r − margin)) + center_coef·mean((r_c + r_r)²).

    r_chosen, r_rejected: [B]; margin a scalar or [B]. Metrics: "accuracy" (share with r_c > r_r),
    "margin" (mean r_c − r_r).
    """
    chex.assert_rank([r_chosen, r_rejected], 1)
    chex.assert_equal_shape([r_chosen, r_rejected])
    w = _batch_weights(weights, r_chosen)
    diff = r_chosen - r_rejected
    loss = masked_mean(-jax.nn.log_sigmoid(diff - margin), w)
    loss = loss + center_coef * masked_mean(jnp.square(r_chosen + r_rejected), w)
    metrics = {
        "accuracy": pairwise_accuracy(r_chosen, r_rejected, w),
        "margin": masked_mean(jax.lax.stop_gradient(diff), w),
    }
    return loss, metrics


def plackett_luce_loss(
    rewards: chex.Array, mask: chex.Array | None = None, weights: chex.Array | None = None
) -> tuple[chex.Array, Metrics]:
    """Plackett–Luce NLL of rankings: rewards [B, k], each row ordered best first.

    NLL_b = Σ_i [logsumexp_{j ≥ i} r_j − r_i] over the valid items (mask [B, k]; invalid items are left
    out wherever they sit), then the (weighted) mean over rows. For k = 2 this is the Bradley–Terry loss.
    A row with fewer than two valid items has NLL 0 but still counts in the mean: drop it with `weights`.
    Metrics: "accuracy" (share of valid pairs i < j ranked correctly, r_i > r_j).
    """
    chex.assert_rank(rewards, 2)
    rewards = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))
    valid = jnp.ones(rewards.shape, bool) if mask is None else mask.astype(bool)
    chex.assert_equal_shape([rewards, valid])
    # A finite stand-in for −inf keeps the reverse logsumexp and its gradient free of nan.
    filled = jnp.where(valid, rewards, jnp.finfo(rewards.dtype).min)
    tail_logsumexp = jax.lax.cumlogsumexp(filled, axis=1, reverse=True)
    nll = jnp.sum(jnp.where(valid, tail_logsumexp - filled, 0.0), axis=1)  # [B]
    w = _batch_weights(weights, nll)
    loss = masked_mean(nll, w)

    k = rewards.shape[1]
    earlier = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]  # pair (i, j) with i ranked above j
    pairs = earlier[None] & valid[:, :, None] & valid[:, None, :]
    correct = rewards[:, :, None] > rewards[:, None, :]
    pair_weights = pairs * w[:, None, None]
    return loss, {"accuracy": masked_mean(jax.lax.stop_gradient(correct), pair_weights)}


def rating_regression_loss(
    predictions: chex.Array, ratings: chex.Array, weights: chex.Array | None = None
) -> tuple[chex.Array, Metrics]:
    """Mean squared error L = mean((prediction − rating)²). Metrics: "mae" (mean |prediction − rating|)."""
    chex.assert_equal_shape([predictions, ratings])
    w = _batch_weights(weights, predictions)
    error = predictions - ratings
    return masked_mean(jnp.square(error), w), {"mae": masked_mean(jax.lax.stop_gradient(jnp.abs(error)), w)}


def dpo_loss(
    pi_chosen: chex.Array,
    pi_rejected: chex.Array,
    ref_chosen: chex.Array,
    ref_rejected: chex.Array,
    beta: chex.Numeric = 0.1,
    label_smoothing: chex.Numeric = 0.0,
    variant: str = "sigmoid",
    weights: chex.Array | None = None,
) -> tuple[chex.Array, Metrics]:
    """Direct preference losses on sequence log-probs (summed over response tokens), all [B].

    h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r));
    "sigmoid" (DPO; cDPO with label smoothing ε): −(1 − ε)·log σ(β·h) − ε·log σ(−β·h);
    "ipo": (h − 1/(2β))²;  "hinge" (SLiC): relu(1 − β·h).
    Metrics: "rewards/chosen" = mean β·(log π(y_c) − log π_ref(y_c)), "rewards/rejected" likewise,
    "rewards/accuracies" (share with chosen > rejected), "rewards/margins" (mean chosen − rejected).
    At the reference (step 1) every margin is the rounding difference of two compiled passes, so the
    accuracy there is noise and may change with the micro-batching, as TRL's does (a tolerance on the
    log-probs cannot fix it: the rounding scales with the logits, which a confident policy has large).
    """
    chex.assert_rank([pi_chosen, pi_rejected, ref_chosen, ref_rejected], 1)
    chex.assert_equal_shape([pi_chosen, pi_rejected, ref_chosen, ref_rejected])
    ref_chosen = jax.lax.stop_gradient(ref_chosen)
    ref_rejected = jax.lax.stop_gradient(ref_rejected)
    chosen_logratio = pi_chosen - ref_chosen
    rejected_logratio = pi_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if variant == "sigmoid":
        agree, disagree = jax.nn.log_sigmoid(beta * h), jax.nn.log_sigmoid(-beta * h)
        per_pair = -(1.0 - label_smoothing) * agree - label_smoothing * disagree
    elif variant == "ipo":
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    elif variant == "hinge":
        per_pair = jax.nn.relu(1.0 - beta * h)
    else:
        raise ValueError(f"dpo_loss: unknown variant {variant!r}; expected one of {DPO_VARIANTS}")
    w = _batch_weights(weights, h)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratio)
    metrics = {
        "rewards/chosen": masked_mean(chosen_rewards, w),
        "rewards/rejected": masked_mean(rejected_rewards, w),
        "rewards/accuracies": masked_mean(chosen_rewards > rejected_rewards, w),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, w),
    }
    return masked_mean(per_pair, w), metrics

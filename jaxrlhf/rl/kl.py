"""Per-token KL(π ‖ π_ref) estimators, KL-penalised token rewards, and the KL-in-the-loss alternative.

Values, with tokens y sampled from π and log r = log π_ref(y) − log π(y) (Schulman, "Approximating KL
divergence", 2020), as estimates of KL(π ‖ π_ref) = E_π[log π − log π_ref]:
k1 = −log r (unbiased, high variance, can be negative); k2 = ½(log r)² (biased, low variance);
k3 = (r − 1) − log r (unbiased, ≥ 0, low variance).

Gradients are another matter. Used as a *loss* on samples from π (the sample average of k(y), the
sampling itself not differentiated, as every KL-in-the-loss implementation does), the expected gradient
E_{y~π}[∇_θ k(y)] is:
- k1: E_π[∇log π] = 0. The constraint vanishes in expectation (only noise is left), whatever π_ref is.
- k2: E_π[(log π − log π_ref)·∇log π] = ∇KL(π ‖ π_ref), the KL the reward-penalty form optimises.
  Per sample ∇k2 = k1·∇log π: k2 *is* "k1 with its score-function term" (the REINFORCE gradient of
  KL(π ‖ π_ref), less the zero-mean ∇log π), so no separate estimator is needed for that.
- k3: E_π[(1 − r)·∇log π] = −Σ_y π_ref(y)·∇log π(y) = ∇KL(π_ref ‖ π), the reverse direction
  (mass-covering: it penalises π for putting little mass where π_ref has much, not the other way round).
Hence `kl_loss` defaults to k2 and rejects k1. In the reward (`kl_penalized_rewards`) the penalty is a
reward and the policy gradient supplies the score-function term itself; k1 is the classic choice there.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.rl.loss_aggregation import aggregate_loss

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_k1(logp: chex.Array, ref_logp: chex.Array) -> chex.Array:
    """k1 = log π − log π_ref = −log r. As a loss on samples from π its expected gradient is 0."""
    chex.assert_equal_shape([logp, ref_logp])
    return logp - ref_logp


def kl_k2(logp: chex.Array, ref_logp: chex.Array) -> chex.Array:
    """k2 = ½·(log r)², log r = log π_ref − log π.

    As a loss on samples from π its expected gradient is ∇KL(π ‖ π_ref) (per sample ∇k2 = k1·∇log π).
    """
    chex.assert_equal_shape([logp, ref_logp])
    return 0.5 * jnp.square(ref_logp - logp)


def kl_k3(logp: chex.Array, ref_logp: chex.Array) -> chex.Array:
    """k3 = (r − 1) − log r, r = π_ref/π; non-negative since eˣ ≥ 1 + x.

    As a loss on samples from π its expected gradient is ∇KL(π_ref ‖ π) (the reverse KL), not
    ∇KL(π ‖ π_ref), although its value is an unbiased estimate of KL(π ‖ π_ref).
    """
    chex.assert_equal_shape([logp, ref_logp])
    log_r = ref_logp - logp
    # expm1 keeps k3 accurate (and ≥ 0) when r is close to 1, where (r − 1) and log r nearly cancel.
    return jnp.maximum(jnp.expm1(log_r) - log_r, 0.0)


def kl_estimate(logp: chex.Array, ref_logp: chex.Array, estimator: str = "k1") -> chex.Array:
    """Per-token KL estimate by name: "k1", "k2" or "k3" (see `kl_k1`, `kl_k2`, `kl_k3`)."""
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k2":
        return kl_k2(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl_estimate: unknown estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_penalized_rewards(
    score: chex.Array,
    kl: chex.Array,
    mask: chex.Array,
    beta: chex.Numeric,
    eos_found: chex.Array,
    missing_eos_penalty: chex.Numeric = 0.0,
) -> tuple[chex.Array, chex.Array]:
    """Token rewards for PPO with the KL penalty in the reward.

    non_score_reward[b, t] = −β·kl[b, t]·m[b, t];
    rewards[b, t] = non_score_reward[b, t] + 1[t = last masked-in token of row b]·
                    (score[b] − missing_eos_penalty·1[not eos_found[b]]).
    score, eos_found: [B]; kl, mask: [B, T]. Returns (rewards, non_score_reward), both [B, T] and 0 on
    padding. A row with no masked-in token has no place for its score: the score is dropped and the row
    is all zeros.
    """
    chex.assert_rank([score, kl, mask, eos_found], [1, 2, 2, 1])
    chex.assert_equal_shape([kl, mask])
    chex.assert_equal_shape_prefix([score, kl, eos_found], 1)
    dtype = jnp.promote_types(jnp.result_type(score, kl), jnp.float32)
    real = mask.astype(bool)
    non_score_reward = jnp.where(real, -beta * kl.astype(dtype), 0.0).astype(dtype)

    positions = jnp.arange(kl.shape[1])
    last = jnp.max(jnp.where(real, positions, -1), axis=1)  # [B]; −1 for an empty row
    at_last = positions[None, :] == last[:, None]  # all False for an empty row
    final_score = score.astype(dtype) - jnp.where(eos_found.astype(bool), 0.0, missing_eos_penalty)
    rewards = non_score_reward + jnp.where(at_last, final_score[:, None], 0.0)
    return rewards.astype(dtype), non_score_reward


def kl_loss(
    logp: chex.Array,
    ref_logp: chex.Array,
    mask: chex.Array,
    estimator: str = "k2",
    *,
    loss_agg: str = "token_mean",
    norm_constant: chex.Numeric | None = None,
) -> chex.Array:
    """KL in the loss (GRPO style): L = aggregate_loss(k(logp, ref_logp), mask, loss_agg, norm_constant)
    (default "token_mean": masked_mean over every masked-in token).

    Gradients flow through `logp` only. On samples from π the expected gradient is ∇KL(π ‖ π_ref) for
    "k2" (the default) and ∇KL(π_ref ‖ π) for "k3" (see the module docstring). "k1" is rejected: its
    expected gradient is 0, so the KL term would constrain nothing.
    """
    if estimator == "k1":
        raise ValueError(
            "kl_loss: estimator 'k1' has zero expected gradient as a loss on samples from π "
            "(E_π[∇log π] = 0), so the KL term would constrain nothing; use 'k2' (gradient of KL(π‖π_ref)) "
            "or 'k3' (gradient of KL(π_ref‖π)), or put k1 in the reward"
        )
    chex.assert_equal_shape([logp, ref_logp, mask])
    per_token = kl_estimate(logp, jax.lax.stop_gradient(ref_logp), estimator)
    return aggregate_loss(per_token, mask, loss_agg, norm_constant)

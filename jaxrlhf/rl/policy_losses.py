"""Token log-probs, entropy, and the PPO / A2C policy and value losses.

Losses take arrays of any shape (typically [B, T]) with a same-shape mask and average over every
masked-in token of the whole batch (token-level mean, as TRL). Advantages, returns and old log-probs /
values are data: gradients never flow into them.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.rl.masked import masked_mean, masked_var

Metrics = dict[str, chex.Array]


def token_logprobs(logits: chex.Array, tokens: chex.Array, temperature: chex.Numeric = 1.0) -> chex.Array:
    """log softmax(logits / T)[token]: logits [..., V], tokens [...] (integers) → [...], float32 or wider.

    Every log-prob in the project (sampling, policy, reference, KL) goes through this one function so
    that the same tokens under the same parameters give bit-identical values (PPO ratio exactly 1).
    """
    chex.assert_rank(logits, tokens.ndim + 1)
    chex.assert_equal_shape_prefix([logits, tokens], tokens.ndim)
    chex.assert_type(tokens, int)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.take_along_axis(logprobs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_logits(logits: chex.Array) -> chex.Array:
    """H = −Σ_v p_v·log p_v with p = softmax(logits), over the last axis: [..., V] → [...].

    Entries at −inf (top-k / top-p masking) have p = 0 and contribute 0, in value and in gradient.
    At least one entry per position must be finite.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    # The inner where keeps 0·(−inf) = nan out of the value and of the gradient.
    safe_logp = jnp.where(p > 0, logp, 0.0)
    return -jnp.sum(p * safe_logp, axis=-1)


def ppo_policy_loss(
    logp: chex.Array,
    old_logp: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_eps: chex.Numeric = 0.2,
    dual_clip: chex.Numeric | None = None,
) -> tuple[chex.Array, Metrics]:
    """Clipped surrogate: L = masked_mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε))), r = exp(logp − old_logp).

    Dual clip (Ye et al. 2020), when `dual_clip` = c > 1: for A < 0 the per-token loss is
    min(max(−A·r, −A·clip(r)), −c·A), bounding the loss when r ≫ 1.
    Metrics: "clipfrac" (share of tokens with −A·clip(r) > −A·r), "approxkl" (½·mean((logp − old_logp)²)),
    "ratio" (mean r), "ratio_var" (population variance of r), all over masked-in tokens.
    """
    chex.assert_equal_shape([logp, old_logp, advantages, mask])
    old_logp = jax.lax.stop_gradient(old_logp)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = jnp.where(advantages < 0, jnp.minimum(per_token, -dual_clip * advantages), per_token)
    loss = masked_mean(per_token, mask)

    ratio_sg = jax.lax.stop_gradient(ratio)
    metrics = {
        "clipfrac": masked_mean(jax.lax.stop_gradient(clipped > unclipped), mask),
        "approxkl": 0.5 * masked_mean(jax.lax.stop_gradient(jnp.square(log_ratio)), mask),
        "ratio": masked_mean(ratio_sg, mask),
        "ratio_var": masked_var(ratio_sg, mask, unbiased=False),
    }
    return loss, metrics


def value_loss(
    values: chex.Array,
    old_values: chex.Array,
    returns: chex.Array,
    mask: chex.Array,
    clip_eps: chex.Numeric | None = 0.2,
) -> tuple[chex.Array, Metrics]:
    """Clipped value loss: ½·masked_mean(max((v − R)², (clip(v, v_old − ε, v_old + ε) − R)²)).

    `clip_eps=None` gives the unclipped ½·masked_mean((v − R)²). Metrics: "clipfrac" (share of tokens
    where the clipped error is the larger one; 0 when unclipped).
    """
    chex.assert_equal_shape([values, old_values, returns, mask])
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, mask), {"clipfrac": jnp.zeros((), unclipped.dtype)}
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, {"clipfrac": masked_mean(jax.lax.stop_gradient(clipped > unclipped), mask)}


def a2c_policy_loss(logp: chex.Array, advantages: chex.Array, mask: chex.Array) -> chex.Array:
    """Policy-gradient loss L = masked_mean(−A·log π), with A held constant (stop_gradient)."""
    chex.assert_equal_shape([logp, advantages, mask])
    return masked_mean(-jax.lax.stop_gradient(advantages) * logp, mask)


def a2c_value_loss(values: chex.Array, returns: chex.Array, mask: chex.Array) -> chex.Array:
    """L = masked_mean((V − R)²), R held constant. RL4LMs convention: no ½ (unlike `value_loss`)."""
    chex.assert_equal_shape([values, returns, mask])
    return masked_mean(jnp.square(values - jax.lax.stop_gradient(returns)), mask)

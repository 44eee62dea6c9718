"""Token log-probs, entropy, and the PPO / A2C policy and value losses.

Losses take arrays of any shape (typically [B, T]) with a same-shape mask. By default they average over
every masked-in token of the whole batch (token-level mean, as TRL); the policy losses take a named
`loss_agg` ("token_mean", "sequence_mean", "token_sum_norm"; see `loss_aggregation`). Advantages,
returns and old log-probs / values are data: gradients never flow into them.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.rl.loss_aggregation import aggregate_loss
from jaxrlhf.rl.masked import masked_count, masked_mean, masked_var

Metrics = dict[str, chex.Array]


@jax.named_scope("logprobs")  # a region of jaxrlhf.op_profile
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


@jax.named_scope("logprobs")
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


def token_logprobs_and_entropy(logits: chex.Array, tokens: chex.Array,
                               temperature: chex.Numeric = 1.0) -> tuple[chex.Array, chex.Array]:
    """``(token_logprobs(logits, tokens, T), entropy_from_logits(logits / T))``, the same values bit for bit,
    with one backward pass over the vocabulary instead of autodiff's several.

    With z = logits / T, p = softmax(z) and H = −Σ p·log p, the gradients are ∂ log p_y/∂z = 1[v = y] − p
    and ∂H/∂z = −p·(log p + H), so for output cotangents g_lp, g_H:
    ∂L/∂logits = (g_lp·1[v = y] − p·(g_lp + g_H·(log p + H))) / T. Entries with p = 0 get 0. No gradient
    flows to ``temperature``.
    """
    return _logprobs_and_entropy(logits, tokens, jnp.asarray(temperature, jnp.float32))


@jax.custom_vjp
def _logprobs_and_entropy(logits, tokens, temperature):
    return token_logprobs(logits, tokens, temperature), entropy_from_logits(logits / temperature)


def _logprobs_and_entropy_fwd(logits, tokens, temperature):
    return _logprobs_and_entropy(logits, tokens, temperature), (logits, tokens, temperature)


@jax.named_scope("logprobs")
def _logprobs_and_entropy_bwd(residuals, cotangents):
    logits, tokens, temperature = residuals
    g_lp, g_h = (c.astype(jnp.float32)[..., None] for c in cotangents)
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    safe_logp = jnp.where(p > 0, logp, 0.0)
    entropy = -jnp.sum(p * safe_logp, axis=-1, keepdims=True)
    onehot = jnp.arange(logits.shape[-1]) == tokens[..., None]
    dz = jnp.where(onehot, g_lp, 0.0) - p * (g_lp + g_h * (safe_logp + entropy))
    zero_tokens = np.zeros(tokens.shape, dtype=jax.dtypes.float0)
    return (dz / temperature).astype(logits.dtype), zero_tokens, jnp.zeros_like(temperature)


_logprobs_and_entropy.defvjp(_logprobs_and_entropy_fwd, _logprobs_and_entropy_bwd)


def _clip_metrics(ratio: chex.Array, advantages: chex.Array, mask: chex.Array, eps_low, eps_high) -> Metrics:
    """TRL's clip shares: tokens (or sequences) whose ratio is clipped where the clip removes the gradient.

    low: A < 0 and r < 1 − ε_low; high: A > 0 and r > 1 + ε_high; region: either.
    """
    low = jax.lax.stop_gradient((ratio < 1.0 - eps_low) & (advantages < 0))
    high = jax.lax.stop_gradient((ratio > 1.0 + eps_high) & (advantages > 0))
    return {
        "clip_ratio/low_mean": masked_mean(low, mask),
        "clip_ratio/high_mean": masked_mean(high, mask),
        "clip_ratio/region_mean": masked_mean(low | high, mask),
    }


def ppo_policy_loss(
    logp: chex.Array,
    old_logp: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_eps: chex.Numeric = 0.2,
    dual_clip: chex.Numeric | None = None,
    *,
    clip_eps_high: chex.Numeric | None = None,
    loss_agg: str = "token_mean",
    norm_constant: chex.Numeric | None = None,
) -> tuple[chex.Array, Metrics]:
    """Clipped surrogate (Schulman et al. 2017) with asymmetric clipping and a named loss aggregation.

    ℓ_t = max(−A_t·r_t, −A_t·clip(r_t, 1 − ε_low, 1 + ε_high)), r_t = exp(logp_t − old_logp_t);
    L = aggregate_loss(ℓ, mask, loss_agg, norm_constant) ("token_mean", the default, is
    masked_mean(ℓ) over every masked-in token of the batch; see `loss_aggregation`).
    ε_low = clip_eps; ε_high = clip_eps_high, None → clip_eps (symmetric). DAPO's "clip-higher"
    (Yu et al. 2025) takes ε_high > ε_low (0.2 / 0.28) so that a low-probability token with A > 0 can
    grow further before its gradient is cut, which keeps the policy's entropy from collapsing.
    Dual clip (Ye et al. 2020), when `dual_clip` = c > 1: for A < 0 the per-token loss is
    min(max(−A·r, −A·clip(r)), −c·A), bounding the loss when r ≫ 1.
    Metrics, all token means over masked-in tokens whatever `loss_agg`: "clipfrac" (share with
    −A·clip(r) > −A·r), "clip_ratio/low_mean" (A < 0 and r < 1 − ε_low), "clip_ratio/high_mean"
    (A > 0 and r > 1 + ε_high), "clip_ratio/region_mean" (either), "approxkl" (½·mean((logp − old_logp)²)),
    "ratio" (mean r), "ratio_var" (population variance of r).
    """
    chex.assert_equal_shape([logp, old_logp, advantages, mask])
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logp = jax.lax.stop_gradient(old_logp)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = jnp.where(advantages < 0, jnp.minimum(per_token, -dual_clip * advantages), per_token)
    loss = aggregate_loss(per_token, mask, loss_agg, norm_constant)

    ratio_sg = jax.lax.stop_gradient(ratio)
    metrics = {
        "clipfrac": masked_mean(jax.lax.stop_gradient(clipped > unclipped), mask),
        **_clip_metrics(ratio_sg, advantages, mask, clip_eps, eps_high),
        "approxkl": 0.5 * masked_mean(jax.lax.stop_gradient(jnp.square(log_ratio)), mask),
        "ratio": masked_mean(ratio_sg, mask),
        "ratio_var": masked_var(ratio_sg, mask, unbiased=False),
    }
    return loss, metrics


def gspo_policy_loss(
    logp: chex.Array,
    old_logp: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_eps: chex.Numeric = 3e-4,
    clip_eps_high: chex.Numeric | None = 4e-4,
) -> tuple[chex.Array, Metrics]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, clipped per sequence.

    s_i = exp((1/L_i)·Σ_t m_{i,t}·(logp_{i,t} − old_logp_{i,t})) (the geometric mean of the token ratios,
    L_i = Σ_t m_{i,t}); ℓ_i = max(−A_i·s_i, −A_i·clip(s_i, 1 − ε_low, 1 + ε_high));
    L = mean of ℓ_i over the rows with L_i > 0 (sequence-level by construction: no `loss_agg`).
    logp, old_logp, mask: [B, T]; advantages: [B], one per sequence (e.g. GRPO's group-normalised
    score). ε_low = clip_eps, ε_high = clip_eps_high (None → clip_eps); the paper's ranges are 3e-4 and
    4e-4, small because s_i averages the log-ratios of a whole response.
    ∇L_i = −A_i·s_i·(1/L_i)·Σ_t ∇logp_{i,t} where unclipped: every token of a response gets the same
    weight. Metrics, as `ppo_policy_loss` but over sequences: "clipfrac", "clip_ratio/low_mean",
    "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio" (mean s_i), "approxkl" (token-level).
    """
    chex.assert_rank([logp, old_logp, advantages, mask], [2, 2, 1, 2])
    chex.assert_equal_shape([logp, old_logp, mask])
    chex.assert_equal_shape_prefix([logp, advantages], 1)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logp = jax.lax.stop_gradient(old_logp)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = logp - old_logp
    seq_ratio = jnp.exp(masked_mean(log_ratio, mask, axis=-1))  # [B]; 1 for an empty row
    unclipped = -advantages * seq_ratio
    clipped = -advantages * jnp.clip(seq_ratio, 1.0 - clip_eps, 1.0 + eps_high)
    has_tokens = masked_count(mask, axis=-1) > 0
    loss = masked_mean(jnp.maximum(unclipped, clipped), has_tokens)

    ratio_sg = jax.lax.stop_gradient(seq_ratio)
    metrics = {
        "clipfrac": masked_mean(jax.lax.stop_gradient(clipped > unclipped), has_tokens),
        **_clip_metrics(ratio_sg, advantages, has_tokens, clip_eps, eps_high),
        "approxkl": 0.5 * masked_mean(jax.lax.stop_gradient(jnp.square(log_ratio)), mask),
        "ratio": masked_mean(ratio_sg, has_tokens),
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
    where the clip acts and the clipped error is the larger one; 0 when unclipped).
    """
    chex.assert_equal_shape([values, old_values, returns, mask])
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, mask), {"clipfrac": jnp.zeros((), unclipped.dtype)}
    # clip(v, v_old − ε, v_old + ε) is v itself, bit for bit, inside the band; v_old + clip(v − v_old, ±ε)
    # is not (rounding), which made an inactive clip count tokens in clipfrac and ε = ∞ differ from None.
    clipped_values = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
    clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, {"clipfrac": masked_mean(jax.lax.stop_gradient(clipped > unclipped), mask)}


def a2c_policy_loss(
    logp: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    *,
    loss_agg: str = "token_mean",
    norm_constant: chex.Numeric | None = None,
) -> chex.Array:
    """Policy-gradient (REINFORCE / A2C) loss: ℓ_t = −A_t·log π_t with A held constant (stop_gradient);
    L = aggregate_loss(ℓ, mask, loss_agg, norm_constant) (default "token_mean": masked_mean(ℓ)).
    """
    chex.assert_equal_shape([logp, advantages, mask])
    per_token = -jax.lax.stop_gradient(advantages) * logp
    return aggregate_loss(per_token, mask, loss_agg, norm_constant)


def a2c_value_loss(values: chex.Array, returns: chex.Array, mask: chex.Array) -> chex.Array:
    """L = masked_mean((V − R)²), R held constant. RL4LMs convention: no ½ (unlike `value_loss`)."""
    chex.assert_equal_shape([values, returns, mask])
    return masked_mean(jnp.square(values - jax.lax.stop_gradient(returns)), mask)

"""Logit transforms and token sampling: temperature, top-k, top-p (nucleus), greedy.

The order is the one Hugging Face uses: divide by the temperature, keep the top k, then keep the smallest
set of tokens whose probability reaches p. Excluded tokens get logit −inf and are never sampled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How next tokens are chosen. Frozen and hashable: a static argument of the jitted generate.

    temperature: logits ÷ T before sampling, and for the log-probs returned (T > 0).
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass (1.0 = off).
    greedy: take the arg-max instead of sampling (log-probs still use T).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Set every logit below the k-th largest of its row to −inf. logits [..., V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest prefix of tokens (by probability) whose mass reaches ``p``; −inf elsewhere.

    A token is kept when the mass of the tokens strictly more likely than it is < p, so the most likely
    token is always kept.
    """
    if p >= 1.0:
        return logits
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sampling_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """The logits tokens are drawn from: tempered, then top-k and top-p filtered. float32 [..., V]."""
    logits = logits.astype(jnp.float32) / config.temperature
    return top_p_filter(top_k_filter(logits, config.top_k), config.top_p)


def sample_tokens(key: jax.Array, logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per row of ``logits`` [B, V] → [B] int32.

    Sampling is by inverse CDF: one uniform u per row and the first token whose cumulative probability
    exceeds u·(total mass). That draws exactly from softmax(sampling_logits) with B random numbers instead of
    the B·V Gumbel variates ``jax.random.categorical`` needs, which dominate a decode step on a CPU. A token
    with probability 0 (filtered out) never increases the cumulative sum, so it can never be chosen.
    """
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(sampling_logits(logits, config), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, (*cdf.shape[:-1], 1), dtype=cdf.dtype) * cdf[..., -1:]
    return jnp.argmax(cdf > u, axis=-1).astype(jnp.int32)

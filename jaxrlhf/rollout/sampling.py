"""Logit transforms and token sampling: temperature, top-k, top-p (nucleus), greedy.

The order is the one Hugging Face uses: divide by the temperature, keep the top k, then keep the smallest
set of tokens whose probability reaches p. Excluded tokens get logit −inf and are never sampled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.config import is_whole_number

# The smallest sampling temperature: below it float32 cannot hold logits / T finely enough for log-probs
# (an ulp of |logit|/T reaches 1e-3 nats at T = 1e-3 and whole nats near 1e-7); greedy decoding is T → 0.
MIN_TEMPERATURE = 1e-3


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
        check_temperature("temperature", self.temperature)
        if not is_whole_number(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0: off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def check_temperature(key: str, temperature: float) -> None:
    """ValueError naming ``key`` unless ``temperature`` is a finite number >= :data:`MIN_TEMPERATURE`."""
    if not MIN_TEMPERATURE <= temperature < float("inf"):  # NaN fails too
        raise ValueError(f"{key} must be a finite number >= {MIN_TEMPERATURE:g} (use greedy decoding for "
                         f"T → 0), got {temperature}")


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Set every logit below the k-th largest of its row to −inf. logits [..., V]. Tokens tied with the
    k-th are all kept, as transformers' TopKLogitsWarper keeps them."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest prefix of tokens (by probability) whose mass reaches ``p``; −inf elsewhere.

    In the order of decreasing probability (ties by token id, as a stable sort gives them), a token is
    kept when the mass of the tokens before it is < p, so the most likely token is always kept; of tokens
    tied at the cut, only as many as that prefix needs are kept (the lowest ids; transformers keeps as
    many, the highest ids), never every tied token.
    """
    if p >= 1.0:
        return logits
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    # Ties at the cutoff: of the tied tokens, keep those within the prefix's n_keep places.
    above = jnp.sum(logits > cutoff, axis=-1, keepdims=True)
    tied = logits == cutoff
    tie_rank = jnp.cumsum(tied, axis=-1) - 1  # 0, 1, … over the tied tokens, by id
    keep = (logits > cutoff) | (tied & (tie_rank < n_keep - above))
    return jnp.where(keep, logits, -jnp.inf)


def sampling_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """The logits tokens are drawn from: tempered, then top-k and top-p filtered. float32 [..., V].

    The row's maximum is taken off before dividing by T (softmax does not change): the most likely token is
    then exactly 0 however XLA fuses the division, so a small T cannot overflow the sampler's weights."""
    logits = logits.astype(jnp.float32)
    logits = (logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))) / config.temperature
    return top_p_filter(top_k_filter(logits, config.top_k), config.top_p)


_BLOCK = 128  # tokens per block of the two-level inverse CDF


def inverse_cdf_sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Exact draws from softmax(logits) [B, V] (−inf allowed) with one uniform per row. → [B] int32.

    Two-level inverse CDF: the cumulative mass over blocks of 128 tokens picks a block, a cumulative sum
    inside that block picks the token. That is B random numbers and two short scans instead of the B·V
    Gumbel variates of ``jax.random.categorical`` or a V-long scan, which dominate a decode step on a CPU. A
    zero-probability token never increases a cumulative sum, so it can never be the first one to exceed u.
    """
    b, v = logits.shape
    blocks = -(-v // _BLOCK)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.pad(weights, ((0, 0), (0, blocks * _BLOCK - v))).reshape(b, blocks, _BLOCK)
    block_cdf = jnp.cumsum(weights.sum(-1), axis=-1)  # [B, blocks]
    u = jax.random.uniform(key, (b, 1), dtype=block_cdf.dtype) * block_cdf[:, -1:]
    block = jnp.argmax(block_cdf > u, axis=-1)  # the first block whose cumulative mass exceeds u
    before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, (block - 1)[:, None], -1)[:, 0], 0.0)
    inner_cdf = jnp.cumsum(jnp.take_along_axis(weights, block[:, None, None], 1)[:, 0], axis=-1)
    # Block sums and in-block sums round differently: keep the remainder inside [0, block mass).
    rest = jnp.clip(u[:, 0] - before, 0.0, inner_cdf[:, -1] * (1.0 - 2.0**-23))
    token = jnp.argmax(inner_cdf > rest[:, None], axis=-1)
    return (block * _BLOCK + token).astype(jnp.int32)


def sample_tokens(key: jax.Array, logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per row of ``logits`` [B, V] → [B] int32: the arg-max (greedy) or an exact draw from
    softmax(:func:`sampling_logits`)."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return inverse_cdf_sample(key, sampling_logits(logits, config))

"""Reward shaping: a sequence-level score placed as a token reward, and DAPO's soft over-long penalty."""

from __future__ import annotations

import chex
import jax.numpy as jnp


def score_at_last_token(score: chex.Array, mask: chex.Array) -> chex.Array:
    """A sequence-level score as a token reward at each row's last real token.

    r[b, t] = score[b]·1[t = max{t' : mask[b, t'] = 1}].
    score: [B], mask: [B, T] (1 for real tokens; a response is right-padded, so its last real token is
    where it ended — eos included) → rewards [B, T] float32, 0 everywhere else. A row without a real token
    gets no reward. Writing the score at column ``-1`` instead would put it on padding for every response
    that stopped early, and the mask would then drop it.
    """
    chex.assert_rank([score, mask], [1, 2])
    chex.assert_equal_shape_prefix([score, mask], 1)
    real = jnp.asarray(mask).astype(bool)
    positions = jnp.arange(real.shape[1])
    last = jnp.max(jnp.where(real, positions, -1), axis=1)  # [B]; −1 for an empty row
    at_last = positions[None, :] == last[:, None]
    return jnp.where(at_last, jnp.asarray(score, jnp.float32)[:, None], 0.0)


def soft_overlong_penalty(lengths: chex.Array, max_length: int, cache_length: int) -> chex.Array:
    """DAPO (Yu et al. 2025) soft over-long punishment, added to the score of each response.

    With L_max = max_length and L_cache = cache_length:
    R(L) = 0                                 if L ≤ L_max − L_cache,
    R(L) = ((L_max − L_cache) − L) / L_cache  if L_max − L_cache < L ≤ L_max   (from 0 down to −1),
    R(L) = −1                                if L > L_max.
    lengths: [...] (response tokens, integers or floats) → [...] float32; max_length and cache_length
    are Python ints (static under jit: they are checked at trace time). Linear inside the window so
    a response is told it is running long before truncation, instead of a cliff at L_max.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"soft_overlong_penalty: need 0 < cache_length ≤ max_length, got cache_length={cache_length}, "
            f"max_length={max_length}"
        )
    lengths = jnp.asarray(lengths).astype(jnp.float32)
    start = max_length - cache_length
    inside = (start - lengths) / cache_length
    return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_length, inside, -1.0))

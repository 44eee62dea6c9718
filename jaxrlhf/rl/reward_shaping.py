"""Reward shaping on a response's length: DAPO's soft over-long penalty."""

from __future__ import annotations

import chex
import jax.numpy as jnp


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

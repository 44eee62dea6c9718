"""Simulated annotators: pure functions that turn gold rewards into noisy human-like feedback.

Every function takes an explicit ``jax.random`` key, works elementwise over any leading batch shape, and
may be jitted (the temperature and noise levels may be traced scalars). A temperature of exactly 0 gives
a deterministic annotator whose ties are broken uniformly at random.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_nonnegative(name: str, value, upper: float | None = None) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    if not v >= 0.0 or (upper is not None and v > upper):
        bound = f"in [0, {upper:g}]" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be {bound}, got {value}")


def preference_probability(gold_1: jax.Array, gold_2: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """P(o₁ ≻ o₂) = σ((R*₁ − R*₂)/τ); at τ = 0 the step function 1[R*₁ > R*₂] with ties at ½."""
    _check_nonnegative("temperature", temperature)
    delta = jnp.asarray(gold_1, jnp.float32) - jnp.asarray(gold_2, jnp.float32)
    tau = jnp.asarray(temperature, jnp.float32)
    soft = jax.nn.sigmoid(delta / jnp.where(tau > 0, tau, 1.0))
    hard = 0.5 * (1.0 + jnp.sign(delta))
    return jnp.where(tau > 0, soft, hard)


def pairwise_preferences(
    key: jax.Array,
    gold_1: jax.Array,
    gold_2: jax.Array,
    temperature: float | jax.Array = 1.0,
    flip_prob: float | jax.Array = 0.0,
) -> jax.Array:
    """Bradley–Terry annotator: True where o₁ is preferred to o₂.

    label ~ Bernoulli(σ((R*₁ − R*₂)/τ)), then each label flipped independently with probability ε.
    Net rate of preferring o₁: (1 − ε)·p + ε·(1 − p).
    """
    _check_nonnegative("flip_prob", flip_prob, upper=1.0)
    p = preference_probability(gold_1, gold_2, temperature)
    label_key, flip_key = jax.random.split(key)
    # u < p with u in [0, 1): always True at p = 1, never at p = 0, a fair coin at a τ = 0 tie.
    label = jax.random.uniform(label_key, p.shape) < p
    flip = jax.random.uniform(flip_key, p.shape) < jnp.asarray(flip_prob, jnp.float32)
    return label ^ flip


def plackett_luce_rankings(
    key: jax.Array, gold: jax.Array, temperature: float | jax.Array = 1.0
) -> jax.Array:
    """Plackett–Luce annotator: a permutation of the last axis of ``gold`` [..., K], best first.

    P(ranking π) = Π_i exp(R*_{π_i}/τ) / Σ_{j≥i} exp(R*_{π_j}/τ), sampled with the Gumbel-max trick:
    π = argsort(−(R*/τ + G)), G ~ Gumbel(0, 1). At τ = 0, π sorts R* descending, ties in random order.
    Returns int32 [..., K].
    """
    _check_nonnegative("temperature", temperature)
    gold = jnp.asarray(gold, jnp.float32)
    if gold.ndim < 1:
        raise ValueError(f"gold: expected [..., K] scores, got shape {gold.shape}")
    gumbel = jax.random.gumbel(key, gold.shape)
    tau = jnp.asarray(temperature, jnp.float32)
    utility = jnp.where(tau > 0, gold / jnp.where(tau > 0, tau, 1.0) + gumbel, gold)
    # The Gumbel draw is also the tie-breaker, which only matters at τ = 0.
    return jnp.lexsort((-gumbel, -utility), axis=-1).astype(jnp.int32)


def quantised_ratings(
    key: jax.Array,
    gold: jax.Array,
    noise_std: float | jax.Array,
    num_levels: int,
    low: float,
    high: float,
) -> jax.Array:
    """Rating annotator: x = R* + σ·ε, ε ~ N(0, 1), quantised to the scale 1..k over [low, high].

    rating = clip(⌊k·(x − low)/(high − low)⌋ + 1, 1, k): level i covers
    [low + (i−1)·w, low + i·w) with w = (high − low)/k; values outside [low, high] go to the end levels.
    Returns int32 with the shape of ``gold``.
    """
    _check_nonnegative("noise_std", noise_std)
    if int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels}")
    if not float(high) > float(low):
        raise ValueError(f"rating range must have high > low, got low={low}, high={high}")
    gold = jnp.asarray(gold, jnp.float32)
    noisy = gold + jnp.asarray(noise_std, jnp.float32) * jax.random.normal(key, gold.shape)
    level = jnp.floor((noisy - low) / (high - low) * num_levels).astype(jnp.int32) + 1
    return jnp.clip(level, 1, int(num_levels))

"""Combining an ensemble of k proxy reward models (Coste et al. 2024, "Reward model ensembles help
mitigate overoptimization")."""

from __future__ import annotations

import chex
import jax.numpy as jnp

ENSEMBLE_METHODS = ("mean", "min", "uwo")


def ensemble_reward(
    rewards: chex.Array, method: str = "mean", uncertainty_coef: chex.Numeric = 0.5
) -> chex.Array:
    """Reduce rewards [k, ...] (one row per ensemble member) over the member axis.

    "mean": (1/k)·Σ_i R_i;  "min" (worst case): min_i R_i;
    "uwo" (uncertainty-weighted): mean − λ·(1/k)·Σ_i (R_i − mean)²  (population variance, λ =
    `uncertainty_coef`; ≈ 0.5 for best-of-n, 0.1 for PPO).
    """
    chex.assert_rank(rewards, {1, 2, 3})
    rewards = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))
    if method == "mean":
        return jnp.mean(rewards, axis=0)
    if method == "min":
        return jnp.min(rewards, axis=0)
    if method == "uwo":
        return jnp.mean(rewards, axis=0) - uncertainty_coef * jnp.var(rewards, axis=0)
    raise ValueError(f"ensemble_reward: unknown method {method!r}; expected one of {ENSEMBLE_METHODS}")

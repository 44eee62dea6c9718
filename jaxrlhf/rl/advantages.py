"""Generalised advantage estimation and discounted returns over one response (reverse `lax.scan`).

The functions work on one stream of T tokens with a right-padded mask (1 for the real tokens, then 0);
the `batched_*` wrappers `vmap` them over a leading batch axis. Past the last real token the value is the
bootstrap value: 0 when the episode ended (EOS), the critic's value of the final state when it was
truncated. Padded positions get advantage 0 and return 0. γ and λ may be traced scalars (vmappable).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _check_stream(rewards_t: chex.Array, mask_t: chex.Array, *others: chex.Array) -> None:
    chex.assert_rank([rewards_t, mask_t, *others], 1)
    chex.assert_equal_shape([rewards_t, mask_t, *others])


def _next_is_real(mask_t: chex.Array) -> chex.Array:
    """m_{t+1} as bool, with the position after the array's end counted as padding."""
    real = mask_t.astype(bool)
    return jnp.concatenate([real[1:], jnp.zeros((1,), bool)])


def gae_advantages(
    rewards_t: chex.Array,
    values_t: chex.Array,
    mask_t: chex.Array,
    bootstrap_value: chex.Numeric = 0.0,
    gamma: chex.Numeric = 1.0,
    lam: chex.Numeric = 0.95,
) -> tuple[chex.Array, chex.Array]:
    """GAE(γ, λ) advantages and returns for one right-padded response of length T.

    δ_t = r_t + γ·V_{t+1} − V_t, with V_{t+1} := bootstrap_value after the last real token;
    A_t = δ_t + γ·λ·A_{t+1} (A = 0 past the last real token); R_t = A_t + V_t.
    Returns (advantages_t, returns_t), both [T] and 0 on padding.
    """
    _check_stream(rewards_t, mask_t, values_t)
    chex.assert_rank(jnp.asarray(bootstrap_value), 0)
    dtype = jnp.promote_types(jnp.result_type(rewards_t, values_t), jnp.float32)
    rewards_t, values_t = rewards_t.astype(dtype), values_t.astype(dtype)
    real_t = mask_t.astype(bool)
    bootstrap_value = jnp.asarray(bootstrap_value, dtype)

    next_values_t = jnp.where(_next_is_real(mask_t), jnp.roll(values_t, -1), bootstrap_value)
    deltas_t = rewards_t + gamma * next_values_t - values_t
    decay = jnp.asarray(gamma * lam, dtype)

    def backward(advantage_next, inputs):
        delta, real = inputs
        # Padded steps reset the carry, so the last real token only sees the bootstrap value.
        advantage = jnp.where(real, delta + decay * advantage_next, 0.0).astype(dtype)
        return advantage, advantage

    _, advantages_t = jax.lax.scan(backward, jnp.zeros((), dtype), (deltas_t, real_t), reverse=True)
    returns_t = jnp.where(real_t, advantages_t + values_t, 0.0)
    return advantages_t, returns_t


def discounted_returns(
    rewards_t: chex.Array,
    mask_t: chex.Array,
    bootstrap_value: chex.Numeric = 0.0,
    gamma: chex.Numeric = 1.0,
) -> chex.Array:
    """Monte-Carlo / n-step returns G_t = r_t + γ·G_{t+1}, with G := bootstrap_value after the last real
    token; 0 on padding. Equals GAE(λ=1) advantages + values.
    """
    _check_stream(rewards_t, mask_t)
    chex.assert_rank(jnp.asarray(bootstrap_value), 0)
    dtype = jnp.promote_types(rewards_t.dtype, jnp.float32)
    rewards_t = rewards_t.astype(dtype)
    real_t = mask_t.astype(bool)
    bootstrap_value = jnp.asarray(bootstrap_value, dtype)
    gamma = jnp.asarray(gamma, dtype)

    def backward(return_next, inputs):
        reward, real, next_real = inputs
        tail = jnp.where(next_real, return_next, bootstrap_value)
        g = jnp.where(real, reward + gamma * tail, 0.0).astype(dtype)
        return g, g

    _, returns_t = jax.lax.scan(
        backward, jnp.zeros((), dtype), (rewards_t, real_t, _next_is_real(mask_t)), reverse=True
    )
    return returns_t


def _batch_bootstrap(bootstrap_values: chex.Numeric, rewards: chex.Array) -> chex.Array:
    chex.assert_rank(rewards, 2)
    return jnp.broadcast_to(jnp.asarray(bootstrap_values), rewards.shape[:1])


def batched_gae_advantages(
    rewards: chex.Array,
    values: chex.Array,
    mask: chex.Array,
    bootstrap_values: chex.Numeric = 0.0,
    gamma: chex.Numeric = 1.0,
    lam: chex.Numeric = 0.95,
) -> tuple[chex.Array, chex.Array]:
    """`gae_advantages` over [B, T] inputs; bootstrap_values is a scalar or [B]."""
    bootstrap = _batch_bootstrap(bootstrap_values, rewards)
    gae = jax.vmap(gae_advantages, in_axes=(0, 0, 0, 0, None, None))
    return gae(rewards, values, mask, bootstrap, gamma, lam)


def batched_discounted_returns(
    rewards: chex.Array,
    mask: chex.Array,
    bootstrap_values: chex.Numeric = 0.0,
    gamma: chex.Numeric = 1.0,
) -> chex.Array:
    """`discounted_returns` over [B, T] inputs; bootstrap_values is a scalar or [B]."""
    bootstrap = _batch_bootstrap(bootstrap_values, rewards)
    returns = jax.vmap(discounted_returns, in_axes=(0, 0, 0, None))
    return returns(rewards, mask, bootstrap, gamma)

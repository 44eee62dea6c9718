"""Generalised advantage estimation and discounted returns over one response (reverse `lax.scan`).

The functions work on one stream of T tokens with a mask (1 for the policy's tokens); the `batched_*`
wrappers `vmap` them over a leading batch axis. Masked positions are not steps: a real token's successor is
the next real token (so a masked stretch inside the stream, e.g. a tool's output between two turns, is
skipped, not treated as the episode's end), and past the last real token the value is the bootstrap
value: 0 when the episode ended (EOS), the critic's value of the final state when it was truncated.
Masked positions get advantage 0 and return 0. γ and λ may be traced scalars (vmappable).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _check_stream(rewards_t: chex.Array, mask_t: chex.Array, *others: chex.Array) -> None:
    chex.assert_rank([rewards_t, mask_t, *others], 1)
    chex.assert_equal_shape([rewards_t, mask_t, *others])


def gae_advantages(
    rewards_t: chex.Array,
    values_t: chex.Array,
    mask_t: chex.Array,
    bootstrap_value: chex.Numeric = 0.0,
    gamma: chex.Numeric = 1.0,
    lam: chex.Numeric = 0.95,
) -> tuple[chex.Array, chex.Array]:
    """GAE(γ, λ) advantages and returns for one response of length T (``mask_t`` marks its tokens).

    Over the real tokens t, with t' the next real one: δ_t = r_t + γ·V_{t'} − V_t, V_{t'} := bootstrap_value
    after the last real token; A_t = δ_t + γ·λ·A_{t'} (A := 0 after the last); R_t = A_t + V_t.
    Returns (advantages_t, returns_t), both [T] and 0 on masked positions.
    """
    _check_stream(rewards_t, mask_t, values_t)
    chex.assert_rank(jnp.asarray(bootstrap_value), 0)
    dtype = jnp.promote_types(jnp.result_type(rewards_t, values_t), jnp.float32)
    rewards_t, values_t = rewards_t.astype(dtype), values_t.astype(dtype)
    real_t = mask_t.astype(bool)
    gamma, decay = jnp.asarray(gamma, dtype), jnp.asarray(gamma * lam, dtype)

    def backward(carry, inputs):
        # carry: the value and advantage of the next real token (bootstrap value and 0 past the last);
        # a masked position passes it through unchanged.
        next_value, next_advantage = carry
        reward, value, real = inputs
        advantage = reward + gamma * next_value - value + decay * next_advantage
        carry = (jnp.where(real, value, next_value), jnp.where(real, advantage, next_advantage))
        return carry, jnp.where(real, advantage, 0.0)

    init = (jnp.asarray(bootstrap_value, dtype), jnp.zeros((), dtype))
    _, advantages_t = jax.lax.scan(backward, init, (rewards_t, values_t, real_t), reverse=True)
    returns_t = jnp.where(real_t, advantages_t + values_t, 0.0)
    return advantages_t, returns_t


def discounted_returns(
    rewards_t: chex.Array,
    mask_t: chex.Array,
    bootstrap_value: chex.Numeric = 0.0,
    gamma: chex.Numeric = 1.0,
) -> chex.Array:
    """Monte-Carlo / n-step returns over the real tokens: G_t = r_t + γ·G_{t'} (t' the next real token),
    with G := bootstrap_value after the last real token; 0 on masked positions. Equals GAE(λ=1)
    advantages + values.
    """
    _check_stream(rewards_t, mask_t)
    chex.assert_rank(jnp.asarray(bootstrap_value), 0)
    dtype = jnp.promote_types(rewards_t.dtype, jnp.float32)
    rewards_t = rewards_t.astype(dtype)
    real_t = mask_t.astype(bool)
    gamma = jnp.asarray(gamma, dtype)

    def backward(return_next, inputs):
        reward, real = inputs
        g = reward + gamma * return_next
        return jnp.where(real, g, return_next), jnp.where(real, g, 0.0)

    _, returns_t = jax.lax.scan(backward, jnp.asarray(bootstrap_value, dtype), (rewards_t, real_t),
                                reverse=True)
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

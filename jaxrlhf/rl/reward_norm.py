"""Reward normalisation (an affine gain/bias fitted once) and running moments for whitening across batches.

Both are optax-style: a NamedTuple state and pure functions over it.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax.numpy as jnp

from jaxrlhf.rl.masked import masked_count, masked_mean, masked_var


class RewardNormalization(NamedTuple):
    gain: chex.Array  # scalar
    bias: chex.Array  # scalar


def normalize_rewards(state: RewardNormalization, rewards: chex.Array) -> chex.Array:
    """r' = gain·r + bias."""
    return state.gain * rewards + state.bias


def _moments(x: chex.Array, mask: chex.Array) -> tuple[chex.Array, chex.Array]:
    """Masked mean and population variance of ``x``, computed around one of its masked-in values: a constant
    sample then centres to exactly 0 (around the float32 mean it leaves rounding error, and 0.1 × 7 had a
    "std" of 7e-9, i.e. a gain of 1.3e8 where the rule is gain 1)."""
    shift = jnp.ravel(x)[jnp.argmax(jnp.ravel(mask) != 0)]
    centred = x - shift
    return masked_mean(centred, mask) + shift, masked_var(centred, mask, unbiased=False)


def fit_reward_normalization(
    rewards: chex.Array,
    target_mean: chex.Numeric = 0.0,
    target_std: chex.Numeric = 1.0,
    mask: chex.Array | None = None,
) -> RewardNormalization:
    """Gain and bias such that gain·r + bias has mean `target_mean` and (population) std `target_std`
    on this sample (e.g. rewards of SFT-policy responses, Ziegler et al. 2019):

    gain = target_std / std(r),  bias = target_mean − gain·mean(r).
    A constant sample (std = 0) gets gain 1, so only the mean is moved.
    """
    rewards = jnp.asarray(rewards, jnp.promote_types(jnp.asarray(rewards).dtype, jnp.float32))
    mask = jnp.ones(rewards.shape, bool) if mask is None else mask
    mean, var = _moments(rewards, mask)
    std = jnp.sqrt(var)
    gain = jnp.where(std > 0, target_std / jnp.where(std > 0, std, 1.0), 1.0)
    return RewardNormalization(gain=gain, bias=target_mean - gain * mean)


class RunningMoments(NamedTuple):
    count: chex.Array  # float32 scalar: number of values seen
    mean: chex.Array  # float32 scalar
    m2: chex.Array  # float32 scalar: Σ (x − mean)² over the values seen


def running_moments_init() -> RunningMoments:
    """Empty statistics (count 0)."""
    zero = jnp.zeros((), jnp.float32)
    return RunningMoments(count=zero, mean=zero, m2=zero)


def running_moments_update(
    state: RunningMoments, x: chex.Array, mask: chex.Array | None = None
) -> RunningMoments:
    """Merge the masked-in entries of `x` (any shape) into the running statistics (Chan et al. 1979):

    n = n_a + n_b;  δ = mean_b − mean_a;  mean = mean_a + δ·n_b/n;  M2 = M2_a + M2_b + δ²·n_a·n_b/n.
    An empty batch leaves the state unchanged.
    """
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.ones(x.shape, bool) if mask is None else mask
    n_b = masked_count(mask)
    mean_b, var_b = _moments(x, mask)
    m2_b = var_b * n_b
    n = state.count + n_b
    safe_n = jnp.where(n > 0, n, 1.0)
    delta = mean_b - state.mean
    return RunningMoments(
        count=n,
        mean=state.mean + delta * n_b / safe_n,
        m2=state.m2 + m2_b + jnp.square(delta) * state.count * n_b / safe_n,
    )


def running_moments_var(state: RunningMoments, unbiased: bool = True) -> chex.Array:
    """Variance of everything seen: M2/n, or M2/(n − 1) when `unbiased` (0 with too few values)."""
    den = state.count - 1 if unbiased else state.count
    return jnp.where(den > 0, state.m2 / jnp.where(den > 0, den, 1.0), 0.0)


def running_moments_std(state: RunningMoments, unbiased: bool = True) -> chex.Array:
    """√`running_moments_var`."""
    return jnp.sqrt(running_moments_var(state, unbiased))


def running_moments_normalization(
    state: RunningMoments, target_mean: chex.Numeric = 0.0, target_std: chex.Numeric = 1.0
) -> RewardNormalization:
    """The gain/bias that maps the running mean/std to the targets (gain 1 while the std is 0)."""
    std = running_moments_std(state)
    gain = jnp.where(std > 0, target_std / jnp.where(std > 0, std, 1.0), 1.0)
    return RewardNormalization(gain=gain, bias=target_mean - gain * state.mean)

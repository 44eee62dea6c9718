"""Reward normalisation (fit gain/bias) and running moments (Chan merge) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.reward_norm import (
    RewardNormalization,
    fit_reward_normalization,
    normalize_rewards,
    running_moments_init,
    running_moments_normalization,
    running_moments_std,
    running_moments_update,
    running_moments_var,
)


def test_fit_hand_case():
    # r = [1, 3]: mean 2, population std 1 → gain 2/1, bias 5 − 2·2 = 1 for targets (5, 2)
    state = jax.jit(fit_reward_normalization)(jnp.array([1.0, 3.0]), 5.0, 2.0)
    assert state.gain == pytest.approx(2.0) and state.bias == pytest.approx(1.0)
    np.testing.assert_allclose(normalize_rewards(state, jnp.array([1.0, 3.0])), [3.0, 7.0])
    # a constant sample only moves the mean
    state = fit_reward_normalization(jnp.full(4, 3.0))
    assert state == RewardNormalization(gain=1.0, bias=-3.0)


def test_fit_hits_targets(maybe_jit):
    rng = np.random.default_rng(0)
    rewards = rng.normal(4.0, 3.0, 64).astype(np.float32)
    mask = rng.random(64) < 0.7
    rewards[~mask] = 1e6  # masked-out junk must not matter
    state = maybe_jit(fit_reward_normalization)(rewards, 0.5, 2.0, mask)
    out = np.asarray(normalize_rewards(state, rewards))[mask]
    assert out.mean() == pytest.approx(0.5, abs=1e-4) and out.std() == pytest.approx(2.0, rel=1e-4)


def test_running_moments_match_numpy(maybe_jit):
    rng = np.random.default_rng(1)
    batches = rng.normal(1.0, 2.0, (5, 3, 6)).astype(np.float32)
    masks = rng.random((5, 3, 6)) < 0.6
    masks[2] = False  # an empty batch changes nothing
    update = maybe_jit(running_moments_update)
    state = running_moments_init()
    for x, m in zip(batches, masks):
        state = update(state, x, m)
    seen = batches[masks].astype(np.float64)
    assert state.count == seen.size
    np.testing.assert_allclose(state.mean, seen.mean(), rtol=1e-5)
    np.testing.assert_allclose(running_moments_var(state), seen.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(running_moments_std(state, unbiased=False), seen.std(), rtol=1e-5)

    # the same through lax.scan
    def merge(state, batch_and_mask):
        return running_moments_update(state, *batch_and_mask), None

    scanned = jax.jit(lambda xs, ms: jax.lax.scan(merge, running_moments_init(), (xs, ms))[0])(batches, masks)
    np.testing.assert_allclose(scanned.m2, state.m2, rtol=1e-5)
    norm = running_moments_normalization(state)
    np.testing.assert_allclose(normalize_rewards(norm, seen.mean() + seen.std(ddof=1)), 1.0, rtol=1e-4)


def test_running_moments_edge_cases():
    state = running_moments_init()
    assert running_moments_var(state) == 0.0
    state = running_moments_update(state, jnp.array([2.0, 4.0]))  # no mask: every entry
    # mean 3, M2 = 1 + 1 = 2 → unbiased var 2, population var 1
    assert state.mean == 3.0 and state.m2 == 2.0 and running_moments_var(state, unbiased=False) == 1.0
    norm = running_moments_normalization(running_moments_update(running_moments_init(), jnp.ones(3)))
    assert norm.gain == 1.0 and norm.bias == -1.0


@pytest.mark.parametrize(("value", "n"), [(0.1, 7), (0.7, 64), (-1.3, 100), (0.7, 100_000)])
def test_a_constant_sample_gets_gain_one_where_float32_rounding_leaves_a_spread(maybe_jit, value, n):
    # 0.1 × 7 has a float32 mean that differs from 0.1 by rounding: its "std" (7e-9) made a gain of 1.3e8
    rewards = jnp.full(n, value, jnp.float32)
    state = maybe_jit(fit_reward_normalization)(rewards)
    assert state.gain == 1.0 and state.bias == -np.float32(value)
    np.testing.assert_array_equal(normalize_rewards(state, rewards), 0.0)
    mask = jnp.arange(n) % 2 == 1  # masked-out entries differ: only the masked-in constant counts
    state = maybe_jit(fit_reward_normalization)(jnp.where(mask, rewards, 5.0), 0.0, 1.0, mask)
    assert state.gain == 1.0 and state.bias == -np.float32(value)
    running = running_moments_init()
    for _ in range(3):
        running = maybe_jit(running_moments_update)(running, rewards)
    assert running.m2 == 0.0 and running_moments_normalization(running).gain == 1.0

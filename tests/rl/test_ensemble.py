"""Ensemble reward reductions: hand values and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.ensemble import ensemble_reward


def test_hand_case():
    # members × batch: column 0 = [1, 3] → mean 2, min 1, population var 1 → uwo(λ = 0.5) = 1.5
    rewards = jnp.array([[1.0, 0.0], [3.0, 0.0]])
    combine = jax.jit(ensemble_reward, static_argnames="method")
    np.testing.assert_allclose(combine(rewards, method="mean"), [2.0, 0.0])
    np.testing.assert_allclose(combine(rewards, method="min"), [1.0, 0.0])
    np.testing.assert_allclose(combine(rewards, method="uwo"), [1.5, 0.0])
    np.testing.assert_allclose(combine(rewards, method="uwo", uncertainty_coef=0.1), [1.9, 0.0])
    with pytest.raises(ValueError, match="'max'"):
        ensemble_reward(rewards, method="max")


def test_against_numpy(maybe_jit):
    rewards = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    combine = maybe_jit(ensemble_reward, static_argnames="method")
    np.testing.assert_allclose(combine(rewards, method="min"), rewards.min(0))
    uwo = rewards.mean(0) - 0.5 * rewards.var(0)
    np.testing.assert_allclose(combine(rewards, method="uwo"), uwo, rtol=1e-5, atol=1e-6)
    sweep = jax.jit(jax.vmap(lambda c: ensemble_reward(rewards, "uwo", c)))(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(
        sweep, [rewards.mean(0), rewards.mean(0) - rewards.var(0)], rtol=1e-5, atol=1e-6
    )

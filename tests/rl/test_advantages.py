"""GAE and discounted returns against plain-Python loops, by hand, and their λ = 1 identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.advantages import (
    batched_discounted_returns,
    batched_gae_advantages,
    discounted_returns,
    gae_advantages,
)


def reference_gae(rewards, values, lengths, bootstrap, gamma, lam):
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b, length in enumerate(lengths):
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1] if t + 1 < length else bootstrap[b]
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    mask = np.arange(rewards.shape[1])[None] < np.asarray(lengths)[:, None]
    return adv, np.where(mask, adv + values, 0.0)


def reference_returns(rewards, lengths, bootstrap, gamma):
    out = np.zeros_like(rewards, dtype=np.float64)
    for b, length in enumerate(lengths):
        g = bootstrap[b]
        for t in reversed(range(length)):
            g = rewards[b, t] + gamma * g
            out[b, t] = g
    return out


def random_rollout(seed=0, batch=5, time=7):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, time)).astype(np.float32)
    values = rng.normal(size=(batch, time)).astype(np.float32)
    lengths = np.array([time, 0, 1, 4, 6])[:batch]  # full, empty, one token, right-padded
    mask = (np.arange(time)[None] < lengths[:, None]).astype(np.float32)
    bootstrap = rng.normal(size=batch).astype(np.float32)
    return rewards, values, mask, lengths, bootstrap


def test_hand_case():
    # r = [0, 1, pad], V = [0.5, 0.2, pad], γ = 1, λ = 0.5, episode ended (bootstrap 0):
    # δ1 = 1 + 0 − 0.2 = 0.8, δ0 = 0 + 0.2 − 0.5 = −0.3; A1 = 0.8, A0 = −0.3 + 0.5·0.8 = 0.1
    # returns = A + V = [0.6, 1.0, 0]
    gae = jax.jit(gae_advantages)
    adv, ret = gae(
        jnp.array([0.0, 1.0, 9.0]), jnp.array([0.5, 0.2, 7.0]), jnp.array([1, 1, 0]), 0.0, 1.0, 0.5
    )
    np.testing.assert_allclose(adv, [0.1, 0.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(ret, [0.6, 1.0, 0.0], atol=1e-6)
    # truncated: bootstrap 2 → δ1 = 1 + 2 − 0.2 = 2.8, A0 = −0.3 + 0.5·2.8 = 1.1
    adv, _ = gae(jnp.array([0.0, 1.0, 9.0]), jnp.array([0.5, 0.2, 7.0]), jnp.array([1, 1, 0]), 2.0, 1.0, 0.5)
    np.testing.assert_allclose(adv, [1.1, 2.8, 0.0], atol=1e-6)
    # G = r + γ·G': γ = 0.5, r = [1, 2, 4], bootstrap 8 → G2 = 4 + 4 = 8, G1 = 2 + 4 = 6, G0 = 1 + 3 = 4
    ret = jax.jit(discounted_returns)(jnp.array([1.0, 2.0, 4.0]), jnp.ones(3), 8.0, 0.5)
    np.testing.assert_allclose(ret, [4.0, 6.0, 8.0])


def test_gae_against_loop(maybe_jit):
    rewards, values, mask, lengths, bootstrap = random_rollout()
    adv, ret = maybe_jit(batched_gae_advantages)(rewards, values, mask, bootstrap, 0.9, 0.8)
    ref_adv, ref_ret = reference_gae(rewards, values, lengths, bootstrap, 0.9, 0.8)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_discounted_returns_against_loop(maybe_jit):
    rewards, _, mask, lengths, bootstrap = random_rollout(seed=1)
    ret = maybe_jit(batched_discounted_returns)(rewards, mask.astype(bool), bootstrap, 0.95)
    expected = reference_returns(rewards, lengths, bootstrap, 0.95)
    np.testing.assert_allclose(ret, expected, rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_is_discounted_returns(maybe_jit):
    rewards, values, mask, _, bootstrap = random_rollout(seed=2)
    adv, ret = maybe_jit(batched_gae_advantages)(rewards, values, mask, bootstrap, 0.97, 1.0)
    mc = maybe_jit(batched_discounted_returns)(rewards, mask, bootstrap, 0.97)
    np.testing.assert_allclose(ret, mc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv + values * mask, mc, rtol=1e-5, atol=1e-5)


def test_vmap_over_lambda_and_gamma():
    rewards, values, mask, lengths, bootstrap = random_rollout(seed=3)
    lams = jnp.array([0.0, 0.5, 0.95])
    gammas = jnp.array([1.0, 0.9, 0.8])
    sweep = jax.vmap(lambda g, lam: batched_gae_advantages(rewards, values, mask, bootstrap, g, lam)[0])
    advs = jax.jit(sweep)(gammas, lams)
    for i, (g, lam) in enumerate(zip([1.0, 0.9, 0.8], [0.0, 0.5, 0.95])):
        expected = reference_gae(rewards, values, lengths, bootstrap, g, lam)[0]
        np.testing.assert_allclose(advs[i], expected, atol=1e-5)


def test_scalar_bootstrap_and_rank_errors():
    rewards, values, mask, lengths, _ = random_rollout(seed=4)
    adv, _ = batched_gae_advantages(rewards, values, mask)  # defaults: bootstrap 0, γ = 1, λ = 0.95
    ref, _ = reference_gae(rewards, values, lengths, np.zeros(5), 1.0, 0.95)
    np.testing.assert_allclose(adv, ref, atol=1e-5)
    with pytest.raises(AssertionError):
        gae_advantages(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask))
    with pytest.raises(AssertionError):
        discounted_returns(jnp.zeros(3), jnp.ones(4))


def test_a_masked_stretch_inside_the_stream_is_skipped_not_an_episode_end(maybe_jit):
    """A masked span between real tokens (e.g. a tool's output between two turns) is not a step: the real
    tokens are GAE'd as one stream, as if the span were cut out (the old code ended the episode there, so
    the final score never reached the first turn)."""
    rng = np.random.default_rng(3)
    batch, time = 6, 9
    rewards = rng.normal(size=(batch, time)).astype(np.float32)
    values = rng.normal(size=(batch, time)).astype(np.float32)
    mask = (rng.random((batch, time)) < 0.6).astype(np.float32)
    mask[0] = [1, 1, 0, 1, 1, 0, 0, 0, 0]
    bootstrap = rng.normal(size=batch).astype(np.float32)
    gamma, lam = 0.9, 0.8
    adv, ret = maybe_jit(batched_gae_advantages)(rewards, values, mask, bootstrap, gamma, lam)
    returns = maybe_jit(batched_discounted_returns)(rewards, mask, bootstrap, gamma)
    for b in range(batch):
        real = np.flatnonzero(mask[b])
        lengths = [len(real)]
        want_adv, want_ret = reference_gae(rewards[b:b + 1, real], values[b:b + 1, real], lengths,
                                           bootstrap[b:b + 1], gamma, lam)
        np.testing.assert_allclose(np.asarray(adv)[b, real], want_adv[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ret)[b, real], want_ret[0], rtol=1e-5, atol=1e-6)
        want_g = reference_returns(rewards[b:b + 1, real], lengths, bootstrap[b:b + 1], gamma)
        np.testing.assert_allclose(np.asarray(returns)[b, real], want_g[0], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(returns)[mask == 0] == 0)
    # by hand: mask [1, 1, 0, 1, 1], the score 1 at the end, V = 0, γ = 0.9, λ = 1: every real token sees it
    score, holed = jnp.array([0, 0, 0, 0, 1.0]), jnp.array([1, 1, 0, 1, 1])
    one = gae_advantages(score, jnp.zeros(5), holed, 0.0, 0.9, 1.0)[0]
    np.testing.assert_allclose(one, [0.9**3, 0.9**2, 0.0, 0.9, 1.0], rtol=1e-6)

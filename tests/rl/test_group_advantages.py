"""Critic-free advantages (GRPO, Dr. GRPO, RLOO, ReMax, REINFORCE++ and its baseline variant), DAPO's
dynamic-sampling filter: NumPy references, hand cases, bad group sizes, and RLOO's unbiasedness simulated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.group_advantages import (
    dr_grpo_advantages,
    dynamic_sampling_filter,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
    sequence_to_token_advantages,
    split_groups,
)


def random_scores(seed=0, prompts=5, n=4):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(prompts, n)).astype(np.float32)
    scores[1] = 0.7  # one group of equal scores
    return scores


def test_hand_case(maybe_jit):
    # group [1, 0, 0, 1]: mean ½, sample std √(4·¼/3) = √(1/3), population std ½
    scores = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    sign = np.array([[1, -1, -1, 1]])
    grpo = maybe_jit(grpo_advantages, static_argnames="unbiased_std")
    np.testing.assert_allclose(grpo(scores, 0.0), sign * 0.5 * np.sqrt(3), rtol=1e-6)
    np.testing.assert_allclose(grpo(scores, 0.0, unbiased_std=False), sign * 1.0, rtol=1e-6)
    np.testing.assert_allclose(maybe_jit(dr_grpo_advantages)(scores), sign * 0.5)
    # leave-one-out: 1 − (0 + 0 + 1)/3 = 2/3; 0 − 2/3 = −2/3 (= 4/3·(r − ½))
    np.testing.assert_allclose(maybe_jit(rloo_advantages)(scores), sign * 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(maybe_jit(remax_advantages)(scores, jnp.array([0.25])), scores - 0.25)


def test_against_numpy(maybe_jit):
    scores = random_scores()
    r = scores.astype(np.float64)
    mean = r.mean(1, keepdims=True)
    expected = (r - mean) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(maybe_jit(grpo_advantages)(scores), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maybe_jit(dr_grpo_advantages)(scores), r - mean, rtol=1e-5, atol=1e-6)
    loo = np.array([[r[p, i] - np.delete(r[p], i).mean() for i in range(r.shape[1])] for p in range(len(r))])
    np.testing.assert_allclose(maybe_jit(rloo_advantages)(scores), loo, rtol=1e-5, atol=1e-6)
    greedy = np.linspace(-1, 1, len(r)).astype(np.float32)
    np.testing.assert_allclose(maybe_jit(remax_advantages)(scores, greedy), r - greedy[:, None], rtol=1e-6)
    # the equal group: zero advantage everywhere, never nan
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
        np.testing.assert_array_equal(fn(scores)[1], np.zeros(4))


@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_group_of_one_is_an_error(fn):
    with pytest.raises(ValueError, match=r"group size 1 \(scores of shape \(3, 1\)\) is below 2"):
        fn(jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="group size 1"):
        jax.jit(fn)(jnp.zeros((3, 1)))  # at trace time, under jit too
    with pytest.raises(ValueError, match="group size 1"):
        reinforce_pp_baseline_advantages(jnp.zeros((3, 1)), jnp.zeros((3, 2)), jnp.ones((3, 2)), 0.1)
    remax_advantages(jnp.zeros((3, 1)), jnp.zeros(3))  # ReMax needs no group


def test_split_groups():
    x = jnp.arange(12.0)
    np.testing.assert_array_equal(split_groups(x, 4), np.arange(12.0).reshape(3, 4))
    assert split_groups(jnp.zeros((6, 5)), 3).shape == (2, 3, 5)
    with pytest.raises(ValueError, match=r"shape \(10,\) is not divisible into groups of 4"):
        split_groups(jnp.zeros(10), 4)
    with pytest.raises(ValueError, match="group size must be ≥ 1"):
        split_groups(x, 0)


def test_rloo_policy_gradient_is_unbiased():
    """On a categorical π = softmax(θ) with rewards r(y), the group estimate (1/n)·Σ_i A_i·∇log π(y_i)
    averages to ∇E_π[r] with RLOO's A; with the plain group mean (which includes r_i) it averages to
    (n − 1)/n of it."""
    theta = jnp.array([0.2, -0.5, 0.9, 0.0])
    reward = jnp.array([1.0, 0.0, 2.0, -0.5])
    pi = jax.nn.softmax(theta)
    exact = np.asarray(pi * (reward - jnp.sum(pi * reward)))  # ∇_θ Σ_y π(y)·r(y)
    groups, n = 50_000, 4
    samples = jax.random.categorical(jax.random.PRNGKey(0), theta, shape=(groups, n))
    score = jax.nn.one_hot(samples, 4) - pi  # ∇_θ log π(y) = e_y − π, [groups, n, 4]

    def estimates(estimator):
        adv = jax.jit(estimator)(reward[samples])  # [groups, n]
        return np.asarray(jnp.mean(adv[..., None] * score, axis=1))  # [groups, 4]

    rloo = estimates(rloo_advantages)
    mean, stderr = rloo.mean(0), rloo.std(0) / np.sqrt(groups)
    assert np.all(np.abs(mean - exact) < 4 * stderr), (mean, exact, stderr)
    centred = estimates(dr_grpo_advantages)
    mean, stderr = centred.mean(0), centred.std(0) / np.sqrt(groups)
    assert np.all(np.abs(mean - (n - 1) / n * exact) < 4 * stderr), (mean, exact, stderr)
    assert np.any(np.abs(mean - exact) > 8 * stderr)  # the bias is resolved at this sample size


def reference_reinforce_pp(scores, kl, mask, beta, gamma):
    rewards = -beta * kl * mask
    returns = np.zeros_like(rewards, dtype=np.float64)
    for b in range(len(scores)):
        idx = np.nonzero(mask[b])[0]
        if idx.size:
            rewards[b, idx[-1]] += scores[b]
        g = 0.0
        for t in reversed(idx):
            g = rewards[b, t] + gamma * g
            returns[b, t] = g
    m = mask.astype(bool)
    mean, var = returns[m].mean(), returns[m].var(ddof=1)
    return np.where(m, (returns - mean) / np.sqrt(var + 1e-8), 0.0)


def reinforce_batch(seed=1, prompts=3, n=2, time=6):
    rng = np.random.default_rng(seed)
    batch = prompts * n
    lengths = np.array([6, 2, 4, 1, 5, 3])[:batch]
    mask = (np.arange(time)[None] < lengths[:, None]).astype(np.float32)
    kl = rng.normal(0.1, 0.3, (batch, time)).astype(np.float32)
    scores = rng.normal(size=batch).astype(np.float32)
    return scores, kl, mask


def test_reinforce_pp_hand_case():
    # one row of 2 tokens, β = 1, kl = [0.5, 1]: rewards [−0.5, 3 − 1] → returns [1.5, 2];
    # second row of 1 token, score 0, kl 0 → return 0. Returns over the batch {1.5, 2, 0}: mean 7/6,
    # unbiased var ((1/3)² + (5/6)² + (7/6)²)/2 = 13/12
    scores, kl = jnp.array([3.0, 0.0]), jnp.array([[0.5, 1.0], [0.0, 5.0]])
    mask = jnp.array([[1, 1], [1, 0]])
    adv = jax.jit(reinforce_pp_advantages)(scores, kl, mask, 1.0)
    expected = (np.array([[1.5, 2.0], [0.0, 7 / 6]]) - 7 / 6) / np.sqrt(13 / 12)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)


def test_reinforce_pp_against_numpy(maybe_jit):
    scores, kl, mask = reinforce_batch()
    for gamma in (1.0, 0.9):
        adv = maybe_jit(reinforce_pp_advantages)(scores, kl, mask, 0.05, gamma)
        expected = reference_reinforce_pp(scores, kl, mask, 0.05, gamma)
        np.testing.assert_allclose(adv, expected, rtol=1e-4, atol=1e-5)
        assert np.mean(np.asarray(adv)[mask.astype(bool)]) == pytest.approx(0.0, abs=1e-6)


def test_reinforce_pp_baseline_against_numpy(maybe_jit):
    scores, kl, mask = reinforce_batch()
    grouped = scores.reshape(3, 2)
    centred = (grouped - grouped.mean(1, keepdims=True)).reshape(-1)
    adv = maybe_jit(reinforce_pp_baseline_advantages)(grouped, kl, mask, 0.05)
    expected = reference_reinforce_pp(centred, kl, mask, 0.05, 1.0)
    np.testing.assert_allclose(adv, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="kl has 5 rows, scores"):
        reinforce_pp_baseline_advantages(grouped, kl[:5], mask[:5], 0.05)


def test_dynamic_sampling_filter(maybe_jit):
    scores = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [2.0, 2.0, 2.001]])
    keep, dropped = maybe_jit(dynamic_sampling_filter)(scores)
    np.testing.assert_array_equal(keep, [False, True, False, True])
    assert dropped == 2 and dropped.dtype == jnp.int32
    keep, dropped = dynamic_sampling_filter(scores, atol=0.01)
    np.testing.assert_array_equal(keep, [False, True, False, False])
    assert dropped == 3


def test_sequence_to_token_advantages(maybe_jit):
    adv = jnp.array([2.0, -1.0])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(maybe_jit(sequence_to_token_advantages)(adv, mask), [[2, 2, 0], [-1, 0, 0]])

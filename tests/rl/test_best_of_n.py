"""Best-of-n KL (the bound, the exact discrete KL, the sample estimate) and the unbiased best-of-n
estimator, against brute-force enumeration."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.best_of_n import (
    best_of_n_curve,
    best_of_n_distribution,
    best_of_n_estimate,
    best_of_n_kl,
    best_of_n_kl_estimate,
    best_of_n_kl_exact,
    best_of_n_weights,
)

PROXY = np.array([0.3, -1.2, 2.5, 0.9, -0.4, 1.7, 0.1, -2.0])
GOLD = np.array([1.0, -0.5, 0.2, 2.0, 0.0, 3.0, -1.0, 0.5])


def brute_force(proxy, gold, n):
    """Average, over every n-subset, of the gold score of its highest-proxy member."""
    golds = [
        gold[max(subset, key=lambda i: proxy[i])] for subset in itertools.combinations(range(len(proxy)), n)
    ]
    return np.mean(golds)


def test_kl():
    # n = 1: 0; n = 2: log 2 − 1/2; n = 4: log 4 − 3/4
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(np.log(2) - 0.5)
    np.testing.assert_allclose(
        jax.jit(best_of_n_kl)(jnp.array([1.0, 4.0])), [0.0, np.log(4) - 0.75], rtol=1e-6
    )


@pytest.mark.parametrize("n", range(1, 9))
def test_estimate_equals_enumeration_numpy(n):
    assert best_of_n_estimate(PROXY, GOLD, n) == pytest.approx(brute_force(PROXY, GOLD, n), rel=1e-12)


def test_estimate_jax_and_edge_cases(maybe_jit):
    proxy, gold = jnp.asarray(PROXY, jnp.float32), jnp.asarray(GOLD, jnp.float32)
    curve = np.asarray(maybe_jit(best_of_n_curve)(proxy, gold, jnp.arange(1, 9)))
    np.testing.assert_allclose(curve, [brute_force(PROXY, GOLD, n) for n in range(1, 9)], rtol=1e-5)
    assert curve[0] == pytest.approx(GOLD.mean(), rel=1e-6)  # n = 1: the mean
    assert curve[-1] == pytest.approx(GOLD[np.argmax(PROXY)])  # n = N: gold of the top proxy
    estimate = maybe_jit(best_of_n_estimate)(proxy, gold, 3)
    assert estimate == pytest.approx(brute_force(PROXY, GOLD, 3), rel=1e-5)
    with pytest.raises(ValueError, match="n = 9"):
        best_of_n_estimate(PROXY, GOLD, 9)
    with pytest.raises(ValueError, match="shapes"):
        best_of_n_estimate(PROXY, GOLD[:4], 2)


def test_weights_are_stable_for_large_n():
    # exact rational weights for N = 1000, n = 64 against float64 NumPy and float32 JAX
    big_n, n = 1000, 64
    exact = np.array([math.comb(i - 1, n - 1) / math.comb(big_n, n) for i in range(1, big_n + 1)])
    w64 = best_of_n_weights(big_n, n)
    w32 = np.asarray(jax.jit(best_of_n_weights, static_argnums=(0, 2))(big_n, n, jnp))
    assert w64.sum() == pytest.approx(1.0, rel=1e-12) and w32.sum() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(w64, exact, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(w32, exact, rtol=0, atol=1e-6 * exact.max())
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=big_n)
    gold = proxy + rng.normal(size=big_n)
    np.testing.assert_allclose(
        jax.jit(best_of_n_estimate)(jnp.asarray(proxy, jnp.float32), jnp.asarray(gold, jnp.float32), n),
        exact @ gold[np.argsort(proxy)],
        rtol=1e-5,
    )


# ------------------------------------------------------------------ KL of best-of-n, discrete base policy

PROBS = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
SCORES = np.array([1.0, 2.0, 2.0, 0.5, 3.0])  # responses 1 and 2 tie


def enumerate_best_of_n(probs, scores, n):
    """π_n by enumerating every n-tuple of draws; a tie at the top is broken uniformly among the draws."""
    pi = np.zeros_like(probs)
    for draws in itertools.product(range(len(probs)), repeat=n):
        weight = np.prod(probs[list(draws)])
        top = max(scores[i] for i in draws)
        winners = [i for i in draws if scores[i] == top]
        for i in winners:
            pi[i] += weight / len(winners)
    return pi


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_exact_distribution_and_kl_against_enumeration(n):
    pi = enumerate_best_of_n(PROBS, SCORES, n)
    np.testing.assert_allclose(best_of_n_distribution(PROBS, SCORES, n), pi, rtol=1e-12, atol=1e-15)
    assert best_of_n_kl_exact(PROBS, SCORES, n) == pytest.approx(np.sum(pi * np.log(pi / PROBS)), abs=1e-12)
    # a zero-probability response stays at zero and changes nothing
    probs0, scores0 = np.append(PROBS, 0.0), np.append(SCORES, 9.0)
    assert best_of_n_distribution(probs0, scores0, n)[-1] == 0.0
    assert best_of_n_kl_exact(probs0, scores0, n) == pytest.approx(best_of_n_kl_exact(PROBS, SCORES, n))


def test_exact_kl_against_the_bound():
    ns = np.array([1, 2, 8, 64])
    # all-distinct, continuous-like scores (20 000 equally likely responses): the bound is attained
    k = 20_000
    continuous = best_of_n_kl_exact(np.full(k, 1 / k), np.random.default_rng(0).permutation(k), ns)
    np.testing.assert_allclose(continuous, best_of_n_kl(ns), atol=2e-4)
    # two equally likely score levels, n = 2: Q = (1/4, 3/4), KL = ¾·log(3/2) + ¼·log(1/2)
    two_levels = best_of_n_kl_exact([0.25, 0.25, 0.5], [0.0, 0.0, 1.0], 2)
    assert two_levels == pytest.approx(0.75 * np.log(1.5) + 0.25 * np.log(0.5)) and two_levels < 0.7 * 0.1931
    # heavy ties: the top level has mass 0.2, so KL → −log 0.2 = 1.61 however large n is (bound 3.17 at 64)
    ties = best_of_n_kl_exact([0.5, 0.3, 0.2], [0.0, 1.0, 2.0], ns)
    assert ties[-1] == pytest.approx(-np.log(0.2), abs=1e-5) and ties[-1] < 0.55 * best_of_n_kl(64)
    assert np.all(ties <= best_of_n_kl(ns) + 1e-12) and ties[0] == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="sum to 1"):
        best_of_n_kl_exact([0.5, 0.6], [0.0, 1.0], 2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl_exact(PROBS, SCORES, 0)


def test_estimate_converges_to_the_exact_kl():
    rng = np.random.default_rng(1)
    k = 30
    probs = rng.dirichlet(np.full(k, 0.3))  # a peaked policy, as a low-entropy language model is
    scores = rng.normal(size=k).round(1)  # with some ties between distinct responses
    ns = np.array([2, 16])
    exact = best_of_n_kl_exact(probs, scores, ns)
    assert np.all(exact < best_of_n_kl(ns))
    errors = []
    for num in (64, 640, 6400, 64_000):
        samples = rng.choice(k, size=(20, num), p=probs)  # 20 independent estimates per N
        estimate = best_of_n_kl_estimate(scores[samples], ns)  # [20, 2]
        assert estimate.shape == (20, 2) and np.all(estimate <= best_of_n_kl(ns) + 1e-12)
        errors.append(np.abs(estimate - exact).mean(axis=0) / exact)
    errors = np.array(errors)  # [4 sample sizes, 2 n]
    assert np.all(np.diff(errors, axis=0) < 0)  # shrinks as N grows
    assert np.all(errors[-1] < 0.01)


def test_estimate_for_continuous_scores_and_ties():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(4, 128))  # all distinct: the empirical distribution's KL, close to the bound
    estimate = best_of_n_kl_estimate(scores, [2, 64])
    i = np.arange(1, 129)
    q = [(i / 128) ** n - ((i - 1) / 128) ** n for n in (2, 64)]  # best-of-n over 128 equal atoms
    uniform_128 = [np.sum(q_n * np.log(128 * q_n)) for q_n in q]
    np.testing.assert_allclose(estimate, np.tile(uniform_128, (4, 1)), rtol=1e-10)
    assert estimate[0, 1] == pytest.approx(3.1641, abs=1e-4)
    assert best_of_n_kl(64) == pytest.approx(3.1745, abs=1e-4)
    # identical scores: best-of-n is the base policy, KL 0
    np.testing.assert_allclose(best_of_n_kl_estimate(np.zeros(50), [1, 8]), 0.0, atol=1e-15)
    # one response written 3 times in 4 with float noise in its scores: groups merge it back into one level
    responses = rng.choice(2, size=400, p=[0.75, 0.25])
    clean = np.where(responses == 0, 1.0, 0.0)
    noisy = clean + rng.normal(0, 1e-7, 400)
    merged = best_of_n_kl_estimate(noisy, 4, groups=responses)
    assert merged == pytest.approx(best_of_n_kl_estimate(clean, 4), abs=1e-6)
    assert best_of_n_kl_estimate(noisy, 4) > 2 * merged  # without groups the noise splits the levels
    with pytest.raises(ValueError, match=r"groups \(10,\) must match scores"):
        best_of_n_kl_estimate(noisy, 4, groups=responses[:10])

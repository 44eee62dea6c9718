"""Simulated annotators reproduce their stated statistics; exact values where they are deterministic."""

import itertools
import math

import jax
import numpy as np
import pytest

from jaxrlhf.oracle import (
    pairwise_preferences,
    plackett_luce_rankings,
    preference_probability,
    quantised_ratings,
)

N = 20_000  # samples per statistic; 4.5 standard errors is the tolerance


def assert_rate(observed, expected, n=N):
    se = math.sqrt(max(expected * (1 - expected), 1e-12) / n)
    assert abs(observed - expected) <= 4.5 * se + 1e-9, (observed, expected)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("jit", [False, True])
def test_preference_probability(jit):
    fn = jax.jit(preference_probability) if jit else preference_probability
    g1, g2 = np.array([0.0, 1.0, 0.3, -2.0]), np.array([0.0, 0.0, 0.8, 1.0])
    np.testing.assert_allclose(fn(g1, g2, 0.5), sigmoid((g1 - g2) / 0.5), rtol=1e-6)
    np.testing.assert_array_equal(fn(g1, g2, 0.0), [0.5, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("jit", [False, True])
def test_pairwise_rate_matches_bradley_terry(jit):
    fn = jax.jit(pairwise_preferences) if jit else pairwise_preferences
    tau, deltas = 0.5, np.array([-1.0, 0.0, 0.25, 1.0])
    gold_1 = np.repeat(deltas[:, None], N, axis=1)
    labels = np.asarray(fn(jax.random.key(0), gold_1, np.zeros_like(gold_1), tau, 0.0))
    assert labels.dtype == bool and labels.shape == gold_1.shape
    for delta, row in zip(deltas, labels):
        assert_rate(row.mean(), sigmoid(delta / tau))
    # with flips the rate is (1 − ε)p + ε(1 − p)
    eps = 0.2
    flipped = np.asarray(fn(jax.random.key(1), gold_1, np.zeros_like(gold_1), tau, eps))
    for delta, row in zip(deltas, flipped):
        p = sigmoid(delta / tau)
        assert_rate(row.mean(), (1 - eps) * p + eps * (1 - p))


def test_pairwise_zero_temperature_and_flip_rate():
    key = jax.random.key(2)
    gold_1 = np.array([1.0, -1.0] * (N // 2))
    exact = np.asarray(pairwise_preferences(key, gold_1, np.zeros(N), 0.0, 0.0))
    np.testing.assert_array_equal(exact, gold_1 > 0)  # deterministic
    ties = np.asarray(pairwise_preferences(key, np.zeros(N), np.zeros(N), 0.0, 0.0))
    assert_rate(ties.mean(), 0.5)  # ties broken by a fair coin
    eps = 0.15
    noisy = np.asarray(pairwise_preferences(key, gold_1, np.zeros(N), 0.0, eps))
    assert_rate((noisy != exact).mean(), eps)
    again = np.asarray(jax.jit(pairwise_preferences)(key, gold_1, np.zeros(N), 0.0, eps))
    np.testing.assert_array_equal(noisy, again)  # same key, same labels, with or without jit


def test_pairwise_bad_arguments():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        pairwise_preferences(jax.random.key(0), np.zeros(2), np.zeros(2), -1.0)
    with pytest.raises(ValueError, match=r"flip_prob must be in \[0, 1\]"):
        pairwise_preferences(jax.random.key(0), np.zeros(2), np.zeros(2), 1.0, 1.5)


@pytest.mark.parametrize("jit", [False, True])
def test_plackett_luce_frequencies(jit):
    fn = jax.jit(plackett_luce_rankings) if jit else plackett_luce_rankings
    tau, gold = 0.7, np.array([0.0, 0.5, 1.0, 2.0], np.float32)
    perms = np.asarray(fn(jax.random.key(3), np.tile(gold, (N, 1)), tau))
    assert perms.dtype == np.int32
    np.testing.assert_array_equal(np.sort(perms, axis=1), np.tile(np.arange(4), (N, 1)))
    weights = np.exp(gold / tau)
    first = weights / weights.sum()
    for i in range(4):
        assert_rate((perms[:, 0] == i).mean(), first[i])
    # the probability of one full ranking follows the Plackett–Luce product
    ranking = (3, 1, 2, 0)
    prob = 1.0
    for i, item in enumerate(ranking):
        prob *= weights[item] / weights[list(ranking[i:])].sum()
    assert_rate(np.all(perms == ranking, axis=1).mean(), prob)


def test_plackett_luce_zero_temperature():
    gold = np.array([[0.2, 0.9, -0.5, 0.4]] * 4)
    perms = np.asarray(plackett_luce_rankings(jax.random.key(4), gold, 0.0))
    np.testing.assert_array_equal(perms, np.tile([1, 3, 0, 2], (4, 1)))
    tied = np.asarray(plackett_luce_rankings(jax.random.key(5), np.zeros((6000, 3)), 0.0))
    counts = {p: np.all(tied == p, axis=1).mean() for p in itertools.permutations(range(3))}
    for rate in counts.values():
        assert_rate(rate, 1 / 6, n=6000)


@pytest.mark.parametrize("jit", [False, True])
def test_ratings_quantisation_exact(jit):
    fn = jax.jit(quantised_ratings, static_argnums=(3, 4, 5)) if jit else quantised_ratings
    gold = np.array([-1.5, -1.0, -0.61, -0.59, 0.0, 0.19, 0.21, 0.99, 1.0, 3.0])
    # k = 5 over [-1, 1]: levels [-1, -0.6), [-0.6, -0.2), [-0.2, 0.2), [0.2, 0.6), [0.6, 1]
    ratings = np.asarray(fn(jax.random.key(6), gold, 0.0, 5, -1.0, 1.0))
    np.testing.assert_array_equal(ratings, [1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    assert ratings.dtype == np.int32


def test_ratings_noise_distribution():
    from statistics import NormalDist

    mu, sigma, k, lo, hi = 0.1, 0.3, 5, -1.0, 1.0
    ratings = np.asarray(quantised_ratings(jax.random.key(7), np.full(N, mu), sigma, k, lo, hi))
    edges = [-math.inf, *np.linspace(lo, hi, k + 1)[1:-1], math.inf]
    dist = NormalDist(mu, sigma)
    for level in range(1, k + 1):
        expected = dist.cdf(edges[level]) - dist.cdf(edges[level - 1])
        assert_rate((ratings == level).mean(), expected)


def test_ratings_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_levels"):
        quantised_ratings(key, np.zeros(2), 0.1, 1, 0.0, 1.0)
    with pytest.raises(ValueError, match="high > low"):
        quantised_ratings(key, np.zeros(2), 0.1, 5, 1.0, 1.0)
    with pytest.raises(ValueError, match="noise_std"):
        quantised_ratings(key, np.zeros(2), -0.1, 5, 0.0, 1.0)

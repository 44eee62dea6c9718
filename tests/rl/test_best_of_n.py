"""Best-of-n KL and the unbiased best-of-n estimator against brute-force enumeration."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.best_of_n import best_of_n_curve, best_of_n_estimate, best_of_n_kl, best_of_n_weights

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

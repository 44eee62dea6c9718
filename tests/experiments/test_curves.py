"""The demo's curve numerics (intervals, KL, best-of-n, agreement, the over-optimisation verdict) against
hand-worked values and brute-force sampling."""

import math

import numpy as np
import pytest

from jaxrlhf.experiments.curves import (
    CurvePoint,
    best_of_n_by_prompt,
    best_of_n_points,
    intervals_separated,
    mean_ci,
    pair_agreement,
    prompt_mean_ci,
)

# ------------------------------------------------------------------------------------------ intervals


T3, T2 = 3.182446305284263, 4.302652729911275  # t_{ν, 0.975} for ν = 3, 2


def test_mean_ci_hand_values():
    # mean 2.5, s = sqrt(5/3) = 1.2910, half = t_{3, 0.975}·1.2910/2
    mean, half = mean_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(T3 * math.sqrt(5 / 3) / 2)
    assert half == pytest.approx(2.0543, abs=1e-4)
    assert mean_ci(np.array([1.0, 2.0, 3.0, 4.0]), level=0.5)[1] == pytest.approx(
        0.7648923284847653 * math.sqrt(5 / 3) / 2)  # t_{3, 0.75}
    assert math.isnan(mean_ci(np.array([3.0]))[1])
    with pytest.raises(ValueError, match="no values"):
        mean_ci(np.array([]))


def test_prompt_mean_ci_uses_per_prompt_means():
    # Per-prompt means are all 2: no spread between prompts, whatever the spread within them.
    assert prompt_mean_ci(np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])) == (2.0, 0.0)
    mean, half = prompt_mean_ci(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    assert (mean, half) == pytest.approx((1.0, T2 * 1.0 / math.sqrt(3)))
    with pytest.raises(ValueError, match=r"\[prompts, samples\]"):
        prompt_mean_ci(np.zeros(4))


def test_mean_ci_covers_at_its_level_over_few_prompts():
    """The quick demo averages 8 prompts: its 95% interval covers 95% (a 1.96 interval covered ~91%)."""
    rng = np.random.default_rng(8)
    reps = 4000
    hits = sum(abs(m) <= h for m, h in (mean_ci(rng.normal(0.0, 1.0, 8)) for _ in range(reps)))
    assert abs(hits / reps - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / reps), hits / reps


def test_intervals_separated():
    assert intervals_separated(1.0, 0.1, 0.5, 0.1)
    assert not intervals_separated(1.0, 0.3, 0.5, 0.3)


# ------------------------------------------------------------------------------------------ best-of-n

# A toy policy with 5 responses: their probabilities, proxy and gold scores. The proxy ranks response 4
# highest but the oracle likes it least: best-of-n gold first rises (response 3) then falls.
PROBS = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
PROXY = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
GOLD = np.array([0.0, 0.5, 1.0, 1.5, -2.0])


def exact_best_of_n(n: int, values: np.ndarray) -> float:
    """E[value of the highest-proxy of n i.i.d. draws]: P(max index ≤ j) = F(j)^n (proxy increases)."""
    cdf = np.cumsum(PROBS)
    pmf_max = np.diff(np.concatenate([[0.0], cdf**n]))
    return float(pmf_max @ values)


def test_best_of_n_curve_matches_brute_force_sampling():
    rng = np.random.default_rng(0)
    ns = [1, 2, 4, 8, 16]
    # The estimator: N = 64 samples per prompt, 400 prompts, averaged (as the demo does).
    idx = rng.choice(5, size=(400, 64), p=PROBS)
    points = best_of_n_points(PROXY[idx], GOLD[idx], (GOLD[idx] == 1.5).astype(float), ns)
    # Brute force: for each n, 40 000 fresh groups of n samples, keep the highest-proxy one.
    for point, n in zip(points, ns):
        groups = rng.choice(5, size=(40_000, n), p=PROBS)
        brute = GOLD[groups.max(axis=1)]  # index order = proxy order
        brute_stderr = brute.std() / math.sqrt(brute.size)
        assert point.x == n
        # Both agree with the exact value: the estimate within its 95% interval, brute force within 4 s.e.
        assert abs(brute.mean() - exact_best_of_n(n, GOLD)) < 4 * brute_stderr
        assert abs(point.gold - exact_best_of_n(n, GOLD)) < point.gold_ci
        assert abs(point.gold - brute.mean()) < point.gold_ci + 4 * brute_stderr
        assert point.proxy == pytest.approx(exact_best_of_n(n, PROXY), abs=max(point.proxy_ci, 0.02))
        assert point.optimal == pytest.approx(exact_best_of_n(n, (GOLD == 1.5).astype(float)), abs=0.03)
        assert point.kl == pytest.approx(math.log(n) - (n - 1) / n)
        assert point.gold_ci > 0
    assert points[0].kl == 0.0


def test_best_of_n_by_prompt_is_row_wise_and_checks_n():
    proxy = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    gold = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    # n = 1: the mean; n = 3: the gold of the highest proxy; n = 2: (1·g_(2) + 2·g_(3))/3 in proxy order.
    np.testing.assert_allclose(best_of_n_by_prompt(proxy, gold, [1, 2, 3]),
                               [[2.0, (2 + 2 * 3) / 3, 3.0], [2.0, (2 + 2 * 1) / 3, 1.0]])
    with pytest.raises(ValueError, match="n = 4"):
        best_of_n_by_prompt(proxy, gold, [4])


# ------------------------------------------------------------------------------------------ agreement


def test_pair_agreement():
    proxy = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 1.0]])
    gold = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 3.0]])  # the last pair is a gold tie
    assert pair_agreement(proxy, gold) == (pytest.approx((1 + 0 + 0.5) / 3), 3)
    assert math.isnan(pair_agreement(proxy[3:], gold[3:])[0])
    with pytest.raises(ValueError, match=r"\[pairs, 2\]"):
        pair_agreement(np.zeros((2, 3)), np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------ verdict


def _curve(golds, proxies, ci=0.05):
    return [CurvePoint(10 * i, 0.1 * i, g, ci, p) for i, (g, p) in enumerate(zip(golds, proxies))]


def test_mean_ci_refuses_non_finite_values():
    with pytest.raises(ValueError, match="1 of 3 values are not finite"):
        mean_ci(np.array([1.0, math.nan, 2.0]))

"""Intervals, paired comparisons and the over-optimisation test: hand values and error rates on simulated
data whose truth is known.

Tolerances for simulated rates: with R replications a rate p has binomial standard error √(p(1 − p)/R);
a one-sided bound uses 2.326 standard errors (a 1% chance of failing for a test whose true rate is exactly
at the bound), a two-sided one 3 standard errors.
"""

import math

import numpy as np
import pytest
import scipy.stats

from jaxrlhf.experiments.statistics import (
    Estimate,
    across_seeds,
    bootstrap_interval,
    format_interval,
    holm_adjusted,
    mean_interval,
    overoptimization_test,
    paired_comparison,
    per_prompt_means,
    student_t_cdf,
    student_t_quantile,
    t_test_p_value,
)


def binomial_se(p: float, replications: int) -> float:
    return math.sqrt(p * (1 - p) / replications)


def test_student_t_against_scipy():
    for df in [*range(1, 13), 30, 31, 99]:
        for q in (0.6, 0.9, 0.95, 0.975, 0.995):
            assert student_t_quantile(q, df) == pytest.approx(scipy.stats.t.ppf(q, df), rel=1e-10)
        for t in (-3.0, -0.5, 0.0, 1.2, 4.0):
            assert student_t_cdf(t, df) == pytest.approx(scipy.stats.t.cdf(t, df), abs=1e-12)
    assert student_t_quantile(0.975, 3) == pytest.approx(3.182446305284263)
    assert student_t_quantile(0.025, 3) == pytest.approx(-3.182446305284263)
    with pytest.raises(ValueError, match="df must be an integer >= 1"):
        student_t_cdf(1.0, 2.5)


def test_mean_interval_and_formatting():
    e = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t_{3, 0.975}·s/√n, s² = 5/3
    assert (e.value, e.n, e.unit, e.method) == (2.5, 4, "prompts", "t")
    assert e.low == pytest.approx(2.5 - half) and e.high == pytest.approx(2.5 + half)
    assert e.format(2) == f"2.50 ± {half:.2f} (95% CI over 4 prompts)"
    assert Estimate(0.5, 0.4, 0.7, 10, "seeds").format(2) == "0.50 [0.40, 0.70] (95% CI over 10 seeds)"
    assert format_interval(0.25, 0.0312, 512, "prompts") == "0.250 ± 0.031 (95% CI over 512 prompts)"
    assert format_interval(0.25, math.nan, 1, "seeds") == "0.250 (no interval: 1 seed)"
    assert mean_interval([0.3], "seeds").format() == "0.300 (no interval: 1 seed)"
    np.testing.assert_array_equal(per_prompt_means([1, 3, 5, 7, 0, 2], 2), [2, 6, 1])
    with pytest.raises(ValueError, match="not a multiple of samples_per_prompt = 4"):
        per_prompt_means(np.zeros(6), 4)
    with pytest.raises(ValueError, match="2 values are not finite"):
        mean_interval([1.0, math.nan, math.inf])


@pytest.mark.parametrize("method", ["studentized", "bca", "percentile"])
def test_bootstrap_coverage(method):
    """95% intervals of a mean from 64 skewed, bounded per-prompt scores cover the truth 95% of the time."""
    rng = np.random.default_rng(11)
    reps, n = 600, 64
    truth = 0.4 * 1.0 + 0.6 * 0.25  # a mixture: 1 w.p. 0.4, else uniform on [0, 0.5]
    covered = 0
    for r in range(reps):
        x = np.where(rng.random(n) < 0.4, 1.0, rng.uniform(0.0, 0.5, n))
        e = bootstrap_interval(x, n_boot=500, seed=r, method=method)
        covered += e.low <= truth <= e.high
    coverage = covered / reps
    assert abs(coverage - 0.95) <= 3 * binomial_se(0.95, reps), coverage


def test_t_interval_coverage_over_seeds():
    """The t-interval over 4 seeds (normal estimates) covers the truth 95% of the time."""
    rng = np.random.default_rng(3)
    reps = 4000
    hits = sum(
        (e := across_seeds(rng.normal(0.5, 0.1, 4)).estimate).low <= 0.5 <= e.high for _ in range(reps)
    )
    assert abs(hits / reps - 0.95) <= 3 * binomial_se(0.95, reps)


def test_paired_comparison_uses_common_random_numbers():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 1.0, 200)
    a = prompt_effect + 0.1 + rng.normal(0, 0.2, 200)
    b = prompt_effect + rng.normal(0, 0.2, 200)
    paired = paired_comparison(a, b, alternative="greater", seed=1)
    separate = mean_interval(a).half_width + mean_interval(b).half_width
    assert paired.difference.value == pytest.approx(np.mean(a - b))
    assert paired.difference.half_width < separate / 4  # the prompt effect cancels
    assert paired.p_value < 0.01 and paired.one_sided_bound > 0
    assert paired == paired_comparison(a, b, alternative="greater", seed=1)  # seeded
    assert paired_comparison(b, a, alternative="greater", seed=1).p_value > 0.99
    assert "greater p = " in paired.format()


@pytest.mark.parametrize("method", ["studentized", "bca", "percentile"])
def test_p_value_agrees_with_the_one_sided_bound(method):
    """p < α exactly when the one-sided (1 − α) bound excludes the null, for every method."""
    rng = np.random.default_rng(5)
    for r in range(60):
        d = rng.normal(rng.uniform(-0.2, 0.4), 1.0, 40)
        for alternative in ("greater", "less"):
            c = paired_comparison(d, np.zeros(40), alternative=alternative, level=0.95, n_boot=999, seed=r,
                                  method=method)
            excluded = c.one_sided_bound > 0 if alternative == "greater" else c.one_sided_bound < 0
            # Exact for the order-statistic bounds, at the boundary too (it was one resample off:
            # p = 0.0505 beside a bound that excluded 0); BCa's map is exact only up to one resample.
            if method != "bca" or abs(c.p_value - 0.05) > 2e-3:
                assert (c.p_value < 0.05) == excluded, (r, alternative, c)
        two = paired_comparison(d, np.zeros(40), n_boot=999, seed=r, method=method)
        if method != "bca" or abs(two.p_value - 0.05) > 4e-3:
            assert (two.p_value < 0.05) == (two.difference.low > 0 or two.difference.high < 0)


def test_degenerate_and_bad_inputs():
    same = paired_comparison([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert same.p_value == 1.0 and same.difference.value == 0.0
    assert "no interval" in same.difference.format()  # 3 units cannot bound it at 95% by sign flips
    same64 = paired_comparison(np.ones(64), np.ones(64))
    assert same64.difference.low == same64.difference.high == 0.0 and same64.p_value == 1.0
    assert same64.difference.format() == "0.000 (no interval: all 64 prompts gave this value)"
    # n equal non-zero differences: the bootstrap alone said p = 1/(B + 1); the exact sign-flip p is 2^-n
    # one-sided (2^(1−n) two-sided), and the guard's seeded B = 20000 flips estimate it
    for n in (2, 3, 5, 8):
        shifted = paired_comparison(np.ones(n), np.zeros(n), alternative="greater", n_boot=20000)
        assert shifted.p_value == pytest.approx(2.0**-n, abs=4 * (2.0**-n / 20000) ** 0.5 + 1e-4), n
        two = paired_comparison(np.ones(n), np.zeros(n), n_boot=20000)
        assert two.p_value == pytest.approx(2.0 ** (1 - n), abs=8 * (2.0**-n / 20000) ** 0.5 + 2e-4), n
        assert (two.p_value < 0.05) == (two.difference.low > 0), n  # the interval agrees with the test
    # one of 16 binary scores is 1: resamples of only zeros give t* = −inf; the interval stays finite below
    x = np.zeros(16)
    x[0] = 1.0
    e = bootstrap_interval(x)
    assert e.low < 1 / 16 < e.high and not math.isnan(e.low)
    with pytest.raises(ValueError, match="must hold the same units"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="bootstrap method must be one of"):
        bootstrap_interval([1.0, 2.0], method="normal")
    with pytest.raises(ValueError, match="alternative must be one of"):
        paired_comparison([1, 2], [2, 1], alternative="bigger")
    with pytest.raises(ValueError, match="n_boot must be >= 99"):
        bootstrap_interval([1.0, 2.0, 3.0], n_boot=10)


def flat_curves(rng, points, prompts):
    """Per-prompt gold at each checkpoint with no true change: a shared prompt effect plus noise."""
    return rng.normal(0, 0.5, prompts)[None, :] + rng.normal(0, 0.5, (points, prompts))


def test_overoptimization_false_positive_rate_on_flat_curves():
    """1000 flat curves (8 points, 64 prompts): called over-optimised in ≤ 5% (+ 2.326 binomial s.e.)."""
    rng = np.random.default_rng(2024)
    reps, calls, tested = 1000, 0, 0
    for r in range(reps):
        result = overoptimization_test(flat_curves(rng, 8, 64), n_boot=500, seed=r)
        calls += result.overoptimized
        tested += result.peak_index != result.final_index
    rate, rate_when_tested = calls / reps, calls / tested
    assert rate <= 0.05 + 2.326 * binomial_se(0.05, reps), rate
    # measured: 0.033 of all curves, 0.038 of those whose peak is not the final point
    assert rate_when_tested <= 0.05 + 2.326 * binomial_se(0.05, tested), rate_when_tested


def test_choosing_the_peak_on_the_tested_prompts_is_biased():
    """Why the halves: choosing the peak and testing the drop on the same 64 prompts calls a flat curve
    over-optimised far too often."""
    rng = np.random.default_rng(7)
    reps, calls = 300, 0
    for r in range(reps):
        g = flat_curves(rng, 8, 64)
        peak = int(np.argmax(g.mean(axis=1)))
        if peak != 7:
            test = paired_comparison(g[peak], g[-1], alternative="greater", n_boot=500, seed=r)
            calls += test.p_value < 0.05
    assert calls / reps > 0.12  # measured 0.21


def test_overoptimization_power_on_a_real_drop():
    """Gold rises by 0.3 over 4 steps, then falls by 0.2 (0.4 σ of the per-prompt noise σ = 0.5) over 3:
    with 256 evaluation prompts (128 per half) the test detects it in ≥ 80% of runs."""
    rng = np.random.default_rng(99)
    mean = np.concatenate([np.linspace(0.0, 0.3, 5), 0.3 - 0.2 * np.arange(1, 4) / 3])  # [8]
    reps, calls = 300, 0
    for r in range(reps):
        g = mean[:, None] + flat_curves(rng, 8, 256)
        calls += overoptimization_test(g, n_boot=500, seed=r).overoptimized
    assert calls / reps >= 0.80, calls / reps  # measured 0.89


def test_overoptimization_result_fields_and_text():
    rng = np.random.default_rng(1)
    mean = np.array([0.0, 0.4, 0.6, 0.3, 0.1])
    gold = mean[:, None] + rng.normal(0, 0.3, (5, 100))
    proxy = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    x = [0, 25, 50, 75, 100]
    result = overoptimization_test(gold, proxy, x, seed=3)
    assert result.overoptimized and result.peak_index == 2 and result.final_index == 4
    assert (result.peak_x, result.final_x, result.n_selection, result.n_test) == (50.0, 100.0, 50, 50)
    assert result.p_value < 0.01 and result.drop_lower > 0 and result.unit == "prompts"
    assert result.drop.value == pytest.approx(result.peak_gold.value - result.final_gold.value)
    assert 0.3 < result.drop.value < 0.7 and result.drop.n == 50
    assert (result.proxy_peak, result.proxy_final) == (2.0, 4.0)
    assert result.text.startswith("yes: gold fell by 0.")
    assert "(step 50, chosen on 50 other prompts)" in result.text
    assert "the proxy went from 2.000 to 4.000" in result.text
    # the verdict is one-sided: its own bound is printed (the two-sided interval may include 0 while p < α)
    assert f"one-sided 95% lower bound {result.drop_lower:.3f} > 0, p = " in result.text
    assert f"(two-sided: {result.drop.format()})" in result.text
    assert "split at random into two halves" in result.rule and "p < 0.05" in result.rule
    assert overoptimization_test(gold, proxy, x, seed=3) == result  # deterministic
    # a curve still rising at the end: the peak is the final point, nothing to test
    rising = overoptimization_test(np.arange(4.0)[:, None] + rng.normal(0, 0.1, (4, 20)), x_label="n")
    assert not rising.overoptimized and rising.p_value == 1.0
    assert rising.text.startswith("no: on the 10 selection prompts gold is highest at the final point (n 3)")
    # per-prompt proxy: averaged over the test half
    per_prompt = overoptimization_test(gold, np.repeat(proxy[:, None], 100, axis=1), x, seed=3)
    assert per_prompt.proxy_final == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"gold must be \[points >= 2, prompts >= 4\]"):
        overoptimization_test(np.zeros((1, 10)))
    with pytest.raises(ValueError, match="proxy must be"):
        overoptimization_test(gold, np.zeros(3))


def test_across_seeds():
    s = across_seeds([0.5, 0.6, 0.7, 0.8], prompt_half_widths=[0.03, 0.04, 0.03, 0.02], prompt_n=512)
    half = 3.182446305284263 * np.std([0.5, 0.6, 0.7, 0.8], ddof=1) / 2
    assert s.estimate.value == pytest.approx(0.65) and s.estimate.half_width == pytest.approx(half)
    assert s.estimate.unit == "seeds" and s.std == pytest.approx(0.1291, abs=1e-4)
    assert s.format(3) == f"0.650 ± {half:.3f} (95% CI over 4 seeds; per run ± 0.030 over 512 prompts)"
    assert across_seeds([0.4]).format() == "0.400 (no interval: 1 seed)"
    with pytest.raises(ValueError, match="must match values"):
        across_seeds([0.1, 0.2], prompt_half_widths=[0.1])


# ------------------------------------------------------------------------ lattice data: the sign-flip guard


def sparse_differences(k: int, n: int = 64) -> np.ndarray:
    """k of n prompts moved by +1, the rest exactly 0 (two policies of a discrete gold that differ on k)."""
    d = np.zeros(n)
    d[:k] = 1.0
    return d


@pytest.mark.parametrize("method", ["studentized", "bca", "percentile"])
def test_a_few_moved_prompts_get_the_exact_sign_test_p_value(method):
    """With k of 64 differences +1 and the rest 0, only the k signs carry evidence: the exact sign test's
    one-sided p is 2⁻ᵏ. The bootstrap alone called k = 2 significant (studentized p = 0.017); guarded by
    the sign flips it is not, and the p-value is 2⁻ᵏ up to the Monte Carlo error of B = 4000 flips."""
    for k in (2, 3, 4, 6):
        c = paired_comparison(sparse_differences(k), np.zeros(64), alternative="greater", n_boot=4000, seed=k,
                              method=method)
        assert c.p_value == pytest.approx(2.0**-k, abs=3 * math.sqrt(2.0**-k / 4000) + 1e-3), (k, c)
        assert c.difference.method == f"{method}+signflip"
        assert (c.p_value < 0.05) == (c.one_sided_bound > 0)
    two = paired_comparison(sparse_differences(2), np.zeros(64), n_boot=4000)
    assert two.p_value > 0.4 and two.difference.low <= 0.0  # exact two-sided: 0.5


def test_sign_flip_guard_keeps_the_false_positive_rate_on_lattice_data():
    """Identical policies on a discrete gold: 5% of 64 per-prompt differences are ±1, the rest 0. The
    studentized bootstrap alone called 16% of such pairs different (8% at 10% of 128 prompts); guarded,
    the rate is at most 5%, and the 95% interval covers 0 as often."""
    rng = np.random.default_rng(31)
    reps, calls, covered = 500, 0, 0
    for r in range(reps):
        d = np.where(rng.random(64) < 0.05, rng.choice([-1.0, 1.0], 64), 0.0)
        c = paired_comparison(d, np.zeros(64), n_boot=500, seed=r)
        calls += c.p_value < 0.05
        covered += c.difference.low <= 0.0 <= c.difference.high
    assert calls / reps <= 0.05 + 2.326 * binomial_se(0.05, reps), calls / reps
    assert covered / reps >= 0.95 - 2.326 * binomial_se(0.95, reps), covered / reps


def test_overoptimization_false_positive_rate_on_flat_lattice_curves():
    """Flat curves of a discrete gold where each checkpoint changes a few prompts' 0/1 gold at random: the
    drops are mostly exact zeros. Called over-optimised in ≤ 5% (it was 7.7–10.2% unguarded)."""
    rng = np.random.default_rng(77)
    reps, calls = 400, 0
    for r in range(reps):
        base = (rng.random(128) < 0.5).astype(float)
        flips = rng.random((6, 128)) < 0.05  # each checkpoint re-draws 5% of the prompts' gold
        gold = np.where(flips, (rng.random((6, 128)) < 0.5).astype(float), base[None])
        calls += overoptimization_test(gold, n_boot=500, seed=r).overoptimized
    assert calls / reps <= 0.05 + 2.326 * binomial_se(0.05, reps), calls / reps


def test_continuous_differences_are_left_to_the_bootstrap():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.1, 1.0, 50), rng.normal(0.0, 1.0, 50)
    c = paired_comparison(a, b, seed=2)
    assert c.difference.method == "studentized"


def test_bca_p_value_counts_ties_with_the_null_on_both_sides():
    """One difference of −0.5 among 63 zeros: most bootstrap means equal the null 0. BCa's p_less used to be
    1 − p_greater (ties counted as evidence for 'less': p = 0.001 while the upper bound was +0.000)."""
    d = np.r_[np.zeros(63), -0.5]
    c = paired_comparison(d, np.zeros(64), alternative="less", method="bca", n_boot=999)
    assert c.p_value > 0.3 and c.one_sided_bound >= 0.0


def test_an_interval_open_on_one_side_says_so():
    """254 differences of 0.001 and two of 1.001: resamples without a large one have a rounding-level spread
    (1e-18), which once gave a finite upper bound of 1.6e15; the end is open and the text says so."""
    d = np.r_[np.full(254, 0.001), 1.001, 1.001]
    c = paired_comparison(d, np.zeros_like(d))
    assert c.difference.low > 0 and c.difference.high == math.inf
    assert c.difference.format() == "0.009 [0.001, ∞] (95% CI over 256 prompts, open on one side)"


# ------------------------------------------------------------------------------------------ several tests


def test_holm_adjusted_hand_values():
    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max → 0.06
    assert holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjusted([0.5, 0.9]) == [1.0, 1.0] and holm_adjusted([]) == []
    with pytest.raises(ValueError, match="p-values in"):
        holm_adjusted([0.1, 1.5])


def test_holm_keeps_the_family_wise_error_of_a_study():
    """8 choices that change nothing, each compared with the defaults over 8 seeds: at least one
    unadjusted p < 0.05 in ~1 − 0.95⁸ = 34% of studies; Holm-adjusted, in ≤ 5%."""
    rng = np.random.default_rng(12)
    reps, any_raw, any_holm = 300, 0, 0
    for r in range(reps):
        baseline = rng.normal(0.5, 0.1, 8)
        ps = [paired_comparison(rng.normal(0.5, 0.1, 8), baseline, unit="seeds", n_boot=300, seed=r).p_value
              for _ in range(8)]
        any_raw += min(ps) < 0.05
        any_holm += min(holm_adjusted(ps)) < 0.05
    assert any_raw / reps > 0.15  # the problem: measured 0.25
    assert any_holm / reps <= 0.05 + 2.326 * binomial_se(0.05, reps), any_holm / reps


def test_study_tables_print_the_holm_adjusted_p_value():
    from jaxrlhf.experiments.studies.study_run import add_holm, delta_cell

    diff = {"value": 0.03, "low": 0.01, "high": 0.05}
    variants = {"default": {}, "a": {"delta_gold": {"difference": diff, "p_value": 0.01}},
                "b": {"delta_gold": {"difference": diff, "p_value": 0.04}, "delta_kl": {"difference": diff,
                                                                                     "p_value": 0.5}}}
    assert add_holm(variants, ("delta_gold", "delta_kl")) == 3
    assert variants["a"]["delta_gold"]["p_holm"] == pytest.approx(0.03)
    assert delta_cell(variants["b"]["delta_gold"]) == "+0.030 [+0.010, +0.050], p = 0.04 (Holm 0.08)"


def test_t_test_p_value_against_scipy_and_its_interval():
    rng = np.random.default_rng(11)
    for n in (2, 4, 8, 30):
        for _ in range(5):
            x = rng.normal(0.3, 1.0, n)
            want = scipy.stats.ttest_1samp(x, 0.0).pvalue
            assert t_test_p_value(x) == pytest.approx(want, rel=1e-9, abs=1e-12)
            e = mean_interval(x)
            assert (t_test_p_value(x) < 0.05) == (not e.low <= 0.0 <= e.high)
    assert t_test_p_value([2.0, 2.0]) == 0.0 and t_test_p_value([0.0, 0.0]) == 1.0
    assert math.isnan(t_test_p_value([1.0]))


def test_a_one_sided_yes_beside_a_two_sided_interval_that_includes_zero_says_which_is_which():
    """A drop just past the one-sided 5% test: its two-sided 95% interval includes 0, and the text shows
    the one-sided bound the verdict rests on."""
    rng = np.random.default_rng(0)
    for seed in range(400):
        gold = np.stack([np.zeros(64), np.full(64, 0.5), np.full(64, 0.25)]) + rng.normal(0, 1.0, (3, 64))
        r = overoptimization_test(gold, seed=seed, n_boot=999)
        if r.overoptimized and r.drop.low < 0:
            assert r.drop_lower > 0 and f"one-sided 95% lower bound {r.drop_lower:.3f} > 0" in r.text
            return
    pytest.fail("no borderline case found")

"""Intervals, paired comparisons and the over-optimisation test of the oracle study (pure NumPy).

**Units.** An interval is taken over an explicit unit of independent replication: ``"prompts"`` (the
evaluation prompts are drawn independently; the K samples of one prompt share its difficulty and are not
independent, so they are first averaged into one value per prompt, see :func:`per_prompt_means`) or
``"seeds"`` (whole runs). Every figure a report prints carries its interval and its unit:
:meth:`Estimate.format` writes ``"0.512 ± 0.031 (95% CI over 512 prompts)"``.

**Paired comparisons.** Two policies evaluated on the same prompts with the same sampling keys (common
random numbers) are compared through the per-prompt differences dᵢ = aᵢ − bᵢ: the prompt's difficulty
cancels, so the interval of mean(d) is much narrower than the two separate intervals suggest.

**Bootstrap over prompts** (B resamples of the n units with replacement, seeded), three interval methods,
each with the p-value that inverts it (p < α exactly when the one-sided (1 − α) bound excludes the null):

* ``"percentile"``: θ*'s quantiles. Too narrow at small n (the plug-in variance has ddof 0 and the
  normal tail replaces Student's t).
* ``"bca"``: bias-corrected and accelerated (Efron 1987): quantile levels
  Φ(z₀ + (z₀ + z_q)/(1 − a(z₀ + z_q))), z₀ = Φ⁻¹(#{θ* < θ̂}/B), a from the jackknife.
* ``"studentized"`` (bootstrap-t, the default): t*_b = (θ*_b − θ̂)/se*_b, bound(q) = θ̂ − t*_(1−q)·se.
  Second-order accurate for a mean. Where many resamples are constant (a handful of non-zero binary
  values) their t* is infinite and the interval stays open on that side rather than pretending.

**Ties guard the verdicts.** The bootstrap's accuracy rests on a smooth distribution of the mean; per-prompt
differences of a discrete gold reward sit on a lattice, mostly at exactly 0 when two policies differ on a
few prompts, and there the bootstrap-t called 2 prompts of 64 that moved by +1 "significant" (p = 0.03;
the exact sign test says 0.25). So a paired comparison and the over-optimisation test, whenever the
differences hold ties, also run a paired **sign-flip randomisation test** (B random sign vectors s:
mean(s ⊙ (d − μ₀)) against mean(d − μ₀)), which is exact under the null that the two conditions are
exchangeable, whatever the distribution: the reported interval is the hull of the two intervals and the
p-value the larger of the two, so a verdict needs both (``Estimate.method`` then reads e.g.
``"studentized+signflip"``). Its interval inverts the test in closed form: mean(s ⊙ (d − μ₀)) ≥
mean(d − μ₀) exactly when μ₀ ≥ the mean of d over the units s flips, so the bounds are order statistics of
those B subset means. Differences without ties (continuous scores, seed-level results) are left to the
bootstrap alone, where it was measured calibrated.

Measured on simulated data (the tests hold the smaller versions): coverage of nominal 95% intervals of a
mean of 16 exponential values: studentized 0.948, BCa 0.907, percentile 0.894, t 0.914; of 64 skewed,
bounded scores: 0.962, 0.950, 0.937 (1000 and 600 replications). False-positive rate of
:func:`overoptimization_test` on flat curves (8 points, 32 + 32 prompts, 3000 replications, s.e. 0.4%,
counting curves whose peak is not the last point): studentized 4.9%, BCa 5.3%, percentile 5.4%.

Known limits, measured (2026-12-04, 1000–20000 replications): heavy-tailed per-prompt noise (t with 2 d.f.)
raises that false-positive rate to 6–7.5%; over 8 seeds the studentized bootstrap's per-test rate is 4.3%
(normal differences) to 6.6% (t₃, skewed), and its smallest p-values run about twice too small (P(p < 0.001)
= 0.002 for normal differences), so Holm over 16 such tests keeps 7% rather than 5% (14% for strongly
skewed differences). A rare binary score that is 0 on every sampled unit gets no interval (all units
equal), not a "± 0" one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics as _stdlib_statistics
from collections.abc import Sequence

import numpy as np

UNIT_PROMPTS = "prompts"
UNIT_SEEDS = "seeds"
METHODS = ("studentized", "bca", "percentile")
ALTERNATIVES = ("two-sided", "greater", "less")
_NORMAL = _stdlib_statistics.NormalDist()


# ------------------------------------------------------------------------------------------ distributions
def normal_cdf(x: float) -> float:
    """Φ(x), the standard normal distribution function."""
    return _NORMAL.cdf(float(x))


def normal_quantile(q: float) -> float:
    """Φ⁻¹(q) for 0 < q < 1."""
    return _NORMAL.inv_cdf(float(q))


def student_t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with an integer number of degrees of freedom ν ≥ 1 (exact).

    With θ = atan(t/√ν) (Abramowitz & Stegun 26.7.3–4): for odd ν,
    F = ½ + (θ + sinθ·cosθ·Σ_{j=0}^{(ν−3)/2} c_j cos^{2j}θ)/π with c_0 = 1, c_j = c_{j−1}·2j/(2j + 1);
    for even ν, F = ½ + ½·sinθ·Σ_{j=0}^{(ν−2)/2} c_j cos^{2j}θ with c_j = c_{j−1}·(2j − 1)/(2j).
    """
    if int(df) != df or df < 1:
        raise ValueError(f"student_t_cdf: df must be an integer >= 1, got {df}")
    df = int(df)
    theta = math.atan(float(t) / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        total, term = 0.0, 1.0
        for j in range((df - 1) // 2):
            total += term
            term *= cos2 * (2 * j + 2) / (2 * j + 3)
        return 0.5 + (theta + sin * math.cos(theta) * total) / math.pi
    total, term = 0.0, 1.0
    for j in range(df // 2):
        total += term
        term *= cos2 * (2 * j + 1) / (2 * j + 2)
    return 0.5 + 0.5 * sin * total


@functools.lru_cache(maxsize=1024)
def student_t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with integer ν = df ≥ 1 (bisection on :func:`student_t_cdf`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"student_t_quantile: q must be in (0, 1), got {q}")
    if q < 0.5:
        return -student_t_quantile(1.0 - q, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < q:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < q:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


# -------------------------------------------------------------------------------------------- estimates
def _singular(unit: str, n: int) -> str:
    return unit[:-1] if n == 1 and unit.endswith("s") else unit


def format_interval(
    value: float, half_width: float, n: int, unit: str, level: float = 0.95, digits: int = 3
) -> str:
    """``"value ± half-width (95% CI over n unit)"``; without a finite half-width, says why."""
    if not math.isfinite(half_width):
        return f"{value:.{digits}f} (no interval: {n} {_singular(unit, n)})"
    return f"{value:.{digits}f} ± {half_width:.{digits}f} ({level:.0%} CI over {n} {_singular(unit, n)})"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A value with its confidence interval [low, high] at ``level`` over ``n`` units (prompts or seeds)."""

    value: float
    low: float
    high: float
    n: int
    unit: str
    level: float = 0.95
    method: str = "t"  # "t" | "percentile" | "bca" | "studentized"

    @property
    def half_width(self) -> float:
        """The larger distance from the value to an end of the interval (NaN without an interval)."""
        return max(self.value - self.low, self.high - self.value)

    def format(self, digits: int = 3) -> str:
        """``"0.512 ± 0.031 (95% CI over 512 prompts)"``, or ``"0.512 [0.470, 0.545] (...)"`` when the
        interval is asymmetric at the printed precision."""
        if math.isnan(self.low) or math.isnan(self.high) or (math.isinf(self.low) and math.isinf(self.high)):
            return format_interval(self.value, math.nan, self.n, self.unit, self.level, digits)
        if math.isinf(self.low) or math.isinf(self.high):  # open on one side: the data cannot bound it there
            low = "-∞" if math.isinf(self.low) else f"{self.low:.{digits}f}"
            high = "∞" if math.isinf(self.high) else f"{self.high:.{digits}f}"
            return (f"{self.value:.{digits}f} [{low}, {high}] ({self.level:.0%} CI over {self.n} "
                    f"{_singular(self.unit, self.n)}, open on one side)")
        if self.low == self.high == self.value and self.n > 1:
            # Every unit gave the same value: no spread to draw an interval from ("± 0.000" would claim
            # certainty; a rare binary score is all zeros in most small samples).
            return (f"{self.value:.{digits}f} (no interval: all {self.n} {_singular(self.unit, self.n)} "
                    "gave this value)")
        below, above = round(self.value - self.low, digits), round(self.high - self.value, digits)
        if below == above:
            return format_interval(self.value, self.half_width, self.n, self.unit, self.level, digits)
        return (f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
                f"({self.level:.0%} CI over {self.n} {_singular(self.unit, self.n)})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _as_units(values, name: str) -> np.ndarray:
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of per-unit values, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}: {int((~np.isfinite(v)).sum())} values are not finite")
    return v


def per_prompt_means(scores, samples_per_prompt: int) -> np.ndarray:
    """[M·K] per-sample scores in prompt-major order (or [M, K]) → the [M] per-prompt means."""
    s = np.asarray(scores, np.float64)
    if s.ndim == 1:
        if s.size % samples_per_prompt:
            raise ValueError(f"per_prompt_means: {s.size} scores are not a multiple of "
                             f"samples_per_prompt = {samples_per_prompt}")
        s = s.reshape(-1, samples_per_prompt)
    if s.ndim != 2 or s.shape[1] != samples_per_prompt:
        raise ValueError(f"per_prompt_means: expected [M*K] or [M, K={samples_per_prompt}], got {s.shape}")
    return s.mean(axis=1)


def mean_interval(values, unit: str = UNIT_PROMPTS, level: float = 0.95) -> Estimate:
    """Mean with the t-interval x̄ ± t_{ν, (1+level)/2}·s/√n, s the sample std (ddof 1), ν = n − 1.

    One value gives no interval (NaN ends).
    """
    _check_level(level)
    v = _as_units(values, "mean_interval")
    mean = float(v.mean())
    if v.size < 2:
        return Estimate(mean, math.nan, math.nan, 1, unit, level, "t")
    half = student_t_quantile((1 + level) / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Estimate(mean, mean - half, mean + half, int(v.size), unit, level, "t")


def t_test_p_value(values, null: float = 0.0) -> float:
    """Two-sided one-sample t-test of H₀: E[x] = null: p = 2·(1 − F_{n−1}(|x̄ − null| / (s/√n))), the test
    that :func:`mean_interval`'s interval inverts (p < 1 − level exactly when it excludes ``null``). NaN
    for one value; with no spread, 1 if x̄ = null, else 0."""
    v = _as_units(values, "t_test_p_value")
    if v.size < 2:
        return math.nan
    sd = float(v.std(ddof=1))
    diff = float(v.mean()) - null
    if not sd > 0.0:
        return 1.0 if diff == 0.0 else 0.0
    t = abs(diff) / (sd / math.sqrt(v.size))
    return min(1.0, 2.0 * (1.0 - student_t_cdf(t, v.size - 1)))


# -------------------------------------------------------------------------------------------- bootstrap
class _Bootstrap:
    """B bootstrap resamples of the mean of x [n]: the bound at tail probability q for each method, and
    the p-value that inverts it."""

    def __init__(self, x: np.ndarray, n_boot: int, rng: np.random.Generator, method: str,
                 guard_ties: bool = False):
        if method not in METHODS:
            raise ValueError(f"bootstrap method must be one of {METHODS}, got {method!r}")
        if n_boot < 99:
            raise ValueError(f"n_boot must be >= 99 resamples, got {n_boot}")
        n = x.size
        self.method, self.n_boot, self.n = method, n_boot, n
        self.mean = float(x.mean())
        self.sd = float(x.std(ddof=1)) if n > 1 else 0.0
        self.constant = not self.sd > 0.0
        self.flip: _SignFlip | None = None
        if self.constant:
            # Every resample is the same value, so the bootstrap would call any non-zero constant certain
            # (p = 1/(B + 1)); with the guard, the sign-flip test decides: n equal differences of one sign
            # are as likely as 2^(1−n) under exchangeability (2 of 2: p = 0.5, not 0.0005).
            if guard_ties and n > 1:
                self.flip = _SignFlip(x, n_boot, rng)
            return
        resampled = x[rng.integers(0, n, size=(n_boot, n))]  # [B, n]
        self.means = resampled.mean(axis=1)
        if guard_ties and np.unique(x).size < n:
            self.flip = _SignFlip(x, n_boot, rng)
        if method == "studentized":
            se_star = resampled.std(axis=1, ddof=1) / math.sqrt(n)
            # A resample of one repeated value can come out with a rounding-level spread (1e-18) instead of
            # 0: counted as 0, its t* is infinite, not a finite number that would print as a 1e15 bound.
            se_star[se_star <= 1e-12 * (abs(self.mean) + self.sd)] = 0.0
            shift = self.means - self.mean
            # A resample of one repeated value has se* = 0: its t* is ±inf, or 0 if it sits on θ̂.
            with np.errstate(divide="ignore", invalid="ignore"):
                self.t_star = np.where(se_star > 0, shift / se_star, np.sign(shift) * np.inf)
            self.t_star[(se_star == 0) & (shift == 0)] = 0.0
            self.se = self.sd / math.sqrt(n)
        elif method == "bca":
            below = np.mean(self.means < self.mean) + 0.5 * np.mean(self.means == self.mean)
            self.z0 = normal_quantile(min(max(below, 0.5 / n_boot), 1 - 0.5 / n_boot))
            jack = (x.sum() - x) / (n - 1)  # leave-one-out means
            dev = jack.mean() - jack
            denominator = 6.0 * float((dev**2).sum()) ** 1.5
            self.accel = float((dev**3).sum()) / denominator if denominator > 0 else 0.0

    def _bca_level(self, q: float) -> float:
        w = self.z0 + normal_quantile(q)
        return normal_cdf(self.z0 + w / (1.0 - self.accel * w))

    @property
    def method_name(self) -> str:
        return f"{self.method}+signflip" if self.flip is not None else self.method

    def bound(self, q: float) -> float:
        """The interval end with probability ≈ q below it (q = α/2 and 1 − α/2 for a two-sided CI); with
        the sign-flip guard, the farther of the two methods' ends."""
        own = self._bound(q)
        if self.flip is None:
            return own
        other = self.flip.bound(q)
        return min(own, other) if q < 0.5 else max(own, other)

    def _beyond(self, q: float) -> int:
        """m: the most resamples that may lie beyond the null for the p-value to stay below the tail
        probability (1 + m)/(B + 1) < min(q, 1 − q); −1 when no p-value can be that small."""
        tail = min(q, 1.0 - q)
        return math.ceil(tail * (self.n_boot + 1) - 1 - 1e-9) - 1

    def _bound(self, q: float) -> float:
        if self.constant:
            return self.mean
        if self.method == "bca":
            return float(np.quantile(self.means, self._bca_level(q)))
        # Order statistics chosen so that the bound excludes a null exactly when the p-value of that null
        # is below the tail probability (np.quantile's rank was one resample off: p = 0.0505 beside a 95%
        # interval that excluded 0). No interpolation: t* may hold infinities (the interval stays open).
        m = self._beyond(q)
        if m < 0:
            return -math.inf if q < 0.5 else math.inf
        if self.method == "percentile":  # p_greater(μ₀) < q ⟺ #{θ* ≤ μ₀} ≤ m ⟺ θ*₍ₘ₊₁₎ > μ₀
            ordered = np.sort(self.means)
            return float(ordered[m] if q < 0.5 else ordered[self.n_boot - 1 - m])
        # studentized: p_greater(μ₀) < q ⟺ #{t* ≥ t(μ₀)} ≤ m ⟺ t(μ₀) > t*₍B−m₎, t(μ₀) = (θ̂ − μ₀)/se
        ordered = np.sort(self.t_star)
        return self.mean - float(ordered[self.n_boot - 1 - m] if q < 0.5 else ordered[m]) * self.se

    def p_greater(self, null: float) -> float:
        """One-sided p-value of H₀: θ ≤ null against θ > null (the smallest is 1/(B + 1)); with the
        sign-flip guard, the larger of the two methods' p-values."""
        own = self._p_greater(null)
        return own if self.flip is None else max(own, self.flip.p_greater(null))

    def p_less(self, null: float) -> float:
        """One-sided p-value of H₀: θ ≥ null against θ < null."""
        own = self._p_less(null)
        return own if self.flip is None else max(own, self.flip.p_less(null))

    def _bca_p(self, fraction: float) -> float:
        """The tail probability q whose BCa quantile level is ``fraction`` (the inverse of
        :meth:`_bca_level`), clipped to [1/(B + 1), 1]."""
        floor = 1.0 / (self.n_boot + 1)
        level = min(max(fraction, floor), 1.0 - floor)
        u = normal_quantile(level) - self.z0
        if 1.0 + self.accel * u <= 0.0:  # beyond the range where the BCa map is monotone
            return 1.0 if u > 0 else floor
        return min(max(normal_cdf(u / (1.0 + self.accel * u) - self.z0), floor), 1.0)

    def _p_greater(self, null: float) -> float:
        floor = 1.0 / (self.n_boot + 1)
        if self.constant:
            return floor if self.mean > null else 1.0
        if self.method == "studentized":
            t_obs = (self.mean - null) / self.se
            return (1.0 + float(np.sum(self.t_star >= t_obs))) / (self.n_boot + 1)
        at_or_below = (1.0 + float(np.sum(self.means <= null))) / (self.n_boot + 1)
        if self.method == "percentile":
            return at_or_below
        # BCa: the q whose BCa level equals the fraction of θ* at or below the null.
        return self._bca_p(at_or_below)

    def _p_less(self, null: float) -> float:
        floor = 1.0 / (self.n_boot + 1)
        if self.constant:
            return floor if self.mean < null else 1.0
        if self.method == "studentized":
            t_obs = (self.mean - null) / self.se
            return (1.0 + float(np.sum(self.t_star <= t_obs))) / (self.n_boot + 1)
        at_or_above = (1.0 + float(np.sum(self.means >= null))) / (self.n_boot + 1)
        if self.method == "percentile":
            return at_or_above
        # BCa, mirrored: θ* equal to the null count on this side too (1 − p_greater would count them as
        # evidence for "less", and the p-value would disagree with the upper bound).
        return min(max(1.0 - self._bca_p(1.0 - at_or_above), floor), 1.0)

    def p_value(self, alternative: str, null: float) -> float:
        if alternative == "greater":
            return self.p_greater(null)
        if alternative == "less":
            return self.p_less(null)
        return min(1.0, 2.0 * min(self.p_greater(null), self.p_less(null)))


class _SignFlip:
    """Paired sign-flip randomisation test of a mean and the interval that inverts it (module docstring).

    With B seeded random sign vectors, flipping unit set F_b: mean(s_b ⊙ (x − μ₀)) ≥ mean(x − μ₀) exactly
    when μ₀ ≥ r_b = mean of x over F_b (and always when F_b is empty). So p_greater(μ₀) =
    (1 + #{F_b = ∅} + #{r_b ≤ μ₀}) / (B + 1), non-decreasing in μ₀, and the one-sided lower bound at α is
    the smallest μ₀ where it reaches α: an order statistic of r. Exact under H₀ when x − μ₀ is symmetric
    about 0 (e.g. the differences of two exchangeable conditions at μ₀ = 0); subset means of exact zeros
    are exact zeros, so lattice data tie with the null as they should.
    """

    def __init__(self, x: np.ndarray, n_boot: int, rng: np.random.Generator):
        self.n_boot = n_boot
        flips = rng.random((n_boot, x.size)) < 0.5  # [B, n]
        counts = flips.sum(axis=1)
        self.empty = int(np.sum(counts == 0))
        sums = flips[counts > 0].astype(np.float64) @ x
        self.r = np.sort(sums / counts[counts > 0])

    def _rank(self, alpha: float) -> int:
        """How many r_b a bound at tail α has on its far side: ⌈α(B + 1) − 1 − #{F_b = ∅}⌉."""
        return math.ceil(alpha * (self.n_boot + 1) - 1 - self.empty - 1e-9)

    def bound(self, q: float) -> float:
        k = self._rank(q if q < 0.5 else 1.0 - q)
        if k <= 0:
            return -math.inf if q < 0.5 else math.inf
        return float(self.r[k - 1] if q < 0.5 else self.r[self.r.size - k])

    def p_greater(self, null: float) -> float:
        below = int(np.searchsorted(self.r, null, side="right"))  # #{r_b ≤ null}
        return (1.0 + self.empty + below) / (self.n_boot + 1)

    def p_less(self, null: float) -> float:
        above = self.r.size - int(np.searchsorted(self.r, null, side="left"))  # #{r_b ≥ null}
        return (1.0 + self.empty + above) / (self.n_boot + 1)


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def bootstrap_interval(
    values,
    unit: str = UNIT_PROMPTS,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int | Sequence[int] = 0,
    method: str = "studentized",
) -> Estimate:
    """Mean of ``values`` [n] with a two-sided bootstrap interval at ``level`` (B = ``n_boot`` resamples
    of the n units, drawn with ``np.random.default_rng(seed)``; ``method`` as in the module docstring)."""
    _check_level(level)
    v = _as_units(values, "bootstrap_interval")
    if v.size < 2:
        return Estimate(float(v.mean()), math.nan, math.nan, 1, unit, level, method)
    boot = _Bootstrap(v, n_boot, np.random.default_rng(seed), method)
    alpha = 1.0 - level
    return Estimate(boot.mean, boot.bound(alpha / 2), boot.bound(1 - alpha / 2), int(v.size), unit, level,
                    method)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """mean(a − b) over units evaluated under both conditions, with its interval and a p-value."""

    difference: Estimate  # the mean per-unit difference a − b and its two-sided interval
    p_value: float  # of H₀: mean difference = null (or ≤ / ≥ null for one-sided alternatives)
    alternative: str  # "two-sided" | "greater" (a > b) | "less" (a < b)
    one_sided_bound: float  # for "greater" the (level) lower bound, for "less" the upper; NaN if two-sided
    null: float = 0.0

    def format(self, digits: int = 3) -> str:
        return f"{self.difference.format(digits)}, {self.alternative} p = {self.p_value:.2g}"


def paired_comparison(
    a,
    b,
    unit: str = UNIT_PROMPTS,
    alternative: str = "two-sided",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int | Sequence[int] = 0,
    method: str = "studentized",
    null: float = 0.0,
) -> PairedComparison:
    """Compare a and b [n] measured on the same n units (common random numbers): dᵢ = aᵢ − bᵢ, mean(d)
    with a bootstrap interval over the units, and the bootstrap p-value of H₀: E[d] = null against
    ``alternative`` ("greater": E[d] > null).

    p < 1 − level exactly when the one-sided bound at ``level`` excludes the null (both come from the
    same bootstrap distribution). Differences with ties are also tested by sign flips (module docstring):
    the interval is then the hull of both, the p-value the larger.
    """
    _check_level(level)
    _check_alternative(alternative)
    a, b = _as_units(a, "paired_comparison: a"), _as_units(b, "paired_comparison: b")
    if a.shape != b.shape:
        raise ValueError(f"paired_comparison: a {a.shape} and b {b.shape} must hold the same units")
    if a.size < 2:
        raise ValueError("paired_comparison: need at least 2 paired units")
    d = a - b
    boot = _Bootstrap(d, n_boot, np.random.default_rng(seed), method, guard_ties=True)
    alpha = 1.0 - level
    estimate = Estimate(boot.mean, boot.bound(alpha / 2), boot.bound(1 - alpha / 2), int(d.size), unit,
                        level, boot.method_name)
    one_sided = {"greater": boot.bound(alpha), "less": boot.bound(1 - alpha)}.get(alternative, math.nan)
    return PairedComparison(estimate, boot.p_value(alternative, null), alternative, one_sided, null)


# ----------------------------------------------------------------------------------- over-optimisation
def overoptimization_rule(alpha: float = 0.05, n_boot: int = 2000, method: str = "studentized") -> str:
    """The sentence a report prints to state how :func:`overoptimization_test` decides."""
    return (
        "Over-optimisation rule: the evaluation prompts are split at random into two halves; the checkpoint "
        "with the highest mean gold reward on half A is the peak; on half B, the per-prompt drop in gold "
        "from the peak to the final checkpoint (the same prompts and sampling keys at every checkpoint) is "
        f"tested with a one-sided {method} bootstrap over prompts ({n_boot} resamples), and where the drops "
        "hold ties (a discrete gold) with a sign-flip randomisation test too, the larger p counting; "
        f"'over-optimised' means p < {alpha:g}. Choosing the peak and testing the drop on different prompts "
        f"keeps the false-positive rate at {alpha:g} on a flat curve."
    )


@dataclasses.dataclass(frozen=True)
class OveroptimizationTest:
    """The result of :func:`overoptimization_test`; every value but the peak's choice is on half B."""

    overoptimized: bool  # p_value < alpha
    peak_index: int  # the point with the highest mean gold on half A
    final_index: int
    peak_x: float  # the x (step, n) of the peak and of the final point
    final_x: float
    drop: Estimate  # mean over half-B prompts of gold[peak] − gold[final], two-sided 95% interval
    drop_lower: float  # the one-sided (1 − alpha) lower bound of the drop
    p_value: float  # one-sided, H₁: the drop is > 0
    alpha: float
    peak_gold: Estimate  # gold at the peak and at the final point on half B (t-intervals)
    final_gold: Estimate
    proxy_peak: float  # the proxy at the peak and at the final point (NaN when no proxy was given)
    proxy_final: float
    n_selection: int  # prompts in half A (choose the peak) and half B (test the drop)
    n_test: int
    unit: str
    rule: str  # the sentence that states the rule
    text: str  # the verdict as a sentence for the report


def _point_proxy(proxy, shape: tuple[int, int], test_half: np.ndarray) -> np.ndarray:
    points = shape[0]
    if proxy is None:
        return np.full(points, math.nan)
    p = np.asarray(proxy, np.float64)
    if p.shape == (points,):
        return p
    if p.shape == shape:
        return p[:, test_half].mean(axis=1)
    raise ValueError(f"overoptimization_test: proxy must be [points] or [points, prompts] = {shape}, "
                     f"got {p.shape}")


def overoptimization_test(
    gold,
    proxy=None,
    x=None,
    *,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    method: str = "studentized",
    x_label: str = "step",
) -> OveroptimizationTest:
    """Does gold fall from its peak to the end of a curve of checkpoints? A one-sided paired test at α.

    ``gold`` [points, prompts]: per-prompt gold (mean over that prompt's samples) at each point, every
    point evaluated on the same prompts with the same sampling keys; points in the order of optimisation
    (the initial policy first). ``proxy``: [points] or [points, prompts] (only reported). ``x`` [points]:
    the step (or n) of each point, default 0..points−1.

    Rule: prompts → random halves A, B (``seed``); peak = argmax over points of mean gold on A; on B,
    dᵢ = gold[peak, i] − gold[final, i], p = bootstrap p-value of H₀: E[d] ≤ 0; over-optimised iff
    p < α. Because the peak is chosen on A, its selection does not bias the drop measured on B, so a flat
    curve is called over-optimised with probability α. The final point, not the lowest later one, is
    tested: it is fixed before looking (the lowest of several noisy points would bring the selection bias
    back) and it is where training ends, which is what a user keeps.
    """
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    g = np.asarray(gold, np.float64)
    if g.ndim != 2 or g.shape[0] < 2 or g.shape[1] < 4:
        raise ValueError(f"overoptimization_test: gold must be [points >= 2, prompts >= 4], got {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("overoptimization_test: gold holds non-finite values")
    points, prompts = g.shape
    xs = np.arange(points, dtype=np.float64) if x is None else np.asarray(x, np.float64)
    if xs.shape != (points,):
        raise ValueError(f"overoptimization_test: x must be [points = {points}], got {xs.shape}")
    order = np.random.default_rng([seed, 0]).permutation(prompts)
    half_a, half_b = np.sort(order[: prompts // 2]), np.sort(order[prompts // 2 :])
    peak = int(np.argmax(g[:, half_a].mean(axis=1)))
    final = points - 1
    drops = g[peak, half_b] - g[final, half_b]  # [n_test]
    boot = _Bootstrap(drops, n_boot, np.random.default_rng([seed, 1]), method, guard_ties=True)
    two_sided = Estimate(boot.mean, boot.bound(0.025), boot.bound(0.975), int(drops.size), UNIT_PROMPTS,
                         0.95, boot.method_name)
    proxy_b = _point_proxy(proxy, g.shape, half_b)
    p_value = boot.p_greater(0.0) if peak != final else 1.0
    overoptimized = peak != final and p_value < alpha
    peak_gold, final_gold = mean_interval(g[peak, half_b]), mean_interval(g[final, half_b])

    def at(i: int) -> str:
        return f"{x_label} {xs[i]:g}"

    proxy_text = ""
    if math.isfinite(proxy_b[peak]) and peak != final:
        proxy_text = f"; the proxy went from {proxy_b[peak]:.3f} to {proxy_b[final]:.3f}"
    if peak == final:
        text = (f"no: on the {half_a.size} selection prompts gold is highest at the final point "
                f"({at(final)}), so there is no drop to test")
    elif overoptimized:
        # The verdict is one-sided: its own bound goes first (the two-sided interval may include 0 while
        # p < α, and printed alone it read as a contradiction).
        text = (f"yes: gold fell by {boot.mean:.3f} from the peak ({at(peak)}, chosen on {half_a.size} other "
                f"prompts) to the final {at(final)}, one-sided {1 - alpha:.0%} lower bound "
                f"{boot.bound(alpha):.3f} > 0, p = {p_value:.2g} < {alpha:g} (two-sided: "
                f"{two_sided.format()}){proxy_text}")
    else:
        text = (f"no: the drop in gold from the peak ({at(peak)}, chosen on {half_a.size} other prompts) to "
                f"the final {at(final)} is {two_sided.format()}; one-sided p = {p_value:.2g} >= {alpha:g}"
                f"{proxy_text}")
    return OveroptimizationTest(
        overoptimized=bool(overoptimized), peak_index=peak, final_index=final, peak_x=float(xs[peak]),
        final_x=float(xs[final]), drop=two_sided, drop_lower=boot.bound(alpha), p_value=p_value,
        alpha=alpha, peak_gold=peak_gold, final_gold=final_gold, proxy_peak=float(proxy_b[peak]),
        proxy_final=float(proxy_b[final]), n_selection=int(half_a.size), n_test=int(half_b.size),
        unit=UNIT_PROMPTS, rule=overoptimization_rule(alpha, n_boot, method), text=text,
    )


# ------------------------------------------------------------------------------------ several tests
def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values, in their input order: with p₍₁₎ ≤ … ≤ p₍ₘ₎,
    p̃₍ᵢ₎ = max_{j ≤ i} min(1, (m − j + 1)·p₍ⱼ₎). Rejecting where p̃ < α keeps the chance of any false
    rejection among the m tests ≤ α, whatever their dependence (Holm 1979). A study that tests K choices
    against the defaults, each on its own at 5%, would call at least one of K that change nothing
    "significant" in up to 1 − 0.95ᴷ of studies (K = 8: 34%; 29% measured for 8 gold Δs over 8 seeds)."""
    p = np.asarray(p_values, np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"holm_adjusted: expected a 1-D list of p-values in [0, 1], got {p_values!r}")
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return [float(x) for x in out]


# ---------------------------------------------------------------------------------------------- seeds
@dataclasses.dataclass(frozen=True)
class SeedSummary:
    """One quantity over S seeds: the mean with a t-interval over seeds, beside the per-run intervals."""

    estimate: Estimate  # mean over seeds, t-interval, unit "seeds"
    per_seed: tuple[float, ...]
    std: float  # across seeds (ddof 1; NaN for one seed)
    prompt_half_width: float  # mean of the per-seed half-widths over prompts (NaN if not given)
    prompt_n: int | None  # prompts behind each per-seed interval (None if not given)

    def format(self, digits: int = 3) -> str:
        """``"0.512 ± 0.040 (95% CI over 4 seeds; per run ± 0.031 over 512 prompts)"``."""
        text = self.estimate.format(digits)
        if math.isfinite(self.prompt_half_width):
            over = f" over {self.prompt_n} prompts" if self.prompt_n else " over prompts"
            text = f"{text[:-1]}; per run ± {self.prompt_half_width:.{digits}f}{over})"
        return text


def across_seeds(
    values, prompt_half_widths=None, prompt_n: int | None = None, level: float = 0.95
) -> SeedSummary:
    """Per-seed estimates [S] → their mean ± t_{S−1, (1+level)/2}·s/√S over seeds.

    ``prompt_half_widths`` [S] (optional): each run's own interval over its prompts; their mean is kept
    beside the interval over seeds, because the two answer different questions (how precisely one run is
    measured, and how much a rerun with a new seed moves it). A paired comparison of two methods on the
    same seeds is ``across_seeds(a − b)``.
    """
    v = _as_units(values, "across_seeds")
    estimate = mean_interval(v, UNIT_SEEDS, level)
    half = math.nan
    if prompt_half_widths is not None:
        h = np.asarray(prompt_half_widths, np.float64)
        if h.shape != v.shape:
            raise ValueError(f"across_seeds: prompt_half_widths {h.shape} must match values {v.shape}")
        half = float(h.mean())
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return SeedSummary(estimate, tuple(float(x) for x in v), std, half, prompt_n)

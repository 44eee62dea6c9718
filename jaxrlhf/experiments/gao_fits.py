"""Gao, Schulman & Hilton (2022): gold reward as a function of the distance d = √KL(π ‖ π_init).

    best-of-n:  R_bon(d) = d·(α − β·d)
    RL:         R_RL(d)  = d·(α − β·log d)

R is the gold reward's *change* from the initial policy, R = gold(d) − gold(0), as in the paper (both
forms pass through R(0) = 0). Both are linear in (α, β), so the fit is least squares on the design columns
[d, −d²] (best-of-n) or [d, −d·log d] (RL).

**The baseline gold(0) is fitted with them.** It is measured like every other point (the initial policy's
mean gold on the same evaluation prompts), so its error is shared by every difference gold − gold(0):
subtracting it and fitting through the origin with independent-error standard errors understated the
spread of α and β by 1.4–3.5× (coverage of ± 2 s.e. 42–82% in simulation). So the model is
gold = g₀ + R(d) over every point, d = 0 included (the initial policy's evaluations, a KL estimate ≤ 0 of
a tiny KL, and ``gold_at_zero`` when passed, as one more point at d = 0), least squares in (g₀, α, β),
and the standard errors are the OLS ones, σ̂²·(XᵀWX)⁻¹ with σ̂² = RSS/(N − 3) over the N points; at least
one point at d = 0 and 3 with d > 0 are required. ``gold_at_zero_known=True`` takes ``gold_at_zero`` as
exact instead (an analytic baseline): the fit is then through the origin on the d > 0 points, with
σ̂² = RSS/(k − 2).

R² = 1 − Σwᵢ(yᵢ − ŷᵢ)²/Σwᵢ(yᵢ − ȳ)² over the fitted points (gold, or its change with a known baseline):
the usual centred R², which compares the model with a horizontal line and can be negative; NaN when the
values do not vary at all (nothing to explain).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

FORMS = ("bon", "rl")
FORMULAS = {"bon": "R_bon(d) = d(α − β·d)", "rl": "R_RL(d) = d(α − β·log d)"}
MIN_POINTS = 3


def _design(d: np.ndarray, form: str) -> np.ndarray:
    """[k, 2] design matrix: columns d and −d² (bon) or d and −d·log d (RL); 0 at d = 0."""
    d = np.asarray(d, np.float64)
    if form == "bon":
        second = d * d
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            second = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.stack([d, -second], axis=-1)


@dataclasses.dataclass(frozen=True)
class GaoFit:
    """A fitted Gao et al. curve; ``predict`` gives the gold change, ``predict(..., absolute=True)`` the
    gold reward itself (the change plus ``gold_at_zero``)."""

    form: str  # "bon" | "rl"
    alpha: float
    beta: float
    alpha_se: float
    beta_se: float
    r2: float
    n_points: int  # points with d > 0 used in the fit
    gold_at_zero: float  # the baseline g₀: fitted (default) or given as exact
    d_max: float  # the largest d fitted (curves beyond it are extrapolation)
    gold_at_zero_se: float = 0.0  # its standard error (0 when given as exact)
    n_baseline: int = 0  # points at d = 0 in the fit (0 when the baseline is given as exact)

    @property
    def formula(self) -> str:
        return FORMULAS[self.form]

    @property
    def peak_d(self) -> float:
        """The d of the fitted maximum: α/(2β) (bon), exp(α/β − 1) (RL); inf when β ≤ 0 (no peak)."""
        if not self.beta > 0:
            return math.inf
        if self.form == "bon":
            return self.alpha / (2 * self.beta)
        exponent = self.alpha / self.beta - 1.0
        return math.exp(exponent) if exponent < 700 else math.inf

    def predict(self, d, absolute: bool = False) -> np.ndarray:
        """R(d) on any array of d ≥ 0 (the change from d = 0, or the gold reward with ``absolute``)."""
        d = np.asarray(d, np.float64)
        if np.any(d < 0):
            raise ValueError("GaoFit.predict: d = √KL must be >= 0")
        change = _design(d, self.form) @ np.array([self.alpha, self.beta])
        return change + self.gold_at_zero if absolute else change

    def curve(self, num: int = 101, d_max: float | None = None, absolute: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
        """``num`` points (d, R(d)) on [0, d_max] (default: the largest fitted d) for a plot."""
        d = np.linspace(0.0, self.d_max if d_max is None else d_max, num)
        return d, self.predict(d, absolute)

    def describe(self, digits: int = 3) -> str:
        """``"R_RL(d) = d(α − β·log d): α = 0.512 ± 0.020, β = 0.103 ± 0.011 (± 1 s.e.), R² = 0.970 over 8
        points with d > 0"``."""
        def value(x: float, se: float) -> str:
            return f"{x:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")

        alpha, beta = value(self.alpha, self.alpha_se), value(self.beta, self.beta_se)
        r2 = f"R² = {self.r2:.3f}" if math.isfinite(self.r2) else "R² undefined (gold does not vary)"
        if self.n_baseline:
            base = value(self.gold_at_zero, self.gold_at_zero_se)
            return (f"{self.formula}: α = {alpha}, β = {beta}, gold(0) = {base} (± 1 s.e., fitted jointly), "
                    f"{r2} over {self.n_points} points with d > 0 and {self.n_baseline} at d = 0")
        return (f"{self.formula}: α = {alpha}, β = {beta} (± 1 s.e.), {r2} over "
                f"{self.n_points} points with d > 0 (gold(0) = {self.gold_at_zero:.{digits}f} given)")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "formula": self.formula, "peak_d": self.peak_d}


def fit_gao(kl, gold, form: str, gold_at_zero: float | None = None, weights=None,
            gold_at_zero_known: bool = False) -> GaoFit:
    """Least-squares fit of a Gao et al. form to checkpoints (see the module docstring).

    ``kl`` [k]: KL(π ‖ π_init) of each point (nats; the initial policy has 0); ``gold`` [k]: its mean gold
    reward; ``form``: "bon" or "rl"; ``gold_at_zero``: the initial policy's measured gold, one more point at
    d = 0 (or, with ``gold_at_zero_known``, the exact baseline); ``weights`` [k] (optional): per-point
    weights, e.g. 1/half-width², for weighted least squares (``gold_at_zero``'s point gets the mean weight
    of the d = 0 points, or of all points without one).
    """
    if form not in FORMS:
        raise ValueError(f"fit_gao: form must be one of {FORMS}, got {form!r}")
    kl, gold = np.asarray(kl, np.float64), np.asarray(gold, np.float64)
    if kl.ndim != 1 or kl.shape != gold.shape:
        raise ValueError(f"fit_gao: kl {kl.shape} and gold {gold.shape} must both be [points]")
    if not (np.all(np.isfinite(kl)) and np.all(np.isfinite(gold))):
        raise ValueError("fit_gao: kl and gold must be finite")
    w = np.ones_like(kl) if weights is None else np.asarray(weights, np.float64)
    if w.shape != kl.shape or not np.all(w > 0):
        raise ValueError("fit_gao: weights must be [points] and > 0")
    at_zero = kl <= 0
    if int((~at_zero).sum()) < MIN_POINTS:
        raise ValueError(f"fit_gao: need at least {MIN_POINTS} points with KL > 0 to fit α, β and their "
                         f"errors, got {int((~at_zero).sum())}")
    if gold_at_zero_known:
        if gold_at_zero is None:
            raise ValueError("fit_gao: gold_at_zero_known needs gold_at_zero")
        keep = ~at_zero
        d, y, w = np.sqrt(kl[keep]), gold[keep] - float(gold_at_zero), w[keep]
        x = _design(d, form)
    else:
        if gold_at_zero is None and not at_zero.any():
            raise ValueError("fit_gao: no point with KL = 0 (the initial policy) to fit gold(0) from; "
                             "pass gold_at_zero")
        d, y = np.sqrt(np.where(at_zero, 0.0, kl)), gold
        if gold_at_zero is not None:
            extra_w = float(w[at_zero].mean()) if at_zero.any() else float(w.mean())
            d, y, w = np.r_[d, 0.0], np.r_[y, float(gold_at_zero)], np.r_[w, extra_w]
        x = np.concatenate([np.ones((d.size, 1)), _design(d, form)], axis=1)
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)
    residual = y - x @ coef
    rss = float((w * residual**2).sum())
    y_bar = float((w * y).sum() / w.sum())
    tss = float((w * (y - y_bar) ** 2).sum())
    # No variation to explain (a constant gold): R² is undefined, not the −inf or −1e21 that rounding gives.
    r2 = 1.0 - rss / tss if tss > 1e-20 * float((w * y**2).sum()) else math.nan
    xtx = x.T @ (x * w[:, None])
    if np.linalg.cond(xtx) > 1e12:
        raise ValueError(f"fit_gao: the {int((d > 0).sum())} points with KL > 0 do not determine α and β "
                         "(their d values are too alike); evaluate more checkpoints at different KL")
    cov = rss / (d.size - x.shape[1]) * np.linalg.inv(xtx)
    ses = [float(math.sqrt(max(v, 0.0))) for v in np.diag(cov)]
    if gold_at_zero_known:
        (alpha, beta), (alpha_se, beta_se) = coef, ses
        base, base_se, n_base = float(gold_at_zero), 0.0, 0
    else:
        (base, alpha, beta), (base_se, alpha_se, beta_se) = coef, ses
        n_base = int((d == 0).sum())
    return GaoFit(form, float(alpha), float(beta), alpha_se, beta_se, float(r2), int((d > 0).sum()),
                  float(base), float(d.max()), base_se, n_base)

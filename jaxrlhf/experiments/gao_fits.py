"""Gao, Schulman & Hilton (2022): gold reward as a function of the distance d = √KL(π ‖ π_init).

    best-of-n:  R_bon(d) = d·(α − β·d)
    RL:         R_RL(d)  = d·(α − β·log d)

R is the gold reward's *change* from the initial policy, R = gold(d) − gold(0), as in the paper (both
forms pass through R(0) = 0). Both are linear in (α, β), so the fit is ordinary least squares through the
origin on the design columns [d, −d²] (best-of-n) or [d, −d·log d] (RL), over the points with d > 0.

Points at d = 0 (the initial policy, or a KL estimate ≤ 0) carry no information about α and β: both
forms are exactly 0 there. They give the baseline gold(0) (their mean, unless ``gold_at_zero`` is passed)
and are left out of the least squares and of R². A slightly negative KL estimate (a sample estimate of a
tiny KL) counts as d = 0.

R² = 1 − Σ(yᵢ − ŷᵢ)²/Σ(yᵢ − ȳ)² over the fitted points: the usual centred R², so it compares the form
with a horizontal line and can be negative when the form fits worse than that. Standard errors are the
OLS ones, σ̂²·(XᵀX)⁻¹ with σ̂² = RSS/(k − 2); they need k ≥ 3 points with d > 0, which the fit requires.
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
    gold_at_zero: float  # the baseline subtracted from the gold values
    d_max: float  # the largest d fitted (curves beyond it are extrapolation)

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
        return (f"{self.formula}: α = {alpha}, β = {beta} (± 1 s.e.), R² = {self.r2:.3f} over "
                f"{self.n_points} points with d > 0")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "formula": self.formula, "peak_d": self.peak_d}


def fit_gao(kl, gold, form: str, gold_at_zero: float | None = None, weights=None) -> GaoFit:
    """Least-squares fit of a Gao et al. form to checkpoints (see the module docstring).

    ``kl`` [k]: KL(π ‖ π_init) of each point (nats; the initial policy has 0); ``gold`` [k]: its mean gold
    reward; ``form``: "bon" or "rl"; ``gold_at_zero``: the initial policy's gold (default: the mean gold of
    the points with KL ≤ 0, which must then exist); ``weights`` [k] (optional): per-point weights, e.g.
    1/half-width², for weighted least squares.
    """
    if form not in FORMS:
        raise ValueError(f"fit_gao: form must be one of {FORMS}, got {form!r}")
    kl, gold = np.asarray(kl, np.float64), np.asarray(gold, np.float64)
    if kl.ndim != 1 or kl.shape != gold.shape:
        raise ValueError(f"fit_gao: kl {kl.shape} and gold {gold.shape} must both be [points]")
    if not (np.all(np.isfinite(kl)) and np.all(np.isfinite(gold))):
        raise ValueError("fit_gao: kl and gold must be finite")
    at_zero = kl <= 0
    if gold_at_zero is None:
        if not at_zero.any():
            raise ValueError("fit_gao: no point with KL = 0 (the initial policy) to take gold(0) from; "
                             "pass gold_at_zero")
        gold_at_zero = float(gold[at_zero].mean())
    d = np.sqrt(np.where(at_zero, 0.0, kl))[~at_zero]
    y = gold[~at_zero] - gold_at_zero
    if d.size < MIN_POINTS:
        raise ValueError(f"fit_gao: need at least {MIN_POINTS} points with KL > 0 to fit α, β and their "
                         f"errors, got {d.size}")
    w = np.ones_like(d) if weights is None else np.asarray(weights, np.float64)[~at_zero]
    if w.shape != d.shape or not np.all(w > 0):
        raise ValueError("fit_gao: weights must be [points] and > 0")
    x = _design(d, form)
    sw = np.sqrt(w)
    (alpha, beta), *_ = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)
    residual = y - x @ np.array([alpha, beta])
    rss = float((w * residual**2).sum())
    y_bar = float((w * y).sum() / w.sum())
    tss = float((w * (y - y_bar) ** 2).sum())
    r2 = 1.0 - rss / tss if tss > 0 else (1.0 if rss == 0 else -math.inf)
    xtx = x.T @ (x * w[:, None])
    if np.linalg.cond(xtx) > 1e12:
        raise ValueError(f"fit_gao: the {d.size} points do not determine α and β (their d values are too "
                         "alike); evaluate more checkpoints at different KL")
    cov = rss / (d.size - 2) * np.linalg.inv(xtx)
    alpha_se, beta_se = (float(math.sqrt(max(v, 0.0))) for v in np.diag(cov))
    return GaoFit(form, float(alpha), float(beta), alpha_se, beta_se, float(r2), int(d.size),
                  float(gold_at_zero), float(d.max()))

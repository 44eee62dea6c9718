"""The demo's curves: confidence intervals, best-of-n points and the proxy's agreement with the oracle.
(The over-optimisation verdict is :func:`jaxrlhf.experiments.statistics.overoptimization_test`.)

Pure functions on NumPy arrays. Samples come in a [M prompts, K samples] grid. Confidence intervals are
taken over the M per-prompt means: the prompts are drawn independently, the K samples of one prompt are not
independent of each other (they share its difficulty), so the per-prompt means are the i.i.d. unit. (The
per-sequence KL of samples is ``jaxrlhf.steps.experience.sequence_kl``.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxrlhf.experiments.statistics import student_t_quantile
from jaxrlhf.rl import best_of_n_curve, best_of_n_kl


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the t-interval mean ± t_{n−1, (1+level)/2}·s/√n, s the sample std (ddof 1).

    Student's t, not the normal 1.96: the quick demo's curves average 8–16 prompts, where a normal-quantile
    "95%" interval covers 91–93%. The half-width is NaN for fewer than two values.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("mean_ci: no values")
    if not np.all(np.isfinite(v)):  # a NaN would come out as a (nan, nan) "interval"
        raise ValueError(f"mean_ci: {int((~np.isfinite(v)).sum())} of {v.size} values are not finite")
    if v.size < 2:
        return float(v.mean()), math.nan
    half = student_t_quantile((1 + level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def prompt_mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width (t-interval at ``level``) of a [M, K] grid, taken over the M per-prompt means."""
    v = np.asarray(values, np.float64)
    if v.ndim != 2:
        raise ValueError(f"prompt_mean_ci: expected a [prompts, samples] grid, got shape {v.shape}")
    return mean_ci(v.mean(axis=1), level)


def best_of_n_by_prompt(proxy: np.ndarray, gold: np.ndarray, ns: Sequence[int]) -> np.ndarray:
    """Unbiased best-of-n gold estimate of each prompt: [M, N] proxy and gold grids → [M, len(ns)].

    Row m is ``rl.best_of_n_curve(proxy[m], gold[m], ns)``: the expected gold of the highest-proxy of n
    samples, estimated from all N ≥ n samples of that prompt.
    """
    proxy, gold = np.asarray(proxy, np.float64), np.asarray(gold, np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 2:
        raise ValueError(f"best_of_n_by_prompt: proxy {proxy.shape} and gold {gold.shape} must be one [M, N]")
    if max(ns) > proxy.shape[1]:
        raise ValueError(f"best_of_n_by_prompt: n = {max(ns)} needs at least that many samples per prompt, "
                         f"got {proxy.shape[1]}")
    ns_arr = np.asarray(ns)
    return np.stack([best_of_n_curve(p, g, ns_arr) for p, g in zip(proxy, gold)])


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One policy on a reward-vs-distance curve: an RL checkpoint (``x`` = step) or best-of-n (``x`` = n)."""

    x: int
    kl: float
    gold: float
    gold_ci: float
    proxy: float
    proxy_ci: float = math.nan
    optimal: float = math.nan

    @property
    def sqrt_kl(self) -> float:
        return math.sqrt(max(self.kl, 0.0))


def best_of_n_points(proxy: np.ndarray, gold: np.ndarray, optimal: np.ndarray | None,
                     ns: Sequence[int]) -> list[CurvePoint]:
    """Best-of-n from [M, N] samples of the base policy: for each n, gold (mean ± 95% CI over prompts),
    proxy (the expected best proxy score), fraction optimal, and KL = log n − (n − 1)/n."""
    golds = best_of_n_by_prompt(proxy, gold, ns)
    proxies = best_of_n_by_prompt(proxy, proxy, ns)
    optimals = None if optimal is None else best_of_n_by_prompt(proxy, np.asarray(optimal, np.float64), ns)
    points = []
    for j, n in enumerate(ns):
        g, g_ci = mean_ci(golds[:, j])
        p, p_ci = mean_ci(proxies[:, j])
        opt = math.nan if optimals is None else float(optimals[:, j].mean())
        points.append(CurvePoint(int(n), float(best_of_n_kl(n)), g, g_ci, p, p_ci, opt))
    return points


def pair_agreement(proxy: np.ndarray, gold: np.ndarray) -> tuple[float, int]:
    """How often the proxy orders a pair like the oracle: [P, 2] scores of P response pairs → (fraction, the
    number of pairs compared). Pairs the oracle ties are left out; a proxy tie counts as half."""
    proxy, gold = np.asarray(proxy, np.float64), np.asarray(gold, np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 2 or proxy.shape[1] != 2:
        raise ValueError(f"pair_agreement: expected two [pairs, 2] arrays, got {proxy.shape} and "
                         f"{gold.shape}")
    gold_sign = np.sign(gold[:, 0] - gold[:, 1])
    proxy_sign = np.sign(proxy[:, 0] - proxy[:, 1])
    keep = gold_sign != 0
    if not keep.any():
        return math.nan, 0
    agree = np.where(proxy_sign[keep] == 0, 0.5, (proxy_sign[keep] == gold_sign[keep]).astype(np.float64))
    return float(agree.mean()), int(keep.sum())


def intervals_separated(a_mean: float, a_half: float, b_mean: float, b_half: float) -> bool:
    """Whether a's 95% interval lies entirely above b's: a − a_half > b + b_half."""
    return a_mean - a_half > b_mean + b_half

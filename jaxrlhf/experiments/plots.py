"""PNG plots of a demo run: gold and proxy reward against √KL(π ‖ π_SFT) for every method and best-of-n, with
the Gao et al. fitted curves (dashed) on the gold plot.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so plotting works
headless and leaves a user's interactive backend alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxrlhf.experiments.curves import CurvePoint

STYLES = {"PPO": ("tab:blue", "o"), "A2C": ("tab:orange", "s"), "best-of-n": ("tab:green", "^"),
          "GRPO": ("tab:red", "D"), "RLOO": ("tab:purple", "v"), "DPO": ("tab:brown", "P"),
          "GRPO (gold)": ("black", "*"), "PPO (RM ens. WCO)": ("tab:cyan", "X"),
          "PPO (RM ens. UWO)": ("tab:olive", "h")}


def _nan_to_zero(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def plot_reward_vs_sqrt_kl(curves: Mapping[str, Sequence[CurvePoint]], metric: str, path: str | os.PathLike,
                           title: str = "", optimum: float | None = None,
                           fits: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """One PNG: ``metric`` ("gold" or "proxy", with 95% error bars) against √KL for each named curve.

    Curve points are labelled with their step / n at the ends; ``optimum`` draws the best attainable
    reward as a dotted line; ``fits`` (name → a Gao fit as ``gao_fits.GaoFit.as_dict``, or a dict with
    ``"error"``) draws each fitted curve dashed in its curve's colour, up to its largest fitted d.
    Returns the path written.
    """
    if metric not in ("gold", "proxy"):
        raise ValueError(f"plot_reward_vs_sqrt_kl: metric must be 'gold' or 'proxy', got {metric!r}")
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in curves.items():
        if not points:
            continue
        color, marker = STYLES.get(name, (None, "o"))
        xs = [p.sqrt_kl for p in points]
        ys = [getattr(p, metric) for p in points]
        err = [_nan_to_zero(getattr(p, f"{metric}_ci")) for p in points]
        drawn = ax.errorbar(xs, ys, yerr=err, label=name, color=color, marker=marker, markersize=4,
                            capsize=2, linewidth=1.3)
        color = drawn.lines[0].get_color()  # a name without a style gets the next colour of the cycle
        fit = (fits or {}).get(name)
        if fit and "error" not in fit:
            d = np.linspace(0.0, fit["d_max"], 60)
            second = d * d if fit["form"] == "bon" else d * np.log(np.where(d > 0, d, 1.0))
            r = fit["gold_at_zero"] + fit["alpha"] * d - fit["beta"] * second
            ax.plot(d, r, linestyle="--", color=color, linewidth=0.9, alpha=0.8)
        unit = "n" if name == "best-of-n" else "step"
        ax.annotate(f"{unit} {points[-1].x}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, color=color)
    if optimum is not None:
        ax.axhline(optimum, linestyle=":", color="grey", linewidth=1, label="optimum")
    ax.set_xlabel("√KL(π ‖ π_SFT)  (√nats)")
    ax.set_ylabel(f"{metric} reward" + (" (oracle)" if metric == "gold" else " (reward model, normalised)"))
    ax.set_title(title or f"{metric} reward against distance from the SFT policy")
    ax.grid(alpha=0.3)
    if fits:
        ax.plot([], [], linestyle="--", color="grey", linewidth=0.9, label="Gao et al. fit")
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path

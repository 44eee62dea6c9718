"""PNG plots of a study (matplotlib's Agg canvas, no pyplot): gold reward against √KL along RL for every
variant, and each variant's paired difference from the baseline with its interval over seeds."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxrlhf.experiments.statistics import PairedComparison, mean_interval
from jaxrlhf.experiments.studies.study_run import VariantRuns


def _save(fig: Figure, path: str | os.PathLike) -> str:
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_curves(variants: Sequence[VariantRuns], steps: Sequence[int], path: str | os.PathLike,
                title: str) -> str:
    """Gold reward against √KL(π ‖ π_SFT) at every evaluation point: the mean over seeds of each seed's
    mean over prompts, with 95% error bars over seeds; the last point labelled with its RL step."""
    fig = Figure(figsize=(7.2, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for v in variants:
        gold = v.curve.gold.mean(axis=2)  # [S, points + 1]
        kl = v.curve.kl.mean(axis=2)
        xs = np.sqrt(np.maximum(kl.mean(axis=0), 0.0))
        ys = gold.mean(axis=0)
        err = [mean_interval(gold[:, i]).half_width for i in range(gold.shape[1])]
        err = [e if math.isfinite(e) else 0.0 for e in err]
        line = ax.errorbar(xs, ys, yerr=err, marker="o", markersize=3, capsize=2, linewidth=1.2,
                           label=v.label)
        ax.annotate(f"step {steps[-1]}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 3),
                    fontsize=6, color=line[0].get_color())
    ax.set_xlabel("√KL(π ‖ π_SFT)  (√nats, mean over seeds)")
    ax.set_ylabel("gold reward (oracle; ± 95% CI over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    return _save(fig, path)


def plot_differences(labels: Sequence[str], gold: Sequence[PairedComparison],
                     kl: Sequence[PairedComparison], path: str | os.PathLike, baseline: str) -> str:
    """Two panels of horizontal 95% intervals over seeds: Δ final gold and Δ final KL against the
    baseline, one row per variant."""
    fig = Figure(figsize=(8.0, 0.45 * len(labels) + 1.6), dpi=100)
    FigureCanvasAgg(fig)
    rows = np.arange(len(labels))[::-1]
    for i, (name, comparisons) in enumerate((("Δ final gold reward", gold), ("Δ final KL (nats)", kl))):
        ax = fig.add_subplot(1, 2, i + 1)
        values = np.asarray([c.difference.value for c in comparisons])
        low = np.asarray([c.difference.low for c in comparisons])
        high = np.asarray([c.difference.high for c in comparisons])
        finite = np.isfinite(low) & np.isfinite(high)
        xerr = np.where(finite, [values - low, high - values], 0.0)
        ax.errorbar(values, rows, xerr=xerr, fmt="o", capsize=3, color="tab:blue")
        ax.axvline(0.0, color="grey", linewidth=1, linestyle=":")
        ax.set_yticks(rows)
        ax.set_yticklabels(labels if i == 0 else [""] * len(labels), fontsize=7)
        ax.set_xlabel(f"{name} vs {baseline}\n(± 95% CI over seeds)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)

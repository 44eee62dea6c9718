"""What every study shares: its run section, the seeds' keys (split as ``train`` splits them), a clock for
the compiled programs, the per-variant results and their summaries across seeds, and the run directory
(``config.yaml``, ``report.md``, ``results.json``, ``curves.npz``, ``plots/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxrlhf.config import ConfigError, to_dict
from jaxrlhf.experiments.pipeline import Pipeline, replace_config
from jaxrlhf.experiments.pipeline_config import PipelineConfig
from jaxrlhf.experiments.pipeline_stages import EvalPoint
from jaxrlhf.experiments.statistics import (
    UNIT_SEEDS,
    PairedComparison,
    SeedSummary,
    across_seeds,
    holm_adjusted,
    mean_interval,
    paired_comparison,
)

# Both studies' --quick presets start from this: a tiny pipeline and 3 seeds.
PIPELINE_QUICK: tuple[str, ...] = (
    "run.quick=true", "run.seeds=3",
    "pipeline.model.hidden_size=32", "pipeline.model.num_heads=2",
    "pipeline.task.options={min_digits: 3, max_digits: 3, max_response_tokens: 5}",
    "pipeline.sft.demonstrations=128", "pipeline.sft.batch_size=16", "pipeline.sft.steps=20",
    "pipeline.feedback.responses=64", "pipeline.feedback.prompt_pool=64",
    "pipeline.reward.batch_size=16", "pipeline.reward.steps=10", "pipeline.reward.normalization_samples=32",
    "pipeline.reward.agreement_pairs=32",
    "pipeline.rl.iterations=4", "pipeline.rl.batch_size=16", "pipeline.rl.prompt_pool=64",
    "pipeline.rl.ppo.epochs=2", "pipeline.evaluation.prompts=32", "pipeline.evaluation.points=2",
)


@dataclasses.dataclass(frozen=True)
class StudyRunSection:
    """Where the study goes and how many seeds it runs. ``dir`` null: ``runs/study-<name>-<date>-<time>``.
    The seeds' keys are ``jax.random.split(jax.random.key(seed), seeds)``."""

    dir: str | None = None
    seeds: int = 8
    seed: int = 0
    quick: bool = False  # set by --quick together with the preset's values; only labels the report


def study_pipeline() -> PipelineConfig:
    """The pipeline a study varies: the pipeline's defaults (the demo's model, batches of 64, digit_sort with
    3–4 digits) with fewer steps, so that ≥ 8 seeds of every variant fit in 15 minutes on 2 CPU cores:
    SFT and reward model 200 steps, RL 40 iterations evaluated every 10 on 128 eval prompts × 2 samples."""
    return replace_config(PipelineConfig(), sft={"steps": 200}, reward={"steps": 200},
                          rl={"iterations": 40}, evaluation={"prompts": 128, "points": 4})


@dataclasses.dataclass
class StudyResult:
    """What a study leaves: the run directory, the report, the results dict and a console summary."""

    run_dir: str
    report: str
    results: dict[str, Any]
    summary: str


def seed_keys(run: StudyRunSection) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(train keys [S], upstream keys [S], RL keys [S]): ``upstream, rl = split(train key)``, as ``train``
    splits it."""
    if run.seeds < 2:
        raise ValueError(f"run.seeds: a study needs >= 2 seeds for intervals across seeds, got {run.seeds}")
    keys = jax.random.split(jax.random.key(run.seed), run.seeds)
    pairs = jax.vmap(jax.random.split)(keys)
    return keys, pairs[:, 0], pairs[:, 1]


class ProgramClock:
    """Announces each compiled program on stderr and records its wall time (compile + run)."""

    def __init__(self, study: str) -> None:
        self.study, self.seconds, self.start = study, {}, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        print(f"[study {self.study}] {what}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start


def study_pipeline_of(cfg: Any) -> Pipeline:
    """``Pipeline(cfg.pipeline)``; its config errors keyed under ``pipeline.``, as the study config has it."""
    try:
        return Pipeline(cfg.pipeline)
    except ConfigError as e:
        key = getattr(e, "key", None)
        raise ConfigError(f"pipeline.{e}", key=f"pipeline.{key}" if key else None) from None


def run_directory(run: StudyRunSection, name: str, config: Any) -> Path:
    """The run directory with ``config.yaml`` (the resolved study config, rerunnable with --config)."""
    root = Path(run.dir or time.strftime(f"runs/study-{name}-%Y%m%d-%H%M%S")).absolute()
    (root / "plots").mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(
        f"# jaxrlhf study {name} --config {root / 'config.yaml'} reruns this study"
        f"{' (the --quick preset is folded in)' if run.quick else ''}\n"
        + yaml.safe_dump(to_dict(config), sort_keys=False))
    return root


def host(tree: Any) -> Any:
    """A pytree of device arrays as NumPy arrays."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


@dataclasses.dataclass
class VariantRuns:
    """One variant over S seeds: the evaluation curve (each field [S, points + 1, M]), the reward model's
    agreement with the oracle [S], and the feedback's label agreement [S] (NaN where not measured)."""

    name: str
    label: str
    curve: EvalPoint
    agreement: np.ndarray
    label_agreement: np.ndarray

    def final(self, field: str) -> np.ndarray:
        """The final point's mean over prompts, per seed [S]."""
        return getattr(self.curve, field)[:, -1].mean(axis=1)

    def final_prompt_half_width(self, field: str) -> np.ndarray:
        """Each seed's 95% half-width over prompts of the final point's mean [S]."""
        values = getattr(self.curve, field)[:, -1]
        return np.asarray([mean_interval(v).half_width for v in values])


def seed_summary(runs: VariantRuns, field: str) -> SeedSummary:
    """The final ``field`` across seeds, with each run's own interval over prompts beside it."""
    return across_seeds(runs.final(field), runs.final_prompt_half_width(field), runs.curve.gold.shape[-1])


def paired_with(runs: VariantRuns, baseline: VariantRuns, field: str, seed: int = 0) -> PairedComparison:
    """The final ``field`` of ``runs`` minus the baseline's on the same seeds: mean over seeds with a
    studentized bootstrap interval and two-sided p-value (unit: seeds)."""
    return paired_comparison(runs.final(field), baseline.final(field), unit=UNIT_SEEDS, seed=seed)


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def summary_cell(summary: dict, digits: int = 3) -> str:
    """``0.512 ± 0.040`` from a :class:`SeedSummary` as a dict (the column header names the unit)."""
    e = summary["estimate"]
    half = max(e["value"] - e["low"], e["high"] - e["value"])
    return f"{fmt(e['value'], digits)} ± {fmt(half, digits)}"


def delta_cell(comparison: dict | None, digits: int = 3) -> str:
    """``+0.031 [−0.004, +0.066], p = 0.08 (Holm 0.31)`` from a :class:`PairedComparison` as a dict, with
    its Holm-adjusted p-value when :func:`add_holm` set one (— for none)."""
    if comparison is None:
        return "—"
    d = comparison["difference"]
    holm = f" (Holm {comparison['p_holm']:.2g})" if "p_holm" in comparison else ""
    return (f"{d['value']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}], "
            f"p = {comparison['p_value']:.2g}{holm}")


def add_holm(variants: dict[str, dict], keys: Sequence[str]) -> int:
    """Give every comparison ``variants[*][key]`` (``key`` in ``keys``) its Holm-adjusted p-value
    (``p_holm``) over the study's whole family of such comparisons; returns the family's size."""
    family = [entry[k] for entry in variants.values() for k in keys if k in entry]
    for comparison, adjusted in zip(family, holm_adjusted([c["p_value"] for c in family])):
        comparison["p_holm"] = adjusted
    return len(family)


MULTIPLICITY = ("Each Δ's p-value is its own test; the study runs {m} of them, so the Holm-adjusted p-value "
                "beside it (Holm 1979) is the one that keeps the chance of any false 'significant' among "
                "all {m} at 5% (with 8 choices that change nothing, at least one unadjusted p < 0.05 turns "
                "up in ~30% of studies). Only about that: at 8 seeds the bootstrap's smallest p-values run "
                "small, and on simulated seed differences with no effect 16 Holm-adjusted Δs called one "
                "'significant' in 7% of studies (normal differences), 6.5% (t with 3 d.f.) and 14% (strongly "
                "skewed); read a Holm p near 0.05 as unresolved and add seeds.")


def json_safe(value: Any) -> Any:
    """NaN and infinities as null, NumPy scalars and arrays as Python values: strict JSON."""
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_results(root: Path, results: dict[str, Any], variants: list[VariantRuns]) -> None:
    """``results.json`` and ``curves.npz`` (every variant's per-seed, per-point, per-prompt curves)."""
    (root / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
    arrays = {f"{v.name}/{field}": getattr(v.curve, field) for v in variants for field in EvalPoint._fields}
    np.savez_compressed(root / "curves.npz", **arrays)

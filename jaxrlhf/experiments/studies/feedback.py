"""``jaxrlhf study feedback``: the type, quality and amount of feedback at an equal annotation budget.

Variants (:func:`feedback_variants`), each against the default feedback of ``pipeline.feedback``:

- type: pairwise preferences, k-wise rankings (Plackett–Luce), ratings (quantised), all from the same
  budget of ``feedback.responses`` SFT responses read by the annotator (pairs: responses / 2 queries,
  rankings: responses / k, ratings: one query per response);
- quality: annotator noise, as flipped pairwise labels (ε) and as the Bradley–Terry temperature τ;
- amount: the reward model trained on a part of the budget.

Each is measured twice: as the reward model's agreement with the oracle (on pairs of fresh SFT samples of
held-out prompts) and as the gold reward PPO reaches against that reward model. Per seed, the SFT policy is
trained once and shared; the feedback and reward model of every variant of one feedback type run as one
program vmapped over (variants × seeds); PPO against every reward model runs as one program vmapped over
(variants × seeds), with the same RL key per seed, so the comparisons with the default are paired.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from jaxrlhf.config import ConfigError
from jaxrlhf.experiments.pipeline import Pipeline, Upstream
from jaxrlhf.experiments.pipeline_config import PipelineConfig, stack_hparams, static_hparams
from jaxrlhf.experiments.pipeline_data import describe_data
from jaxrlhf.experiments.pipeline_stages import RewardOutput, SFTOutput
from jaxrlhf.experiments.statistics import UNIT_SEEDS, across_seeds, paired_comparison
from jaxrlhf.experiments.studies.study_plots import plot_curves, plot_differences
from jaxrlhf.experiments.studies.study_run import (
    MULTIPLICITY,
    PIPELINE_QUICK,
    ProgramClock,
    StudyResult,
    StudyRunSection,
    VariantRuns,
    add_holm,
    delta_cell,
    host,
    paired_with,
    run_directory,
    seed_keys,
    seed_summary,
    study_pipeline,
    study_pipeline_of,
    summary_cell,
    write_results,
)

KIND_LABELS = {"preference": "pairwise preferences", "ranking": "{k}-wise rankings", "rating": "ratings"}


@dataclasses.dataclass(frozen=True)
class FeedbackStudyConfig:
    """``jaxrlhf study feedback``: the default feedback is ``pipeline.feedback``; every entry below adds a
    variant that changes one thing. ``kinds``: feedback types (at the same budget); ``flip_probs``: pairwise
    labels flipped at random (the default type must be pairwise); ``temperatures``: the annotator's τ;
    ``responses``: parts of the budget the reward model trains on."""

    run: StudyRunSection = field(default_factory=StudyRunSection)
    pipeline: PipelineConfig = field(default_factory=study_pipeline)
    kinds: tuple[Literal["preference", "ranking", "rating"], ...] = ("preference", "ranking", "rating")
    flip_probs: tuple[float, ...] = (0.25,)
    temperatures: tuple[float, ...] = (1.0,)
    responses: tuple[int, ...] = (256,)

    def __post_init__(self) -> None:
        fb = self.pipeline.feedback
        if self.flip_probs and fb.annotator.kind != "preference":
            raise ConfigError(f"flip_probs: flipped labels are pairwise; pipeline.feedback.annotator.kind is "
                              f"{fb.annotator.kind!r}")
        if any(not 0.0 <= p <= 1.0 for p in self.flip_probs):
            raise ConfigError(f"flip_probs: probabilities in [0, 1], got {list(self.flip_probs)}")
        if any(not (math.isfinite(t) and t >= 0) for t in self.temperatures):
            raise ConfigError(f"temperatures: must be finite and >= 0, got {list(self.temperatures)}")
        if any(not 0 < n <= fb.responses for n in self.responses):
            raise ConfigError(f"responses: parts of the budget, in 1..{fb.responses} "
                              f"(pipeline.feedback.responses), got {list(self.responses)}")
        for kind in self.kinds:  # every type must fit the prompt pool at the same budget
            dataclasses.replace(self.pipeline, feedback=dataclasses.replace(
                fb, annotator=dataclasses.replace(fb.annotator, kind=kind)))
        if self.pipeline.rl.method not in ("ppo", "a2c"):
            raise ConfigError(f"pipeline.rl.method: expected ppo or a2c, got {self.pipeline.rl.method!r}")
        if self.run.seeds < 2:
            raise ConfigError(f"run.seeds: need >= 2 seeds for intervals across seeds, got {self.run.seeds}")


QUICK_OVERRIDES: tuple[str, ...] = (
    *PIPELINE_QUICK,
    "flip_probs=[0.25]", "temperatures=[1.0]", "responses=[32]",
)


class FeedbackVariant(NamedTuple):
    name: str
    label: str
    kind: str
    hparams: dict[str, Any]  # feedback hyper-parameters (dotted names)


def _kind_label(kind: str, cfg: PipelineConfig) -> str:
    label = KIND_LABELS[kind].format(k=cfg.feedback.ranking_size)
    if kind == "rating":
        a = cfg.feedback.annotator
        label += f" ({a.num_levels} levels, σ = {a.noise_std:g})"
    return label


def feedback_variants(cfg: FeedbackStudyConfig) -> list[FeedbackVariant]:
    """The default first, then one variant per kind, flip probability, temperature and budget part."""
    fb = cfg.pipeline.feedback
    kind = fb.annotator.kind
    base = _kind_label(kind, cfg.pipeline)
    default = f"{base}, τ = {fb.annotator.temperature:g}" + (
        f", ε = {fb.annotator.flip_prob:g}" if fb.annotator.flip_prob else "") + " (default)"
    out = [FeedbackVariant("default", default, kind, {})]
    out += [FeedbackVariant(k, _kind_label(k, cfg.pipeline), k, {}) for k in cfg.kinds if k != kind]
    out += [FeedbackVariant(f"flip_{p:g}", f"{base}, {p:.0%} of labels flipped", kind,
                            {"feedback.flip_prob": p}) for p in cfg.flip_probs]
    out += [FeedbackVariant(f"temperature_{t:g}", f"{base}, τ = {t:g}", kind,
                            {"feedback.annotator_temperature": t}) for t in cfg.temperatures]
    out += [FeedbackVariant(f"responses_{n}", f"{base}, {n} of {fb.responses} responses", kind,
                            {"feedback.responses": n}) for n in cfg.responses]
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"feedback study: variants repeat: {names}")
    return out


def _with_kind(cfg: PipelineConfig, kind: str) -> PipelineConfig:
    fb = cfg.feedback
    return dataclasses.replace(cfg, feedback=dataclasses.replace(
        fb, annotator=dataclasses.replace(fb.annotator, kind=kind)))


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def run_feedback_study(cfg: FeedbackStudyConfig) -> StudyResult:
    """Run the study (see the module docstring); writes the run directory and prints the summary."""
    clock = ProgramClock("feedback")
    pipeline = study_pipeline_of(cfg)  # first: a bad task fails before anything is written
    root = run_directory(cfg.run, "feedback", cfg)
    variants = feedback_variants(cfg)
    s = cfg.run.seeds
    _, upstream_keys, rl_keys = seed_keys(cfg.run)
    splits = jax.vmap(lambda k: jax.random.split(k, 3))(upstream_keys)  # as Pipeline.upstream splits
    sft_keys, feedback_keys, reward_keys = splits[:, 0], splits[:, 1], splits[:, 2]

    with clock("sft", f"SFT of {s} seeds (one vmapped program)"):
        sft = jax.block_until_ready(jax.jit(jax.vmap(pipeline.stages.sft))(sft_keys))
    rewards: dict[str, RewardOutput] = {}
    feedback_metrics: dict[str, dict] = {}
    for kind in dict.fromkeys(v.kind for v in variants):
        members = [v for v in variants if v.kind == kind]
        kind_pipeline = Pipeline(_with_kind(cfg.pipeline, kind), data=pipeline.data)
        stages = kind_pipeline.stages

        def feedback_and_reward(feedback_key, reward_key, sft_params, hp, stages=stages):
            feedback = stages.feedback(feedback_key, sft_params, hp)
            return feedback.metrics, stages.reward_model(reward_key, sft_params, feedback)

        grid = stack_hparams([static_hparams(kind_pipeline.config, **v.hparams).feedback for v in members])
        over_seeds = jax.vmap(feedback_and_reward, in_axes=(0, 0, 0, None))
        program = jax.jit(jax.vmap(over_seeds, in_axes=(None, None, None, 0)))
        with clock(f"reward_{kind}", f"{_kind_label(kind, cfg.pipeline)}: feedback and reward model for "
                                     f"{len(members)} variants × {s} seeds (one vmapped program)"):
            metrics, reward = jax.block_until_ready(program(feedback_keys, reward_keys, sft.params, grid))
        for i, v in enumerate(members):
            feedback_metrics[v.name] = host(jax.tree.map(lambda x, i=i: x[i], metrics))
            rewards[v.name] = jax.tree.map(lambda x, i=i: x[i], reward)

    names = [v.name for v in variants]
    stacked = _stack([RewardOutput(rewards[n].params, rewards[n].normalization, {}) for n in names])
    upstream = Upstream(SFTOutput(sft.params, {}), None, stacked)
    over_seeds = jax.vmap(pipeline.downstream, in_axes=(0, Upstream(SFTOutput(0, None), None, 0)))
    program = jax.jit(jax.vmap(over_seeds, in_axes=(None, Upstream(SFTOutput(None, None), None, 0))))
    with clock("rl", f"{cfg.pipeline.rl.method.upper()} against {len(names)} reward models × {s} seeds "
                     "(one vmapped program)"):
        out = host(program(rl_keys, upstream))

    runs = [VariantRuns(v.name, v.label, jax.tree.map(lambda x, i=i: x[i], out.curve),
                        host(rewards[v.name].metrics["reward/oracle_agreement"]),
                        feedback_metrics[v.name]["feedback/label_agreement"]) for i, v in enumerate(variants)]
    results = _results(cfg, pipeline, variants, runs, feedback_metrics, clock)
    results["plots"] = {"curves": "plots/gold_vs_sqrt_kl.png", "differences": "plots/differences.png"}
    plot_curves(runs, pipeline.evaluation_steps, root / results["plots"]["curves"],
                f"Feedback type, quality and amount ({s} seeds, {cfg.pipeline.task.name})")
    others = runs[1:]
    if others:
        plot_differences([r.label for r in others], [paired_with(r, runs[0], "gold") for r in others],
                         [paired_with(r, runs[0], "kl") for r in others],
                         root / results["plots"]["differences"], "the default feedback")
    results["timings"] = {**clock.seconds, "total": clock.total()}
    report = render_report(results)
    (root / "report.md").write_text(report)
    write_results(root, results, runs)
    summary = render_summary(results) + f"report: {root / 'report.md'} (results.json, plots/ beside it)\n"
    print(summary, flush=True)
    return StudyResult(str(root), str(root / "report.md"), results, summary)


def _results(cfg: FeedbackStudyConfig, pipeline: Pipeline, variants: list[FeedbackVariant],
             runs: list[VariantRuns], feedback_metrics: dict[str, dict],
             clock: ProgramClock) -> dict[str, Any]:
    p, fb = cfg.pipeline, cfg.pipeline.feedback
    baseline = runs[0]
    table = {}
    for v, r in zip(variants, runs):
        entry = {
            "label": r.label, "kind": v.kind, "hparams": v.hparams,
            "queries": float(np.mean(feedback_metrics[v.name]["feedback/queries"])),
            "label_agreement": dataclasses.asdict(across_seeds(r.label_agreement)),
            "reward_agreement": dataclasses.asdict(across_seeds(r.agreement)),
            **{f"final_{k}": dataclasses.asdict(seed_summary(r, k)) for k in ("gold", "kl", "proxy")},
            "per_seed": {"reward_agreement": r.agreement.tolist(),
                         **{k: r.final(k).tolist() for k in ("gold", "kl", "proxy")}},
            "curve_mean": {k: getattr(r.curve, k).mean(axis=(0, 2)).tolist() for k in ("gold", "kl")},
        }
        if v.name != "default":
            entry["delta_agreement"] = dataclasses.asdict(
                paired_comparison(r.agreement, baseline.agreement, unit=UNIT_SEEDS))
            entry["delta_gold"] = dataclasses.asdict(paired_with(r, baseline, "gold"))
        table[v.name] = entry
    add_holm(table, ("delta_agreement", "delta_gold"))
    a = fb.annotator
    return {
        "study": "feedback", "quick": cfg.run.quick, "seeds": cfg.run.seeds, "unit": UNIT_SEEDS,
        "data": describe_data(pipeline.data),
        "settings": [
            ["task", pipeline.data.task.describe()],
            ["model", f"{p.model.family}, d={p.model.hidden_size}, {p.model.num_layers} layers, "
                      f"{p.model.num_heads} heads, from scratch"],
            ["SFT", f"{p.sft.steps} steps × {p.sft.batch_size} of {p.sft.demonstrations} demonstrations"],
            ["annotation budget", f"{fb.responses} SFT responses read by the annotator per seed (pairs: "
                                  f"{fb.responses // 2}, {fb.ranking_size}-wise rankings: "
                                  f"{fb.responses // fb.ranking_size}, ratings: {fb.responses})"],
            ["default annotator", f"{a.kind}, τ = {a.temperature:g}, ε = {a.flip_prob:g}; ratings "
                                  f"{a.num_levels} levels over [{a.rating_low:g}, {a.rating_high:g}], "
                                  f"σ = {a.noise_std:g}"],
            ["reward model", f"{p.reward.steps} steps × {p.reward.batch_size}; agreement on "
                             f"{p.reward.agreement_pairs} pairs of fresh SFT samples of eval prompts"],
            ["RL", f"{p.rl.method.upper()}, {p.rl.iterations} iterations × {p.rl.batch_size} prompts, "
                   f"β = {p.rl.algorithm.kl_coef:g}"],
            ["evaluation", f"{p.evaluation.prompts} eval-split prompts × {p.evaluation.samples_per_prompt} "
                           f"samples at steps {list(pipeline.evaluation_steps)}"],
            ["seeds", f"{cfg.run.seeds} (keys from seed {cfg.run.seed})"],
            ["JAX devices", f"{jax.device_count()} × {jax.devices()[0].platform}"],
        ],
        "variants": table,
        "order": [v.name for v in variants],
        "timings": dict(clock.seconds),
    }


def main_table(results: dict) -> list[str]:
    s = results["seeds"]
    lines = [
        f"| feedback | usable queries | labels agreeing with the oracle (± 95% CI over {s} seeds) | "
        "reward model's agreement with the oracle (± CI) | Δ agreement vs default [95% CI over seeds], p | "
        "final gold (± CI) | Δ gold vs default [95% CI], p | final KL, nats (± CI) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["order"]:
        v = results["variants"][name]
        cells = [v["label"], f"{v['queries']:.0f}", summary_cell(v["label_agreement"]),
                 summary_cell(v["reward_agreement"]), delta_cell(v.get("delta_agreement")),
                 summary_cell(v["final_gold"]), delta_cell(v.get("delta_gold")), summary_cell(v["final_kl"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


READING = (
    "How to read it: every row spends the same annotation budget (responses read by the annotator) unless "
    "it says otherwise. *Labels agreeing with the oracle* is the share of the comparisons the labels imply "
    "that the oracle orders the same way (noise of the annotator); *the reward model's agreement* is the "
    "share of pairs of fresh SFT samples on held-out prompts that the trained reward model orders as the "
    "oracle does (ties in gold left out), the quality of what RL will optimise; *final gold* is the oracle's "
    "reward of the policy after RL against that reward model. ± is the 95% t-interval over seeds (unit: "
    "seeds); Δ is the per-seed difference from the default (same seed, same SFT policy, same RL key), with "
    "a studentized bootstrap 95% interval over seeds and the two-sided p-value of no difference."
)


def render_report(results: dict) -> str:
    lines = [
        "# Study: feedback type, quality and amount (`jaxrlhf study feedback`)",
        "",
        "The same SFT policy per seed, labelled by a simulated annotator in several ways; a reward model "
        "trained on each, and PPO against each." + (" **Quick preset: a smoke run, not a result.**"
                                                   if results["quick"] else ""),
        "",
        "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in results["settings"]],
        "",
        "## Main table",
        "",
        *main_table(results),
        "",
        READING + " " + MULTIPLICITY.format(m=2 * (len(results["variants"]) - 1)),
        "",
        "## Plots",
        "",
        f"![gold reward against √KL for every reward model]({results['plots']['curves']})",
        "",
        f"![paired differences from the default feedback]({results['plots']['differences']})",
        "",
        "## Wall time",
        "",
        "| program | seconds (compile + run) |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in results["timings"].items()],
        "",
    ]
    return "\n".join(lines)


def render_summary(results: dict) -> str:
    head = f"study feedback: {results['seeds']} seeds, {results['timings']['total']:.0f} s"
    return "\n".join([head, *main_table(results)]) + "\n"

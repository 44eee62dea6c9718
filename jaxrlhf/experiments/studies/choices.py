"""``jaxrlhf study choices``: the impact of PPO's implementation choices on the gold reward and the KL.

Each choice is toggled alone from the defaults (:data:`CHOICES`): reward normalisation, advantage
whitening, the KL's placement (reward vs loss) and estimator, an adaptive vs a fixed β, value-loss clipping,
the missing-EOS penalty, and a critic shared with the policy vs a separate one. Every seed's SFT policy,
feedback and reward model are computed once (one vmapped program over the seeds) and shared by every
variant, and every variant uses the same RL key per seed, so each comparison with the defaults is paired:
same seed, same SFT policy, same reward model, same prompts.

Choices that only change numbers run as one program vmapped over (choices × seeds); a structural choice
(the KL's placement or estimator, a separate critic) compiles its own program, vmapped over the seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from jaxrlhf.config import ConfigError
from jaxrlhf.experiments.pipeline import Pipeline
from jaxrlhf.experiments.pipeline_config import PipelineConfig, stack_hparams, static_hparams
from jaxrlhf.experiments.pipeline_data import describe_data
from jaxrlhf.experiments.statistics import UNIT_SEEDS, across_seeds
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
from jaxrlhf.steps import PPOConfig


class Choice(NamedTuple):
    """A choice toggled from the defaults: traced hyper-parameters (``hparams``, dotted names) or changes of
    the RL method's config (``algorithm``: a structural choice, its own program)."""

    label: str
    hparams: dict[str, Any]
    algorithm: dict[str, Any]


CHOICES: dict[str, Choice] = {
    "default": Choice("defaults", {}, {}),
    "no_reward_norm": Choice("no reward normalisation", {"rl.normalize_reward": False}, {}),
    "no_whitening": Choice("no advantage whitening", {"rl.whiten_advantages": False}, {}),
    "adaptive_kl": Choice("adaptive KL controller", {"rl.adaptive_kl": True}, {}),
    "no_value_clip": Choice("no value-loss clipping", {"rl.vf_clip_eps": None}, {}),
    "no_eos_penalty": Choice("no missing-EOS penalty", {"rl.missing_eos_penalty": 0.0}, {}),
    "kl_in_loss": Choice("KL in the loss (k2)", {}, {"kl_in_reward": False, "kl_estimator": "k2"}),
    "kl_k3": Choice("KL estimator k3 (in the reward)", {}, {"kl_estimator": "k3"}),
    "separate_critic": Choice("separate critic", {}, {"critic": "separate"}),
}
ChoiceName = Literal["default", "no_reward_norm", "no_whitening", "adaptive_kl", "no_value_clip",
                     "no_eos_penalty", "kl_in_loss", "kl_k3", "separate_critic"]


def choices_pipeline() -> PipelineConfig:
    """The studies' pipeline (:func:`~jaxrlhf.experiments.studies.study_run.study_pipeline`), with an adaptive
    controller that acts within the run when it is switched on (target 1 nat, horizon 1000 episodes)."""
    base = study_pipeline()
    ppo = dataclasses.replace(base.rl.ppo, kl_target=1.0, kl_horizon=1000)
    return dataclasses.replace(base, rl=dataclasses.replace(base.rl, ppo=ppo))


@dataclasses.dataclass(frozen=True)
class ChoicesStudyConfig:
    """``jaxrlhf study choices``: ``choices`` (names of :data:`CHOICES`; "default" is the baseline and must be
    among them) over ``run.seeds`` seeds of ``pipeline`` (whose RL method must be PPO)."""

    run: StudyRunSection = field(default_factory=StudyRunSection)
    pipeline: PipelineConfig = field(default_factory=choices_pipeline)
    choices: tuple[ChoiceName, ...] = tuple(CHOICES)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if "default" not in self.choices:
            raise ConfigError("choices: 'default' (the baseline of every comparison) must be listed")
        twice = sorted({c for c in self.choices if self.choices.count(c) > 1})
        if twice:
            raise ConfigError(f"choices: listed twice: {twice}")
        if self.pipeline.rl.method != "ppo":
            raise ConfigError(f"pipeline.rl.method: the choices study varies PPO, got "
                              f"{self.pipeline.rl.method!r}")
        if self.run.seeds < 2:
            raise ConfigError(f"run.seeds: need >= 2 seeds for intervals across seeds, got {self.run.seeds}")


# The --quick preset: a tiny pipeline and 3 seeds (a smoke run of every choice).
QUICK_OVERRIDES: tuple[str, ...] = (
    *PIPELINE_QUICK,
)


def _variant_config(cfg: PipelineConfig, changes: dict[str, Any]) -> PipelineConfig:
    ppo: PPOConfig = dataclasses.replace(cfg.rl.ppo, **changes)
    return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, ppo=ppo))


def run_choices_study(cfg: ChoicesStudyConfig) -> StudyResult:
    """Run the study (see the module docstring); writes the run directory and prints the summary."""
    clock = ProgramClock("choices")
    pipeline = study_pipeline_of(cfg)  # first: a bad task fails before anything is written
    root = run_directory(cfg.run, "choices", cfg)
    _, upstream_keys, rl_keys = seed_keys(cfg.run)
    s = cfg.run.seeds
    numeric = [c for c in cfg.choices if not CHOICES[c].algorithm]
    structural = [c for c in cfg.choices if CHOICES[c].algorithm]

    with clock("upstream", f"SFT, feedback and reward model of {s} seeds (one vmapped program)"):
        upstream = jax.block_until_ready(jax.jit(jax.vmap(pipeline.upstream))(upstream_keys))
    outputs: dict[str, Any] = {}
    with clock("numeric", f"PPO for {len(numeric)} numeric choices × {s} seeds (one vmapped program)"):
        grid = stack_hparams([static_hparams(cfg.pipeline, **CHOICES[c].hparams).rl for c in numeric])
        over_seeds = jax.vmap(pipeline.downstream, in_axes=(0, 0, None))
        out = host(jax.jit(jax.vmap(over_seeds, in_axes=(None, None, 0)))(rl_keys, upstream, grid))
        outputs.update({c: jax.tree.map(lambda x, i=i: x[i], out) for i, c in enumerate(numeric)})
    for c in structural:
        variant = Pipeline(_variant_config(cfg.pipeline, CHOICES[c].algorithm), data=pipeline.data)
        with clock(c, f"PPO with {CHOICES[c].label} × {s} seeds (its own program)"):
            outputs[c] = host(jax.jit(jax.vmap(variant.downstream))(rl_keys, upstream))

    up = host(upstream.reward.metrics["reward/oracle_agreement"])
    runs = [VariantRuns(c, CHOICES[c].label, outputs[c].curve, up, host(upstream.feedback.metrics[
        "feedback/label_agreement"])) for c in cfg.choices]
    results = _results(cfg, pipeline, runs, host(upstream), clock)
    results["mechanisms"] = mechanism_activity(outputs, cfg.pipeline.rl.batch_size)
    steps = pipeline.evaluation_steps
    results["plots"] = {
        "curves": "plots/gold_vs_sqrt_kl.png",
        "differences": "plots/differences.png",
    }
    plot_curves(runs, steps, root / results["plots"]["curves"],
                f"PPO implementation choices ({s} seeds, {cfg.pipeline.task.name})")
    others = [r for r in runs if r.name != "default"]
    baseline = runs[cfg.choices.index("default")]
    if others:
        plot_differences([r.label for r in others], [paired_with(r, baseline, "gold") for r in others],
                         [paired_with(r, baseline, "kl") for r in others],
                         root / results["plots"]["differences"], "defaults")
    results["timings"] = {**clock.seconds, "total": clock.total()}
    report = render_report(results)
    (root / "report.md").write_text(report)
    write_results(root, results, runs)
    summary = render_summary(results) + f"report: {root / 'report.md'} (results.json, plots/ beside it)\n"
    print(summary, flush=True)
    return StudyResult(str(root), str(root / "report.md"), results, summary)


def _results(cfg: ChoicesStudyConfig, pipeline: Pipeline, runs: list[VariantRuns], upstream: Any,
             clock: ProgramClock) -> dict[str, Any]:
    p = cfg.pipeline
    algo, annotator = p.rl.ppo, p.feedback.annotator
    baseline = runs[cfg.choices.index("default")]
    variants = {}
    for r in runs:
        entry = {"label": r.label, **{f"final_{k}": dataclasses.asdict(seed_summary(r, k))
                                      for k in ("gold", "kl", "proxy", "optimal")}}
        if r.name != "default":
            entry["delta_gold"] = dataclasses.asdict(paired_with(r, baseline, "gold"))
            entry["delta_kl"] = dataclasses.asdict(paired_with(r, baseline, "kl"))
        entry["per_seed"] = {k: r.final(k).tolist() for k in ("gold", "kl", "proxy")}
        entry["curve_mean"] = {k: getattr(r.curve, k).mean(axis=(0, 2)).tolist()
                               for k in ("gold", "kl", "proxy")}
        variants[r.name] = entry
    add_holm(variants, ("delta_gold", "delta_kl"))
    sft_gold = baseline.curve.gold[:, 0].mean(axis=1)
    defaults = (f"reward normalised (gain/bias on fresh SFT samples), advantages whitened, k1 KL in the "
                f"reward with β = {algo.kl_coef:g} fixed, value loss clipped at {algo.vf_clip_eps}, "
                f"missing-EOS penalty {algo.missing_eos_penalty:g}, value head shared with the policy")
    return {
        "study": "choices", "quick": cfg.run.quick, "seeds": cfg.run.seeds, "unit": UNIT_SEEDS,
        "data": describe_data(pipeline.data),
        "settings": [
            ["task", pipeline.data.task.describe()],
            ["model", f"{p.model.family}, d={p.model.hidden_size}, {p.model.num_layers} layers, "
                      f"{p.model.num_heads} heads, from scratch"],
            ["SFT", f"{p.sft.steps} steps × {p.sft.batch_size} of {p.sft.demonstrations} demonstrations"],
            ["feedback", f"{p.feedback.responses} SFT responses ({annotator.kind}, "
                         f"τ = {annotator.temperature:g}, flip ε = {annotator.flip_prob:g})"],
            ["reward model", f"{p.reward.steps} steps × {p.reward.batch_size}"],
            ["PPO", f"{p.rl.iterations} iterations × {p.rl.batch_size} prompts, "
                    f"lr {p.rl.optimizer.learning_rate:g}, {algo.epochs} epochs, clip ε = {algo.clip_eps:g}"],
            ["defaults", defaults],
            ["adaptive KL (when on)", f"target {algo.kl_target:g} nats, horizon {algo.kl_horizon} episodes"],
            ["evaluation", f"{p.evaluation.prompts} eval-split prompts × {p.evaluation.samples_per_prompt} "
                           f"samples at steps {list(pipeline.evaluation_steps)}"],
            ["seeds", f"{cfg.run.seeds} (keys from seed {cfg.run.seed})"],
            ["JAX devices", f"{jax.device_count()} × {jax.devices()[0].platform}"],
        ],
        "upstream": {
            "sft_gold": dataclasses.asdict(across_seeds(sft_gold)),
            "reward_agreement": dataclasses.asdict(across_seeds(runs[0].agreement)),
            "label_agreement": dataclasses.asdict(across_seeds(runs[0].label_agreement)),
        },
        "variants": variants,
        "choices": list(cfg.choices),
        "timings": dict(clock.seconds),
    }


def mechanism_activity(outputs: dict[str, Any], batch_size: int) -> list[list[str]]:
    """How often each default mechanism acted, from the runs' per-iteration metrics [seeds, iterations]: a
    toggle that changes nothing (an interval of exactly 0) is explained by a mechanism that never acted."""
    rows = []
    if "default" in outputs:
        m = outputs["default"].metrics
        value_clip = np.asarray(m["val/clipfrac_avg"])
        policy_clip = np.asarray(m["policy/clipfrac_avg"])
        no_eos = 1.0 - np.asarray(m["val/num_eos_tokens"]) / batch_size
        rows += [
            ["value-loss clipping (defaults)", f"{100 * value_clip.mean():.3g}% of value-loss tokens clipped "
             f"(mean over iterations and seeds; at most {100 * value_clip.max():.3g}% in one iteration)"],
            ["policy-ratio clipping (defaults)", f"{100 * policy_clip.mean():.3g}% of tokens clipped (mean; "
             f"at most {100 * policy_clip.max():.3g}%)"],
            ["missing-EOS penalty (defaults)", f"{100 * no_eos.mean():.3g}% of RL responses without eos, "
             f"penalised (mean; at most {100 * no_eos.max():.3g}%)"],
        ]
    if "adaptive_kl" in outputs:
        beta = np.asarray(outputs["adaptive_kl"].metrics["objective/kl_coef"])
        rows.append(["adaptive KL controller", f"β from {beta[:, 0].mean():.3g} to {beta[:, -1].mean():.3g} "
                     f"(mean over seeds; range over all iterations {beta.min():.3g}–{beta.max():.3g})"])
    return rows


def main_table(results: dict) -> list[str]:
    s = results["seeds"]
    lines = [
        f"| choice | final gold (± 95% CI over {s} seeds) | Δ gold vs defaults [95% CI over seeds], p | "
        f"final KL to SFT, nats (± CI) | Δ KL [95% CI], p | final proxy (± CI) | optimal answers (± CI) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["choices"]:
        v = results["variants"][name]
        cells = [v["label"], summary_cell(v["final_gold"]), delta_cell(v.get("delta_gold")),
                 summary_cell(v["final_kl"]), delta_cell(v.get("delta_kl")), summary_cell(v["final_proxy"]),
                 summary_cell(v["final_optimal"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(results: dict) -> str:
    s = results["seeds"]
    up = results["upstream"]
    lines = [
        "# Study: PPO implementation choices (`jaxrlhf study choices`)",
        "",
        "Each choice is toggled alone from the defaults. Every seed's SFT policy, feedback and reward "
        "model are trained once and shared by every choice, and every choice uses the same RL key per "
        "seed, so each Δ is a paired comparison (same seed, same SFT policy and reward model, same "
        "prompts and evaluation samples)."
        + (" **Quick preset: a smoke run, not a result.**" if results["quick"] else ""),
        "",
        "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in results["settings"]],
        "",
        "## Main table",
        "",
        *main_table(results),
        "",
        "How to read it: *final* is the policy after the last RL iteration, evaluated on held-out "
        "eval-split prompts (the mean over prompts of each prompt's mean over its samples), then averaged "
        "over "
        f"seeds; the ± is the 95% t-interval over the {s} seeds (unit: seeds). Δ is the per-seed "
        "difference from the defaults averaged over seeds, with a studentized bootstrap 95% interval over "
        "seeds and the two-sided p-value of no difference. An interval that excludes 0 says the choice "
        "moves the result beyond seed-to-seed noise. "
        f"{MULTIPLICITY.format(m=2 * (len(results['variants']) - 1))} Gold is the oracle's reward (the "
        "truth), proxy the "
        "reward model's normalised score (what PPO optimises), KL the distance from the SFT policy (Σ "
        "over the response of log π − log π_SFT, on the policy's own samples).",
        "",
        "## How often each mechanism acted",
        "",
        "A choice whose Δ is exactly 0 turned off a mechanism that (almost) never acted at these settings.",
        "",
        "| mechanism | activity |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in results.get("mechanisms", [])],
        "",
        "## Shared upstream (per seed, the same for every choice)",
        "",
        f"- SFT policy's gold reward: {summary_cell(up['sft_gold'])} (95% CI over {s} seeds)",
        f"- reward model's agreement with the oracle on pairs of fresh SFT samples: "
        f"{summary_cell(up['reward_agreement'])} (95% CI over {s} seeds)",
        f"- annotator labels agreeing with the oracle's order: {summary_cell(up['label_agreement'])} "
        f"(95% CI over {s} seeds)",
        "",
        "## Plots",
        "",
        f"![gold reward against √KL for every choice]({results['plots']['curves']})",
        "",
        f"![paired differences from the defaults]({results['plots']['differences']})",
        "",
        "## Wall time",
        "",
        "| program | seconds (compile + run) |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in results["timings"].items()],
        "",
    ]
    return "\n".join(lines)


def render_summary(results: dict) -> str:
    head = f"study choices: {results['seeds']} seeds, {results['timings']['total']:.0f} s"
    lines = [head, *main_table(results)]
    return "\n".join(lines) + "\n"

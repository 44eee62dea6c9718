"""``report.md`` of a demo run, and the one-screen console summary, rendered from the results dict.

The results dict is plain JSON (the demo saves it as ``results.json``); its keys:

- ``run_dir``, ``quick`` (bool), ``task``: ``{"name", "description", "oracle"}``
- ``settings``: ``[[name, value], ...]``; ``timings``: ``{stage: seconds}`` (``"total"`` last)
- ``data``: ``{"files": {label: path}, "feedback": {"kind", "train_records", "eval_records",
  "dropped_unfinished", "coverage": coverage_report(...)}}``
- ``sft`` (optional): ``{"eval_loss", "eval_token_accuracy"}``; ``reward_model``: ``{"eval_accuracy",
  "agreement", "agreement_pairs"}``
- ``policies``: ``{"SFT" | "PPO" | "A2C": PolicyEval fields}``; ``best_of_n``: ``[CurvePoint fields]`` (x = n)
- ``curves``: ``{"PPO" | "A2C": [CurvePoint fields]}`` (x = step); ``verdicts``: ``{name: {"overoptimized",
  "text"}}``; ``rule``: the over-optimisation rule; ``acceptance``: ``{"ppo_beats_sft": bool}``
- ``exports``, ``plots``, ``configs``, ``logs``: ``{label: path relative to run_dir}``

Paths are relative to the run directory, so the report's links work wherever the directory is moved.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

TABLE_BEST_OF_N = (4, 16, 64)
TABLE_HEADER = (
    "| policy | gold reward (95% CI) | proxy reward | KL to SFT (nats) | √KL | optimal answers |",
    "|---|---:|---:|---:|---:|---:|",
)


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _gold(row: dict) -> str:
    return f"{_num(row['gold'])} ± {_num(row['gold_ci'])}"


def table_rows(results: dict) -> list[dict]:
    """The comparison rows: SFT, best-of-n for the n of :data:`TABLE_BEST_OF_N` that were measured, PPO,
    A2C; each ``{"policy", "gold", "gold_ci", "proxy", "kl", "optimal"}``."""
    pol = results["policies"]
    rows = [dict(policy="SFT", **_pick(pol["SFT"]))]
    bon = {p["x"]: p for p in results.get("best_of_n", [])}
    rows += [dict(policy=f"best-of-{n}", **_pick(bon[n])) for n in TABLE_BEST_OF_N if n in bon]
    rows += [dict(policy=name, **_pick(pol[name])) for name in ("PPO", "A2C") if name in pol]
    return rows


def _pick(d: dict) -> dict:
    return {k: d.get(k, math.nan) for k in ("gold", "gold_ci", "proxy", "kl", "optimal")}


def comparison_table(results: dict) -> list[str]:
    """The markdown lines of the comparison table."""
    lines = list(TABLE_HEADER)
    for r in table_rows(results):
        sqrt_kl = math.sqrt(max(r["kl"], 0.0)) if math.isfinite(r["kl"]) else math.nan
        lines.append(f"| {r['policy']} | {_gold(r)} | {_num(r['proxy'])} | {_num(r['kl'])} | "
                     f"{_num(sqrt_kl)} | {_pct(r['optimal'])} |")
    return lines


def _curve_table(points: list[dict], unit: str) -> list[str]:
    lines = [f"| {unit} | √KL | gold (95% CI) | proxy | optimal |", "|---:|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {p['x']} | {_num(math.sqrt(max(p['kl'], 0.0)))} | {_gold(p)} | {_num(p['proxy'])} | "
                     f"{_pct(p.get('optimal', math.nan))} |")
    return lines


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def acceptance_line(results: dict) -> str:
    """Whether PPO's gold beats SFT's with non-overlapping 95% intervals, with the numbers."""
    sft, ppo = results["policies"]["SFT"], results["policies"].get("PPO")
    if ppo is None:
        return "PPO was not run."
    verdict = "yes" if results["acceptance"]["ppo_beats_sft"] else "no"
    return (f"PPO beats SFT on gold reward with non-overlapping 95% intervals: **{verdict}** "
            f"(PPO {_gold(ppo)} vs SFT {_gold(sft)}).")


def render_report(results: dict) -> str:
    """The full ``report.md``."""
    task, fb, rm = results["task"], results["data"]["feedback"], results["reward_model"]
    cov = fb["coverage"]
    out = [f"# jaxrlhf demo{' (--quick)' if results.get('quick') else ''}: {task['name']}", ""]
    out += [task["description"], "", f"Gold reward (oracle): {task['oracle']}.", ""]
    out += ["## Results", "", *comparison_table(results), ""]
    out += ["Gold and proxy are means over held-out prompts of the samples' rewards (temperature 1); the 95% "
            "interval is mean ± 1.96·s/√M over the M per-prompt means. KL(π ‖ π_SFT) is the mean over "
            "samples of Σ_t (log π − log π_SFT) on the sampled tokens; best-of-n uses KL = log n − (n−1)/n "
            "and the unbiased estimator over N samples per prompt. The proxy is the reward model, "
            "normalised to mean 0 and std 1 on SFT samples.", ""]
    out += [acceptance_line(results), ""]
    out += ["## Over-optimisation", "", f"Rule: {results['rule']}.", ""]
    out += [f"- **{name}**: {v['text']}." for name, v in results["verdicts"].items()]
    plots = results["plots"]
    out += ["", "## Plots", ""]
    out += [f"![{label} reward against √KL]({path})" for label, path in plots.items()]
    out += ["", "## Reward model", ""]
    out += [f"- held-out pairwise accuracy on annotator labels: {_num(rm['eval_accuracy'])} "
            f"({fb['eval_records']} held-out records)",
            f"- agreement with the oracle on fresh SFT samples: {_num(rm['agreement'])} "
            f"({rm['agreement_pairs']} pairs the oracle does not tie)", ""]
    sft = results.get("sft")
    if sft is not None:
        out += ["## SFT policy", "", f"- held-out next-token loss {_num(sft['eval_loss'])}, token accuracy "
                f"{_num(sft['eval_token_accuracy'])} on the behaviour policy's demonstrations", ""]
    out += ["## Feedback data", ""]
    out += [f"- {fb['kind']} records: {fb['train_records']} train, {fb['eval_records']} held out; "
            f"{fb['dropped_unfinished']} sampled responses without eos were not labelled",
            f"- coverage (train): {cov['distinct_prompts']} distinct prompts, {cov['distinct_responses']} "
            f"distinct responses, {cov['distinct_prompt_responses']} distinct (prompt, response) pairs, "
            f"{cov['comparisons']} comparisons ({cov['distinct_comparisons']} distinct)", ""]
    for name, points in results["curves"].items():
        out += [f"## {name} along training", "", *_curve_table(points, "step"), ""]
    out += ["## Best-of-n from the SFT policy", "", *_curve_table(results["best_of_n"], "n"), ""]
    out += ["## Run", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in results["settings"]]
    out += ["", "| stage | wall time |", "|---|---:|"]
    out += [f"| {k} | {_duration(v)} |" for k, v in results["timings"].items()]
    out += ["", "## Files", ""]
    out += [f"- {label}: `{path}`" for label, path in results["data"]["files"].items()]
    out += [f"- final policy, {label} (Hugging Face format): `{path}`" for label, path in
            results["exports"].items()]
    out += [f"- {label}: `{path}`" for label, path in results["logs"].items()]
    out += ["", "Each stage ran the ordinary trainer on the JSONL files above. These commands run the same "
            "pipeline again as a new run in a new directory (each stage reading the previous one's export "
            "from there; nothing here is written to); point `data.train_file` and the other paths at your "
            "own files to train on them:", "", "```"]
    out += reuse_commands(results)
    out += ["```", ""]
    return "\n".join(out)


# Config keys of a stage that name another stage's output (its export), rewritten by reuse_commands.
_STAGE_OUTPUT_KEYS = ("model.path", "reward.model_path", "critic.path", "reference.path", "checkpoint.dir")


def reuse_commands(results: dict, into: str | os.PathLike | None = None) -> list[str]:
    """``jaxrlhf <stage> --config <run>/configs/<stage>.yaml --set …`` for each stage: a new run in
    ``into/<stage>`` (default: the directory ``<run>-again`` beside the run) whose inputs that were another
    stage's outputs (exports, checkpoints) are read from ``into`` too, so the commands, run in order, repeat
    the pipeline without writing to (or resuming from) the demo's run directory. Paths are absolute."""
    root = Path(results["run_dir"]).absolute()
    into = Path(into) if into is not None else root.with_name(root.name + "-again")
    stages = list(results["configs"])
    commands = []
    for name, path in results["configs"].items():
        config_path = root / path
        sets = [f"logging.run_dir={into / name}"]
        values = _flat(yaml.safe_load(config_path.read_text())) if config_path.is_file() else {}
        for key in _STAGE_OUTPUT_KEYS:
            value = values.get(key)
            if not isinstance(value, str):
                continue
            try:
                stage, *rest = Path(value).absolute().relative_to(root).parts
            except ValueError:  # not in the run directory: an input of the user's, left as it is
                continue
            if stage in stages:
                sets.append(f"{key}={into.joinpath(stage, *rest)}")
        commands.append(f"jaxrlhf {name} --config {config_path} " + " ".join(f"--set {s}" for s in sets))
    return commands


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out[prefix + k] = v
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def render_summary(results: dict) -> str:
    """The console summary (fits one screen) naming the run directory."""
    total = results["timings"].get("total", math.nan)
    lines = [f"jaxrlhf demo finished in {_duration(total)}: {results['task']['name']}", ""]
    lines.append(f"{'policy':<12} {'gold (95% CI)':>17} {'proxy':>7} {'√KL':>6} {'optimal':>8}")
    for r in table_rows(results):
        sqrt_kl = math.sqrt(max(r["kl"], 0.0)) if math.isfinite(r["kl"]) else math.nan
        lines.append(f"{r['policy']:<12} {_gold(r):>17} {_num(r['proxy'], 2):>7} {_num(sqrt_kl, 2):>6} "
                     f"{_pct(r['optimal']):>8}")
    rm = results["reward_model"]
    lines += ["", f"reward model: held-out accuracy {_num(rm['eval_accuracy'])}, agreement with the oracle "
              f"{_num(rm['agreement'])} ({rm['agreement_pairs']} fresh pairs)",
              acceptance_line(results).replace("**", "")]
    lines += [f"over-optimised? {name}: {v['text'].split(':')[0]}" for name, v in results["verdicts"].items()]
    lines += ["", f"run directory: {results['run_dir']}", f"report:        {results['run_dir']}/report.md"]
    return "\n".join(lines)

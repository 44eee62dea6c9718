"""``report.md`` of a demo run, and the one-screen console summary, rendered from the results dict.

The results dict is plain JSON (the demo saves it as ``results.json``); its keys:

- ``run_dir``, ``quick``, ``full`` (bools), ``task``: ``{"name", "description", "oracle"}``
- ``settings``: ``[[name, value], ...]``; ``timings``: ``{stage: seconds}`` (``"total"`` last)
- ``data``: ``{"files": {label: path}, "feedback": {"kind", "train_records", "eval_records",
  "dropped_unfinished", "coverage": coverage_report(...)}}``
- ``sft`` (optional): ``{"eval_loss", "eval_token_accuracy"}``; ``reward_model``: ``{"eval_accuracy",
  "eval_records", "agreement", "agreement_pairs"}``
- ``methods``: the method keys in the table's order; ``analysis``: what
  :func:`jaxrlhf.experiments.demo_analysis.analyse` returns (per method: per-seed intervals over prompts,
  the summary over seeds, the paired comparison with SFT, the over-optimisation tests, the Gao fit, the
  first seed's curve; best-of-n; the best method; the ensemble comparison; the rule)
- ``normalization`` (optional): the reward normalisation refitted on fresh SFT samples; ``ensemble``
  (optional): the reward-model ensemble; ``prompt_overlap`` (optional): prompt counts and overlaps
- ``exports``, ``plots``, ``configs``, ``logs``: ``{label: path relative to run_dir}``; ``commands``:
  ``{config label: the trainer command that runs it}`` (default: the label)

Paths are relative to the run directory, so the report's links work wherever the directory is moved.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any

import yaml

TABLE_BEST_OF_N = (4, 16, 64)
TABLE_HEADER = (
    "| policy | trained against | gold reward, final (95% CI over prompts) | gold over seeds (95% CI over "
    "seeds) | proxy | KL to SFT (nats) | √KL | optimal answers | over-optimised? |",
    "|---|---|---:|---:|---:|---:|---:|---:|---|",
)


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _sqrt(kl: Any) -> float:
    return math.sqrt(max(kl, 0.0)) if kl is not None and math.isfinite(kl) else math.nan


def _interval(d: dict) -> str:
    """``value ± half (95% CI over n unit)`` of an Estimate dict (its ``text`` when it has one)."""
    if "text" in d:
        return d["text"]
    return f"{_num(d['value'])} ± {_num(d.get('half_width'))}"


def table_rows(results: dict) -> list[dict]:
    """The comparison rows: SFT, best-of-n for the n of :data:`TABLE_BEST_OF_N` that were measured, then every
    method; each ``{"policy", "optimises", "gold", "gold_seeds", "proxy", "kl", "kl_note", "optimal",
    "overoptimized"}`` (strings where they are formatted intervals)."""
    a = results["analysis"]
    sft = a["sft"]
    rows = [dict(policy="SFT", optimises="the demonstrations", gold=sft["gold"]["text"], gold_seeds="—",
                 gold_value=sft["gold"]["value"], proxy=sft["proxy"], kl=sft["kl"], kl_note="",
                 optimal=sft["optimal"], overoptimized="—")]
    bon = {p["x"]: p for p in a["best_of_n"]["points"]}
    prompts = a["best_of_n"]["prompts"]
    for n in TABLE_BEST_OF_N:
        if n in bon:
            p = bon[n]
            rows.append(dict(policy=f"best-of-{n}", optimises="the reward model (reranking)",
                             gold=f"{_num(p['gold'])} ± {_num(p['gold_ci'])} (95% CI over {prompts} prompts)",
                             gold_seeds="—", gold_value=p["gold"], proxy=p["proxy"], kl=p["kl"],
                             kl_note=f" (bound {_num(p['kl_bound'])})", optimal=p["optimal"],
                             overoptimized="—"))
    for key in results["methods"]:
        m = a["methods"][key]
        first = m["per_seed"][0]
        seeds_text = m["gold"]["text"] if m["seeds"] > 1 else "n/a (1 seed; the default runs 4)"
        verdicts = [o["overoptimized"] for o in m["overoptimization"]]
        over = (f"{sum(verdicts)} of {len(verdicts)} seeds" if len(verdicts) > 1
                else "yes" if verdicts[0] else "no")
        rows.append(dict(policy=m["name"], optimises=m["optimises"], gold=first["gold"]["text"],
                         gold_seeds=seeds_text, gold_value=m["gold"]["mean"], proxy=m["proxy"],
                         kl=m["kl"]["mean"], kl_note="", optimal=m["optimal"], overoptimized=over))
    return rows


def comparison_table(results: dict) -> list[str]:
    """The markdown lines of the comparison table."""
    lines = list(TABLE_HEADER)
    for r in table_rows(results):
        lines.append(f"| {r['policy']} | {r['optimises']} | {r['gold']} | {r['gold_seeds']} | "
                     f"{_num(r['proxy'])} "
                     f"| {_num(r['kl'])}{r['kl_note']} | {_num(_sqrt(r['kl']))} | {_pct(r['optimal'])} | "
                     f"{r['overoptimized']} |")
    return lines


def _curve_table(points: list[dict], unit: str, bound: bool = False) -> list[str]:
    extra = " | KL bound log n − (n−1)/n" if bound else ""
    lines = [f"| {unit} | KL (nats) | √KL | gold (95% CI over prompts) | proxy | optimal{extra} |",
             "|---:|---:|---:|---:|---:|---:|" + ("---:|" if bound else "")]
    for p in points:
        tail = f" | {_num(p['kl_bound'])}" if bound else ""
        lines.append(f"| {p['x']} | {_num(p['kl'])} | {_num(_sqrt(p['kl']))} | {_num(p['gold'])} ± "
                     f"{_num(p['gold_ci'])} | {_num(p['proxy'])} | "
                     f"{_pct(p.get('optimal', math.nan))}{tail} |")
    return lines


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _fit_cell(fit: dict, key: str) -> str:
    value, se = fit.get(key), fit.get(f"{key}_se")
    return f"{_num(value)} ± {_num(se)}"


def gao_table(results: dict) -> list[str]:
    """Markdown rows of the Gao et al. fits: method, form, α, β and the baseline gold(0) fitted with them
    (± 1 s.e.), R², points, fitted peak."""
    a = results["analysis"]
    lines = ["| curve | form | α (± 1 s.e.) | β (± 1 s.e.) | gold(0) (± 1 s.e.) | R² | points with KL > 0 | "
             "fitted peak √KL |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    fits = [(a["methods"][k]["name"], a["methods"][k]["gao"]) for k in results["methods"]]
    fits.append(("best-of-n", a["best_of_n"]["gao"]))
    for name, fit in fits:
        if "error" in fit:
            lines.append(f"| {name} | {fit['form'] or '—'} | n/a | n/a | n/a | n/a | — | {fit['error']} |")
            continue
        lines.append(f"| {name} | {fit['formula']} | {_fit_cell(fit, 'alpha')} | {_fit_cell(fit, 'beta')} | "
                     f"{_fit_cell(fit, 'gold_at_zero')} | {_num(fit['r2'])} | {fit['n_points']} | "
                     f"{_num(fit['peak_d'], 2)} |")
    return lines


def overlap_lines(overlap: dict) -> list[str]:
    """The prompt counts and the overlap of the evaluation prompts with every training prompt list."""
    out = ["| prompt list | prompts | distinct |", "|---|---:|---:|"]
    out += [f"| {k} | {n} | {overlap['distinct'][k]} |" for k, n in overlap["counts"].items()]
    out += ["", "| evaluation / training list | prompts in both |", "|---|---:|"]
    out += [f"| {k} | {n} |" for k, n in overlap["overlaps"].items()]
    verdict = ("0: every evaluation prompt is unseen by SFT, the reward model and RL"
               if overlap["max_overlap"] == 0 else
               f"{overlap['max_overlap']} — NOT held out (the task's prompt space is too small for disjoint "
               "splits; use task.name=digit_sort or arithmetic)")
    return [*out, "", f"Largest overlap: {verdict}."]


def render_report(results: dict) -> str:
    """The full ``report.md``."""
    task, fb, rm = results["task"], results["data"]["feedback"], results["reward_model"]
    a = results["analysis"]
    cov = fb["coverage"]
    preset = " (--quick)" if results.get("quick") else " (--full)" if results.get("full") else ""
    out = [f"# jaxrlhf demo{preset}: {task['name']}", ""]
    out += [task["description"], "", f"Gold reward (oracle): {task['oracle']}."]
    if not task.get("own_oracle", True):
        out += ["\"Optimal answers\" are the task's own optimum (its built-in oracle's best answer), not "
                "this oracle's, which the demo cannot know."]
    out += [""]
    out += ["## Results", "", *comparison_table(results), ""]
    out += [f"Gold and proxy are means over {a['prompts']} held-out prompts of the samples' rewards "
            "(temperature 1), every policy sampled on the same prompts with the same keys. The interval over "
            "prompts is a studentized bootstrap (2000 resamples) of the per-prompt means of the first seed's "
            "run; the interval over seeds is a t-interval of the per-seed means, with the mean per-run "
            "half-width beside it. KL(π ‖ π_SFT) is the mean over samples of Σ_t (log π − log π_SFT); "
            "best-of-n is plotted at the sample-based estimate of its KL (exact for the empirical score "
            "distribution, `rl.best_of_n_kl_estimate`), with the bound log n − (n−1)/n beside it. The proxy "
            "is "
            "the reward model, normalised to mean 0 and std 1 on fresh SFT samples.", ""]
    best = a.get("best")
    if best:
        out += [f"**Highest gold reward**: {best['text']}.", ""]
    over_seeds = any(a["methods"][k]["vs_sft"].get("over") == "seeds" for k in results["methods"])
    how = ("final gold minus SFT's per seed, on the same prompts and sampling keys, t-interval over seeds"
           if over_seeds else "final policy of the one seed, paired per-prompt difference in gold")
    out += [f"Each method against SFT ({how}):", ""]
    out += [f"- {a['methods'][k]['name']}: {a['methods'][k]['vs_sft']['text']}" for k in results["methods"]]
    out += ["", "## Over-optimisation", "", a["rule"], ""]
    for k in results["methods"]:
        m = a["methods"][k]
        for o, seed in zip(m["overoptimization"], m["per_seed"]):
            out.append(f"- **{m['name']}** (seed {seed['seed_index']}): {o['text']}.")
    out.append(f"- **best-of-n**: {a['best_of_n']['overoptimization']['text']}.")
    out += ["", "## Gao et al. (2022) fits", "",
            "Gold reward change from the initial policy against d = √KL, least squares over the checkpoints "
            "(all seeds pooled; best-of-n over n at the KL estimate): R_bon(d) = d(α − βd), "
            "R_RL(d) = d(α − β log d). Dashed on the gold plot.", "", *gao_table(results), ""]
    ens = results.get("ensemble")
    if ens:
        out += ["## Reward-model ensembles (Coste et al. 2024)", "",
                f"{ens['members']} reward models trained as one vmapped computation ({ens['steps']} steps, "
                f"{_duration(ens['seconds'])}), each with its own head initialisation"
                f"{' and bootstrap resample of the feedback' if ens['bootstrap'] else ''}; held-out accuracy "
                f"per member: {', '.join(_num(x) for x in ens['eval_accuracy'])}. Each member normalised on "
                f"the fresh SFT samples; WCO = min over members, UWO = mean − "
                f"{ens['uwo_lambda']:g}·variance.",
                ""]
        out += [f"- {e['text']}." for e in a["ensembles"]]
        out += [""]
    ov = results.get("prompt_overlap")
    if ov:
        out += ["## Held-out prompts", "", *overlap_lines(ov), ""]
    norm = results.get("normalization")
    if norm:
        line = (f"- fitted on {norm['samples']} fresh samples of the SFT policy on RL-split prompts: raw "
                f"reward mean {_num(norm['raw_mean'])}, std {_num(norm['raw_std'])} → gain "
                f"{_num(norm['gain'])}, bias {_num(norm['bias'])}")
        if "dataset_gain" in norm:
            line += (f"; the trainer's fit on the feedback's responses (gain {_num(norm['dataset_gain'])}, "
                     "bias "
                     f"{_num(norm['dataset_bias'])}) gives these samples mean "
                     f"{_num(norm['dataset_fit_on_fresh_mean'])}, std "
                     f"{_num(norm['dataset_fit_on_fresh_std'])}")
        out += ["## Reward normalisation", "", line, ""]
    plots = results["plots"]
    out += ["## Plots", ""]
    out += [f"![{label} reward against √KL]({path})" for label, path in plots.items()]
    out += ["", "## Reward model", ""]
    out += [f"- held-out pairwise accuracy on annotator labels: {_num(rm['eval_accuracy'])} "
            f"({rm.get('eval_records', fb['eval_records'])} held-out records)",
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
    for k in results["methods"]:
        m = a["methods"][k]
        x = m.get("x_label", "step")
        title = "along training" if x == "step" else f"at each {x}"
        out += [f"## {m['name']} {title} (first seed)", "", *_curve_table(m["curve"], x), ""]
    out += ["## Best-of-n from the SFT policy", "",
            *_curve_table(a["best_of_n"]["points"], "n", bound=True), ""]
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
            "own files to train on them (the ensemble runs optimise an in-process reward and have no "
            "command):",
            "", "```"]
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
        command = results.get("commands", {}).get(name, name)
        commands.append(f"jaxrlhf {command} --config {config_path} " + " ".join(f"--set {s}" for s in sets))
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
    a = results["analysis"]
    total = results["timings"].get("total", math.nan)
    lines = [f"jaxrlhf demo finished in {_duration(total)}: {results['task']['name']}", ""]
    lines.append(f"{'policy':<18} {'gold (95% CI over prompts)':>26} {'over seeds':>17} {'√KL':>5} "
                 f"{'optimal':>7}  over-optimised?")
    for r in table_rows(results):
        gold = r["gold"].split(" (")[0]
        seeds = r["gold_seeds"].split(" (")[0] if r["gold_seeds"].startswith(("0", "1", "-")) else "—"
        lines.append(f"{r['policy']:<18} {gold:>26} {seeds:>17} {_num(_sqrt(r['kl']), 2):>5} "
                     f"{_pct(r['optimal']):>7}  {r['overoptimized']}")
    rm = results["reward_model"]
    lines += ["", f"reward model: held-out accuracy {_num(rm['eval_accuracy'])}, agreement with the oracle "
              f"{_num(rm['agreement'])} ({rm['agreement_pairs']} fresh pairs)"]
    notes = ([a["best"]["text"]] if a.get("best") else []) + [e["text"] for e in a["ensembles"]]
    lines += [wrapped for note in notes for wrapped in textwrap.wrap(note, 110, subsequent_indent="  ")]
    ov = results.get("prompt_overlap")
    if ov:
        lines.append(f"evaluation prompts seen in training: {ov['max_overlap']}")
    lines += ["", f"run directory: {results['run_dir']}", f"report:        {results['run_dir']}/report.md"]
    return "\n".join(lines)

"""The demo's statistics on simulated evaluations whose truth is known: per-run and across-seed intervals,
the paired comparison with SFT, the split-half over-optimisation test, the Gao fits, the best method and the
ensemble comparison; and the report rendered from them."""

import math

import numpy as np
import pytest

from jaxrlhf.experiments.curves import CurvePoint
from jaxrlhf.experiments.demo_analysis import analyse, ensemble_comparison
from jaxrlhf.experiments.demo_methods import METHODS
from jaxrlhf.experiments.policy_evaluation import EvaluationResults, MethodRun
from jaxrlhf.experiments.policy_scoring import PolicyEval
from jaxrlhf.experiments.statistics import paired_comparison

PROMPTS = 200


def _eval(name, gold, kl):
    return PolicyEval(
        name, float(gold.mean()), 0.05, 0.0, 0.05, float(kl.mean()), 0.01, 0.5, 1.0, 3.0, gold.size
    )


def _run(seed_index, sft_gold, golds_by_point, kls, rng, noise=0.05):
    """A run whose per-prompt gold at point j is sft + golds_by_point[j] + noise."""
    gold = np.stack([sft_gold + g + noise * rng.standard_normal(PROMPTS) for g in golds_by_point])
    kl = np.stack([np.full(PROMPTS, k) for k in kls])
    proxy = np.stack([np.full(PROMPTS, 0.3 * j) for j in range(len(kls))])
    points = [
        CurvePoint(10 * j, float(kls[j]), float(gold[j].mean()), 0.02, float(proxy[j].mean()))
        for j in range(len(kls))
    ]
    return MethodRun(seed_index, points, gold, proxy, kl, _eval("m", gold[-1], kl[-1]))


@pytest.fixture(scope="module")
def evaluation():
    rng = np.random.default_rng(0)
    sft_gold = 0.3 + 0.2 * rng.standard_normal(PROMPTS)
    kls = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    d = np.sqrt(kls)
    rl_change = np.where(d > 0, d * (0.5 - 0.3 * np.log(np.where(d > 0, d, 1))), 0.0)  # Gao RL form
    falling = [0.0, 0.3, 0.5, 0.5, 0.2, 0.0]  # a peak, then a real drop back to SFT's level
    runs = {
        "ppo": [_run(s, sft_gold, falling, kls, rng) for s in range(4)],
        "grpo": [_run(s, sft_gold, rl_change, kls, rng, noise=0.0) for s in range(4)],
        "ppo_wco": [_run(s, sft_gold, [0.0, 0.3, 0.45, 0.5, 0.5, 0.48], kls, rng) for s in range(4)],
    }
    bon_kl = [0.0, 0.3, 0.8, 1.4]
    bon = [
        CurvePoint(n, k, 0.3 + math.sqrt(k) * (0.4 - 0.1 * math.sqrt(k)), 0.03, 0.5 * i)
        for i, (n, k) in enumerate(zip((1, 4, 16, 64), bon_kl))
    ]
    bon_gold = np.stack([np.full(64, p.gold) + 0.05 * rng.standard_normal(64) for p in bon])
    sft = _eval("SFT", np.tile(sft_gold[:, None], (1, 2)), np.zeros(PROMPTS))
    return EvaluationResults(
        sft,
        sft_gold,
        bon,
        bon_gold,
        [math.log(n) - (n - 1) / n for n in (1, 4, 16, 64)],
        runs,
        0.8,
        100,
        ["p"] * PROMPTS,
        ["q"] * 64,
    )


@pytest.fixture(scope="module")
def analysis(evaluation):
    return analyse(evaluation, [METHODS[k] for k in ("ppo", "grpo", "ppo_wco")])


def test_intervals_carry_their_units(analysis):
    ppo = analysis["methods"]["ppo"]
    assert ppo["seeds"] == 4 and ppo["gold"]["seeds"] == 4
    assert "(95% CI over 200 prompts)" in ppo["per_seed"][0]["gold"]["text"]
    assert (
        "95% CI over 4 seeds; per run ±" in ppo["gold"]["text"] and "over 200 prompts)" in ppo["gold"]["text"]
    )
    # The final gold of every seed is SFT's (the curve fell back): the seeds' mean interval covers it.
    assert ppo["gold"]["low"] < analysis["sft"]["gold"]["value"] < ppo["gold"]["high"]
    assert "(95% CI over 200 prompts)" in analysis["sft"]["gold"]["text"]


def test_paired_comparison_with_sft(analysis):
    grpo = analysis["methods"]["grpo"]["vs_sft"]  # a noiseless +change on the same prompts
    change = 4.0**0.5 * (0.5 - 0.3 * math.log(2.0))
    assert grpo["difference"]["value"] == pytest.approx(change, abs=1e-9) and grpo["p_value"] < 0.01
    ppo = analysis["methods"]["ppo"]["vs_sft"]
    assert ppo["difference"]["low"] < 0 < ppo["difference"]["high"]  # back to SFT's level


def test_overoptimisation_found_where_gold_falls_and_not_where_it_rises(analysis):
    assert all(o["overoptimized"] for o in analysis["methods"]["ppo"]["overoptimization"])
    assert all(
        o["drop"]["value"] == pytest.approx(0.5, abs=0.03)
        for o in analysis["methods"]["ppo"]["overoptimization"]
    )
    assert not any(o["overoptimized"] for o in analysis["methods"]["grpo"]["overoptimization"])


def test_gao_fits_recover_the_generating_form(analysis):
    fit = analysis["methods"]["grpo"]["gao"]  # noiseless R_RL with α = 0.5, β = 0.3
    assert fit["alpha"] == pytest.approx(0.5, abs=1e-6) and fit["beta"] == pytest.approx(0.3, abs=1e-6)
    assert fit["r2"] == pytest.approx(1.0) and fit["n_points"] == 20  # 5 points with KL > 0 × 4 seeds
    # the SFT evaluation every seed's curve starts from enters once (it was pooled 4 + 1 times)
    assert fit["n_baseline"] == 1 and analysis["methods"]["ppo"]["gao"]["n_baseline"] == 1
    bon = analysis["best_of_n"]["gao"]  # R_bon with α = 0.4, β = 0.1 at the KL of each point
    assert bon["alpha"] == pytest.approx(0.4, abs=1e-6) and bon["beta"] == pytest.approx(0.1, abs=1e-6)


def test_best_method_and_its_lead(analysis):
    best = analysis["best"]
    assert best["key"] == "grpo" and best["runner_up"]["key"] == "ppo_wco"
    assert best["text"].startswith("GRPO reached the highest gold reward: ")
    assert "at KL 4.000" in best["text"] and "95% CI over 4 seeds" in best["text"]
    # the lead is tested over seeds (a rerun's spread counts), not over one seed's prompts
    assert best["runner_up"]["over"] == "seeds" and "(paired over 4 seeds)" in best["text"]
    lead = best["runner_up"]["lead"]
    assert lead["n"] == 4 and lead["unit"] == "seeds" and lead["low"] > 0 and best["runner_up"]["significant"]
    assert "(significant at 0.05)" in best["text"] and best["runner_up"]["p_value"] < 0.05


def test_a_lead_within_the_seed_spread_is_not_significant():
    """Two methods equal but for each seed's own offset (a rerun's spread, common to all its prompts): one
    seed's per-prompt test saw only prompt noise and called such a lead significant."""
    from jaxrlhf.experiments.demo_analysis import best_method

    rng = np.random.default_rng(3)
    sft_gold = 0.3 + 0.2 * rng.standard_normal(PROMPTS)
    kls = np.array([0.0, 1.0])
    runs = {k: [_run(s, sft_gold, [0.0, 0.1 + rng.normal(0, 0.03)], kls, rng, noise=0.01) for s in range(4)]
            for k in ("a", "b")}
    methods = {k: {"name": k.upper(), "seeds": 4, "prompts": PROMPTS, "per_seed": [],
                   "gold": {"mean": float(np.mean([r.final.gold for r in runs[k]])), "text": "g"},
                   "kl": {"text": "k"}} for k in runs}
    best = best_method(methods, runs)
    one_seed = paired_comparison(runs[best["key"]][0].gold[-1], runs[best["runner_up"]["key"]][0].gold[-1])
    assert one_seed.p_value < 0.05  # what the first-seed test said
    assert not best["runner_up"]["significant"] and "(not significant at 0.05)" in best["text"]


def test_vs_sft_is_over_seeds_with_several_and_over_prompts_with_one(analysis, evaluation):
    from jaxrlhf.experiments.demo_analysis import _vs_sft

    ppo = analysis["methods"]["ppo"]["vs_sft"]
    assert ppo["over"] == "seeds" and ppo["difference"]["n"] == 4 and "(95% CI over 4 seeds)" in ppo["text"]
    grpo = analysis["methods"]["grpo"]["vs_sft"]  # noiseless: every seed the same difference
    assert grpo["text"].startswith("0.584 (no interval: all 4 seeds gave this value)")
    one = _vs_sft([evaluation.runs["ppo"][0].gold[-1]], evaluation.sft_gold)
    assert one["over"] == "prompts" and one["difference"]["n"] == PROMPTS


def test_ensemble_reduces_the_drop(analysis):
    [entry] = analysis["ensembles"]
    assert entry["key"] == "ppo_wco" and entry["reduces"] is True
    assert entry["difference"]["mean"] == pytest.approx(0.5 - 0.02, abs=0.05)
    assert "the ensemble reduces over-optimisation" in entry["text"]


def test_ensemble_comparison_with_one_seed_says_so():
    method = {
        "name": "PPO",
        "overoptimization": [{"drop": {"value": 0.3, "text": "0.300 ± 0.1"}}],
        "gold": {"text": "0.5"},
    }
    ens = {
        "name": "PPO (RM ens. WCO)",
        "overoptimization": [{"drop": {"value": 0.1, "text": "0.100 ± 0.1"}}],
        "gold": {"text": "0.6"},
    }
    [entry] = ensemble_comparison({"ppo": method, "ppo_wco": ens})
    assert entry["reduces"] is None and "one seed" in entry["text"]


def test_report_renders_every_section(analysis, tmp_path):
    from jaxrlhf.experiments.report import comparison_table, render_report, render_summary

    results = {
        "run_dir": str(tmp_path),
        "quick": False,
        "full": True,
        "task": {"name": "digit_sort", "description": "sort digits", "oracle": "the task's own"},
        "settings": [["seed", "0"]],
        "timings": {"rl": 78.4, "total": 194.0},
        "data": {
            "files": {},
            "feedback": {
                "kind": "preference",
                "train_records": 900,
                "eval_records": 100,
                "dropped_unfinished": 0,
                "coverage": {
                    "distinct_prompts": 1,
                    "distinct_responses": 2,
                    "distinct_prompt_responses": 3,
                    "comparisons": 4,
                    "distinct_comparisons": 4,
                },
            },
        },
        "reward_model": {"eval_accuracy": 0.7, "eval_records": 100, "agreement": 0.8, "agreement_pairs": 100},
        "analysis": analysis,
        "methods": ["ppo", "grpo", "ppo_wco"],
        "ensemble": {
            "members": 4,
            "steps": 30,
            "seconds": 12.0,
            "bootstrap": True,
            "uwo_lambda": 0.5,
            "eval_accuracy": [0.7, 0.71, 0.69, 0.72],
        },
        "prompt_overlap": {
            "counts": {"SFT": 10, "evaluation": 5},
            "distinct": {"SFT": 10, "evaluation": 5},
            "overlaps": {"evaluation / SFT": 0},
            "max_overlap": 0,
            "disjoint_splits": True,
        },
        "normalization": {"samples": 512, "raw_mean": 1.0, "raw_std": 2.0, "gain": 0.5, "bias": -0.5},
        "plots": {"gold": "plots/gold_vs_sqrt_kl.png"},
        "exports": {},
        "logs": {},
        "configs": {},
    }
    table = comparison_table(results)
    assert [line.split(" | ")[0].lstrip("| ") for line in table[2:]] == [
        "SFT",
        "best-of-4",
        "best-of-16",
        "best-of-64",
        "PPO",
        "GRPO",
        "PPO (RM ens. WCO)",
    ]
    ppo_row = table[6]
    assert "(95% CI over 200 prompts)" in ppo_row and "(95% CI over 4 seeds; per run" in ppo_row
    assert ppo_row.endswith("| 4 of 4 seeds |")
    assert "(bound 1.835)" in table[4]  # best-of-16 at its KL estimate, the bound beside it
    report = render_report(results).splitlines()
    assert report[0] == "# jaxrlhf demo (--full): digit_sort"
    assert any(line.startswith("**Highest gold reward**: GRPO reached") for line in report)
    assert any(
        # α, β and gold(0) (the SFT policy's mean gold, fitted with them), R², points, peak exp(α/β − 1)
        line == "| GRPO | R_RL(d) = d(α − β·log d) | 0.500 ± 0.000 | 0.300 ± 0.000 | 0.303 ± 0.000 | 1.000 "
                "| 20 | 1.95 |"
        for line in report
    ), [line for line in report if line.startswith("| GRPO | R_RL")]
    assert "Largest overlap: 0: every evaluation prompt is unseen by SFT, the reward model and RL." in report
    assert any("the ensemble reduces over-optimisation" in line for line in report)
    assert any(line.startswith("- **PPO** (seed 3): yes: gold fell by") for line in report)
    summary = render_summary(results).splitlines()
    assert len(summary) <= 32 and max(map(len, summary)) <= 112

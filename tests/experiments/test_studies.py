"""``jaxrlhf study choices|feedback``: the configs, the variants, and one ``--quick`` smoke run of each (on a
subset of the variants: one numeric and one structural choice; two feedback types and one noise variant) that
writes every artefact — the report, results.json with intervals over seeds, curves.npz, the plots and a
config.yaml that reloads to the same config."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf import cli
from jaxrlhf.config import ConfigError
from jaxrlhf.experiments.studies.choices import CHOICES, ChoicesStudyConfig, run_choices_study
from jaxrlhf.experiments.studies.feedback import (
    FeedbackStudyConfig,
    feedback_variants,
    run_feedback_study,
)

REPO = Path(__file__).resolve().parents[2]


def quick(name: str, *overrides: str):
    spec = cli.command_spec(f"study {name}")
    return cli.load_command_config(f"study {name}", None, [*cli._resolve(spec.quick), *overrides])


@pytest.mark.parametrize("name, cls", [("choices", ChoicesStudyConfig), ("feedback", FeedbackStudyConfig)])
def test_shipped_configs_write_down_the_defaults(name, cls):
    assert cli.load_command_config(f"study {name}", str(REPO / "configs" / f"study_{name}.yaml"), []) == cls()


def test_study_configs_name_the_bad_key():
    with pytest.raises(ConfigError, match="choices: 'default'"):
        cli.load_command_config("study choices", None, ["choices=[no_whitening]"])
    with pytest.raises(ConfigError, match=r"choices\[0\]"):
        cli.load_command_config("study choices", None, ["choices=[nope]"])
    with pytest.raises(ConfigError, match="responses: parts of the budget"):
        cli.load_command_config("study feedback", None, ["responses=[4096]"])
    with pytest.raises(ConfigError, match="flip_probs: flipped labels are pairwise"):
        cli.load_command_config("study feedback", None, ["pipeline.feedback.annotator.kind=rating"])
    args = cli.build_parser().parse_args(["study", "feedback", "--quick", "--set", "run.seeds=4"])
    assert args.study == "feedback" and args.quick and args.overrides == ["run.seeds=4"]


def test_feedback_variants_change_one_thing_each():
    variants = {v.name: v for v in feedback_variants(FeedbackStudyConfig())}
    assert next(iter(variants)) == "default" and variants["default"].hparams == {}
    assert {variants[k].kind for k in ("ranking", "rating")} == {"ranking", "rating"}
    assert variants["flip_0.25"].hparams == {"feedback.flip_prob": 0.25}
    assert variants["responses_256"].hparams == {"feedback.responses": 256}
    assert all(v.kind == "preference" for k, v in variants.items() if k not in ("ranking", "rating"))


def _check_run_dir(result, variants):
    root = Path(result.run_dir)
    for name in ("report.md", "results.json", "config.yaml", "curves.npz", "plots/gold_vs_sqrt_kl.png",
                 "plots/differences.png"):
        assert (root / name).is_file(), name
    results = json.loads((root / "results.json").read_text())
    assert list(results["variants"]) == variants
    for name, entry in results["variants"].items():
        gold = entry["final_gold"]["estimate"]
        assert gold["unit"] == "seeds" and gold["n"] == 3 and gold["low"] <= gold["value"] <= gold["high"]
        assert (name == "default") == ("delta_gold" not in entry)
    curves = np.load(root / "curves.npz")
    assert curves["default/gold"].shape[:2] == (3, 3)  # seeds × (SFT + 2 points)
    report = (root / "report.md").read_text()
    assert "95% CI over 3 seeds" in report or "over 3 seeds" in report
    return results, report


def test_choices_study_quick_smoke_run(tmp_path):
    cfg = quick("choices", f"run.dir={tmp_path / 'choices'}",
                "choices=[default,no_whitening,separate_critic]")
    result = run_choices_study(cfg)
    results, report = _check_run_dir(result, ["default", "no_whitening", "separate_critic"])
    assert cli.load_command_config("study choices", str(Path(result.run_dir) / "config.yaml"), []) == cfg
    assert CHOICES["separate_critic"].label in report and "Quick preset" in report
    # The structural variant moves the policy elsewhere than the defaults do (its own program; a few tiny
    # steps move the KL, not yet the sampled answers' gold).
    assert results["variants"]["separate_critic"]["per_seed"]["kl"] != \
        results["variants"]["default"]["per_seed"]["kl"]
    mechanisms = dict(results["mechanisms"])
    assert set(mechanisms) == {"value-loss clipping (defaults)", "policy-ratio clipping (defaults)",
                               "missing-EOS penalty (defaults)"}
    assert "## How often each mechanism acted" in report
    assert mechanisms["value-loss clipping (defaults)"] in report


def test_mechanism_activity_reads_the_default_and_adaptive_runs():
    from types import SimpleNamespace

    import numpy as np

    from jaxrlhf.experiments.studies.choices import mechanism_activity

    default = SimpleNamespace(metrics={  # 2 seeds x 2 iterations, batch 4
        "val/clipfrac_avg": np.array([[0.0, 0.02], [0.0, 0.0]]),
        "policy/clipfrac_avg": np.array([[0.1, 0.3], [0.2, 0.2]]),
        "val/num_eos_tokens": np.array([[4.0, 3.0], [2.0, 4.0]]),
    })
    adaptive = SimpleNamespace(metrics={"objective/kl_coef": np.array([[0.05, 0.04], [0.05, 0.06]])})
    rows = dict(mechanism_activity({"default": default, "adaptive_kl": adaptive}, batch_size=4))
    assert rows["value-loss clipping (defaults)"].startswith("0.5% of value-loss tokens clipped")
    assert "at most 2% in one iteration" in rows["value-loss clipping (defaults)"]
    assert rows["policy-ratio clipping (defaults)"].startswith("20% of tokens clipped (mean; at most 30%)")
    assert rows["missing-EOS penalty (defaults)"].startswith("18.8% of RL responses without eos")  # 3/16
    assert rows["adaptive KL controller"] == (
        "β from 0.05 to 0.05 (mean over seeds; range over all iterations 0.04–0.06)")
    assert mechanism_activity({}, 4) == []


def test_feedback_study_quick_smoke_run(tmp_path):
    cfg = quick("feedback", f"run.dir={tmp_path / 'feedback'}", "kinds=[preference,rating]",
                "temperatures=[]", "responses=[]")
    result = run_feedback_study(cfg)
    results, report = _check_run_dir(result, ["default", "rating", "flip_0.25"])
    assert cli.load_command_config("study feedback", str(Path(result.run_dir) / "config.yaml"), []) == cfg
    agreement = results["variants"]["flip_0.25"]["label_agreement"]["estimate"]["value"]
    assert agreement < results["variants"]["default"]["label_agreement"]["estimate"]["value"]
    assert "ratings" in report

"""``jaxrlhf study choices|feedback``: the configs, the variants and the mechanism table.

The ``--quick`` smoke run of each study (on a subset of the variants: one numeric and one structural choice;
two feedback types and one noise variant) is the README's command, run once in the suite by
``tests/test_readme.py``, which checks every artefact it writes (``check_study_run``: the report,
results.json with intervals over seeds, curves.npz, the plots, a config.yaml that reloads to the same
config, and what each variant changes)."""

from pathlib import Path

import numpy as np
import pytest

from jaxrlhf import cli
from jaxrlhf.config import ConfigError
from jaxrlhf.experiments.studies.choices import ChoicesStudyConfig
from jaxrlhf.experiments.studies.feedback import (
    FeedbackStudyConfig,
    feedback_variants,
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


def test_mechanism_activity_reads_the_default_and_adaptive_runs():
    from types import SimpleNamespace

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


@pytest.mark.parametrize("override", ["pipeline.feedback.temperature=-0.5",
                                      "pipeline.feedback.annotator.temperature=-1", "temperatures=[.nan]"])
def test_bad_feedback_temperatures_fail_before_the_study_writes_anything(tmp_path, capsys, override):
    from jaxrlhf import cli

    run_dir = tmp_path / "study"
    argv = ["study", "feedback", "--quick", "--set", f"run.dir={run_dir}", "--set", override]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be" in err[0] and override.split("=")[0] in err[0], err
    assert not run_dir.exists()

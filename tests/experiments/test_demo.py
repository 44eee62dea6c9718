"""``jaxrlhf demo``: its config (file, quick preset, errors), a user's oracle, and one end-to-end ``--quick``
run that writes every artefact the issue lists."""

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf.config import ConfigError
from jaxrlhf.experiments.demo_config import FULL_OVERRIDES, QUICK_OVERRIDES, DemoConfig, load_demo_config
from jaxrlhf.experiments.demo_stages import build_task, split_feedback
from jaxrlhf.oracle import FunctionOracle, TokenFunctionOracle, register_reward

REPO = Path(__file__).resolve().parents[2]
# The methods trained by a trainer (checkpoints, metrics, export); value-guided decoding ("vgd") beside them.
METHOD_KEYS = ("ppo", "a2c", "grpo", "rloo", "dpo", "grpo_gold", "ppo_wco", "ppo_uwo")
VGD_BETAS_QUICK = [1, 4, 16]


# ------------------------------------------------------------------------------------------ config


def test_configs_demo_yaml_writes_down_the_defaults():
    assert load_demo_config(str(REPO / "configs" / "demo.yaml")) == DemoConfig()


def test_quick_preset_sits_between_the_file_and_the_overrides():
    quick = load_demo_config(str(REPO / "configs" / "demo.yaml"), ["sft.steps=7"], quick=True)
    assert quick.sft.steps == 7  # --set wins over the preset
    assert quick.ppo.iterations == 6 and quick.evaluation.rl_points == 3  # the preset wins over the file
    assert all(o.split("=")[0].count(".") >= 1 for o in QUICK_OVERRIDES + FULL_OVERRIDES)
    assert quick.run.seeds == 1 and DemoConfig().run.seeds == 4  # the default reports intervals over seeds
    full = load_demo_config(str(REPO / "configs" / "demo.yaml"), ["run.seeds=5"], full=True)
    assert full.run.full and full.run.seeds == 5 and load_demo_config(None, full=True).run.seeds == 8
    with pytest.raises(ConfigError, match="choose one preset"):
        load_demo_config(None, quick=True, full=True)


def test_every_method_is_a_table_entry_and_the_gold_spec_is_the_tasks_oracle():
    from jaxrlhf.experiments.demo_methods import METHODS, gold_reward_spec
    from jaxrlhf.oracle import get_reward

    cfg = DemoConfig()
    assert list(cfg.methods) == list(METHODS)  # the default compares every entry
    assert cfg.task.name == "digit_sort"
    spec = gold_reward_spec(cfg)
    assert spec == "task:digit_sort,seed=0,min_digits=3,max_digits=4,max_response_tokens=8"
    task, oracle = build_task(cfg.task)
    gold = get_reward(spec, tokenizer=task.tokenizer)
    prompts, responses = ["3 1 2 9", "5 4 0"], ["1 2 3 9", "0 4 4 5"]
    expected = oracle.score_texts(prompts, responses)
    np.testing.assert_array_equal(gold.score_texts(prompts, responses), expected)
    with pytest.raises(ConfigError, match=r"methods: \['ilql'\]"):
        load_demo_config(None, ["methods=[ppo,ilql]"])


@pytest.mark.parametrize("override, key", [
    ("evaluation.best_of_n=[1,2,500]", "evaluation.best_of_n"),
    ("feedback.responses_per_prompt=1", "feedback.responses_per_prompt"),
    ("ppo.batch_size=2048", "ppo.prompts"),
    ("grpo.batch_size=2048", "ppo.prompts"),
    ("evaluation.rl_points=2", "evaluation.rl_points"),
    ("ensemble.members=1", "ensemble.members"),
    ("vgd.betas=[4,1]", "vgd.betas"),
    ("vgd.steps=0", "vgd.steps"),
    ("sft.stepz=3", "sft.stepz"),
    ("ppo.optimizer.learning_rate=fast", "ppo.optimizer.learning_rate"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_demo_config(None, [override])


def test_users_oracle_replaces_the_gold_reward():
    def prefers_short(prompt: str, response: str) -> float:
        return -float(len(response.split()))

    register_reward("test_demo_prefers_short", prefers_short, overwrite=True)
    cfg = load_demo_config(None, ["task.oracle=test_demo_prefers_short", "task.name=digit_sort"])
    task, oracle = build_task(cfg.task)
    assert task.name == "digit_sort" and isinstance(oracle, FunctionOracle)
    assert oracle.tokenizer is task.tokenizer
    np.testing.assert_array_equal(oracle.score_texts(["3 1 2", "5 4"], ["1 2 3", "4"]), [-3.0, -1.0])
    with pytest.raises(ConfigError, match=r"task\.oracle: unknown reward 'no_such_oracle'"):
        build_task(load_demo_config(None, ["task.oracle=no_such_oracle"]).task)
    # Token-array rewards, the built-ins and a task's oracle serve as the gold reward too (both forms).
    for spec in ("length", "token_count:5", "jaxrlhf.oracle.token_rewards:length_reward"):
        overrides = [f"task.oracle={spec}", "task.name=digit_sort"]
        task, oracle = build_task(load_demo_config(None, overrides).task)
        assert isinstance(oracle, TokenFunctionOracle) and oracle.tokenizer is task.tokenizer
        assert oracle.score_texts(["3 1 2"], ["1 2 3"]).shape == (1,)
    task, oracle = build_task(load_demo_config(None, ["task.oracle=task:digit_sort"]).task)
    assert oracle.score_texts(["3 1 2"], ["1 2 3"])[0] == 1.0
    # Another task with digit_sort's default options, or an unknown task: one line naming the key.
    with pytest.raises(ConfigError, match=r"^task\.options: task 'random_walk' does not accept .*"
                                          r"task\.options=\{\}\)$"):
        build_task(load_demo_config(None, ["task.name=random_walk"]).task)
    assert build_task(load_demo_config(None, ["task.name=random_walk", "task.options={}"]).task)[0].name == (
        "random_walk")
    with pytest.raises(ConfigError, match=r"^task\.name: unknown task"):
        build_task(load_demo_config(None, ["task.name=no_such_task"]).task)


def test_a_bad_oracle_fails_before_the_demo_writes_anything(tmp_path, capsys):
    from jaxrlhf import cli

    run_dir = tmp_path / "demo"
    argv = ["demo", "--quick", "--set", "task.oracle=no_such_module:f", "--set", f"run.dir={run_dir}"]
    assert cli.main(argv) == 1
    assert "task.oracle:" in capsys.readouterr().err
    assert not run_dir.exists()  # it wrote config.yaml, data/ and tokenizer/ first before


def test_split_feedback_keeps_every_record_once():
    records = [{"i": i} for i in range(20)]
    train, held_out = split_feedback(records, 0.1, seed=0)
    assert len(held_out) == 2 and sorted(r["i"] for r in train + held_out) == list(range(20))
    with pytest.raises(ValueError, match="1 records"):
        split_feedback(records[:1], 0.1, seed=0)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``jaxrlhf demo --quick`` through the command line, as a user (and CI) runs it."""
    from types import SimpleNamespace

    from jaxrlhf import cli

    run_dir = tmp_path_factory.mktemp("demo") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["demo", "--quick", "--set", f"run.dir={run_dir}", "--set", "run.progress_bar=false"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    return SimpleNamespace(run_dir=str(run_dir), report=str(run_dir / "report.md"), results=results,
                           summary=out.getvalue())


@pytest.mark.slow
def test_quick_demo_writes_run_directory(quick_run):
    root = Path(quick_run.run_dir)
    assert (root / "config.yaml").is_file()
    assert load_demo_config(str(root / "config.yaml")).sft.steps == 60  # the quick preset, reloadable
    for name in ("demonstrations", "demonstrations_eval", "preferences", "preferences_eval", "prompts",
                 "eval_prompts", "best_of_n_prompts"):
        assert (root / "data" / f"{name}.jsonl").stat().st_size > 0, name
    # Metrics JSONL and TensorBoard events: the demo's evaluation and every trainer's.
    for d in (root, root / "sft", root / "reward", *(root / m for m in METHOD_KEYS)):
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert records and all("step" in r for r in records), d
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(d)), d
    evaluated = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert {"sft/eval/gold", "ppo/eval/gold", "a2c/eval/kl", "dpo/eval/gold", "grpo_gold/eval/gold",
            "vgd/eval/gold", "vgd/eval/kl", "best_of_n/eval/gold",
            "best_of_n/eval/kl_bound"} <= set().union(*evaluated)
    # Checkpoints: every method's run keeps every evaluated step.
    for stage in ("sft", "reward"):
        assert any((root / stage / "checkpoints").iterdir()), stage
    for stage in METHOD_KEYS:
        steps = sorted(int(p.name) for p in (root / stage / "checkpoints").iterdir() if p.name.isdigit())
        assert steps == [2, 4, 6], stage
    # The stages' trainer configs load back as the trainers' own configs (jaxrlhf <stage> --config ...).
    from jaxrlhf.config import load_config
    from jaxrlhf.train import A2CRunConfig, PPORunConfig, RewardRunConfig, SFTRunConfig
    from jaxrlhf.train.dpo import DPORunConfig
    from jaxrlhf.train.rl import GRPORunConfig, RLOORunConfig

    classes = {"sft": SFTRunConfig, "reward": RewardRunConfig, "ppo": PPORunConfig, "a2c": A2CRunConfig,
               "grpo": GRPORunConfig, "rloo": RLOORunConfig, "dpo": DPORunConfig, "grpo_gold": GRPORunConfig}
    assert set((root / "configs").iterdir()) == {root / "configs" / f"{c}.yaml" for c in classes}
    for stage, cls in classes.items():
        cfg = load_config(cls, root / "configs" / f"{stage}.yaml")
        assert cfg.logging.run_dir == str(root / stage)


@pytest.mark.slow
def test_quick_demo_exports_load_in_transformers(quick_run):
    torch = pytest.importorskip("torch")
    import transformers

    root = Path(quick_run.run_dir)
    for stage in ("sft", "reward", *METHOD_KEYS):
        export = root / stage / "export"
        tokenizer = transformers.AutoTokenizer.from_pretrained(export)
        model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
        ids = tokenizer("A", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all(), stage
    assert (root / "reward" / "export" / "reward_normalization.json").is_file()


@pytest.mark.slow
def test_quick_demo_report_table_plots_and_summary(quick_run):
    root = Path(quick_run.run_dir)
    report = (root / "report.md").read_text()
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| policy | trained against |"))
    table = lines[header + 2 : header + 15]
    assert [line.split(" | ")[0].lstrip("| ") for line in table] == [
        "SFT", "best-of-4", "best-of-16", "best-of-64", "PPO", "A2C", "GRPO", "RLOO", "DPO",
        "Value-guided (ILQL)", "GRPO (gold)", "PPO (RM ens. WCO)", "PPO (RM ens. UWO)"]
    assert all("(95% CI over 64 prompts)" in line for line in table[:1] + table[4:])
    for metric in ("gold", "proxy"):
        link = f"plots/{metric}_vs_sqrt_kl.png"
        assert f"]({link})" in report
        assert (root / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "**Highest gold reward**: " in report and "## Gao et al. (2022) fits" in report
    assert "## Over-optimisation" in report
    assert "Over-optimisation rule: the evaluation prompts are split" in report
    assert "## Reward-model ensembles (Coste et al. 2024)" in report
    results = json.loads((root / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    a = results["analysis"]
    assert set(a["methods"]) == {*METHOD_KEYS, "vgd"}
    # Value-guided decoding: one point per β after SFT's, its KL (exact per step) growing with β.
    vgd = a["methods"]["vgd"]["curve"]
    assert [p["x"] for p in vgd] == [0, *VGD_BETAS_QUICK]
    assert 0 < vgd[1]["kl"] < vgd[-1]["kl"]
    assert a["methods"]["vgd"]["gao"]["form"] is None
    ilql = [json.loads(line) for line in (root / "vgd" / "ilql_metrics.jsonl").read_text().splitlines()]
    assert len(ilql) == 30 and all(np.isfinite(r["loss/ilql"]) for r in ilql)
    assert [p["x"] for p in a["methods"]["ppo"]["curve"]] == [0, 2, 4, 6]
    assert [p["x"] for p in a["methods"]["dpo"]["curve"]] == [0, 2, 4, 6]
    assert a["methods"]["ppo"]["curve"][0]["kl"] == 0.0
    for m in a["methods"].values():  # every run ends at a policy that moved away from SFT
        assert m["per_seed"][0]["kl"] > 0, m["name"]
        assert {"alpha", "beta", "r2"} <= set(m["gao"]) or "error" in m["gao"]
    # Best-of-n at the sample-based KL estimate, never above the bound log n − (n−1)/n.
    for p in a["best_of_n"]["points"]:
        assert 0 <= p["kl"] <= p["kl_bound"] + 1e-9
    # Held-out prompts: disjoint from every training list.
    overlap = results["prompt_overlap"]
    assert overlap["max_overlap"] == 0 and overlap["counts"]["evaluation"] == 64
    assert set(overlap["counts"]) == {"SFT", "feedback", "RL", "evaluation", "best-of-n evaluation"}
    # Reward normalisation refitted on fresh SFT samples: the export's file holds the new fit.
    norm = json.loads((root / "reward" / "export" / "reward_normalization.json").read_text())
    assert norm == {"gain": pytest.approx(results["normalization"]["gain"]),
                    "bias": pytest.approx(results["normalization"]["bias"])}
    assert results["ensemble"]["members"] == 2 and len(results["ensemble"]["eval_accuracy"]) == 2
    assert f"run directory: {root}" in quick_run.summary.splitlines()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_reports_reuse_commands_start_a_new_run_and_leave_the_demo_alone(quick_run, tmp_path,
                                                                             monkeypatch, capsys):
    """The commands report.md prints for running the stages' configs again (the demo's own trainer configs
    and exports are their inputs): run as printed (two steps each) from another directory, each trains in
    a new run directory beside the demo's, and not one file of the demo's run directory changes."""
    import shlex

    from jaxrlhf import cli

    root = Path(quick_run.run_dir)
    report = (root / "report.md").read_text()
    block = report.split("These commands run the same pipeline again")[1].split("```")[1]
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    assert [c[1] for c in commands] == ["sft", "reward", "ppo", "a2c", "grpo", "rloo", "dpo", "grpo"]
    before = _tree(root)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        tiny = ["--set", "train.steps=2", "--set", "logging.progress_bar=false", "--set",
                "logging.tensorboard=false", "--set", "logging.mfu_matmul_size=0"]
        assert cli.main([*argv[1:], *tiny]) == 0, (argv, capsys.readouterr().err[-2000:])
    assert _tree(root) == before
    again = root.with_name(root.name + "-again")
    for stage in ("sft", "reward", "ppo", "a2c", "grpo", "rloo", "dpo", "grpo_gold"):
        assert (again / stage / "export" / "config.json").is_file(), stage


@pytest.mark.parametrize("source, message", [
    ("def score(prompt, response):\n    return (\n", r"task\.oracle: reward 'user_gold_{i}:score': importing "
     r"'user_gold_{i}' raised SyntaxError: .*user_gold_{i}\.py:2\)"),
    ("def score(prompt, response):\n    return {{}}['missing']\n", r"reward 'user_gold_{i}:score' raised "
     r"KeyError: 'missing' \(.*user_gold_{i}\.py:2\) on prompt "),
], ids=["cannot-import", "raises"])
def test_a_failing_user_oracle_is_one_line(tmp_path, monkeypatch, capsys, source, message):
    """`jaxrlhf demo --set task.oracle=module:function` with a module in the working directory that does
    not import, or whose function raises when the demo first scores with it: one line, naming it."""
    import re

    from jaxrlhf import cli

    i = len(source)  # a fresh module name per case
    (tmp_path / f"user_gold_{i}.py").write_text(source.format())
    monkeypatch.chdir(tmp_path)
    code = cli.main(["demo", "--quick", "--set", f"task.oracle=user_gold_{i}:score", "--set", "sft.steps=2",
                     "--set", f"run.dir={tmp_path / 'run'}", "--set", "run.progress_bar=false"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("jaxrlhf demo: error: ") and re.search(message.format(i=i), line), line

"""The command line: parsing, config errors, data errors (one clear line, exit 1), and the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf.config import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
UTILITIES = {"task-data"}  # commands that train nothing


def sft_config(tmp_path: Path, train_file: str) -> dict:
    """A from-scratch SFT config (no files but the data) that fails, if at all, before any compilation."""
    return {
        "model": {"architecture": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                   "max_position_embeddings": 32},
                  "tokenizer": "char:abc"},
        "data": {"train_file": train_file, "batch_size": 2, "max_prompt_length": 4, "max_response_length": 4},
        "train": {"steps": 1},
        "logging": {"run_dir": str(tmp_path / "run"), "mfu_matmul_size": 0, "tensorboard": False},
    }


def run(tmp_path: Path, config: dict, *args: str, command: str = "sft") -> int:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli.main([command, "--config", str(path), *args])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    return err[-1]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("sft", "reward", "ppo", "a2c"):
        assert name in out
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    assert "--set KEY=VALUE" in capsys.readouterr().out


def _every_key(cls, prefix=""):
    """(dotted key, type hint) of every field of a config class, nested sections included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        yield prefix + field.name, hint
        for arg in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(arg):
                yield from _every_key(arg, prefix + field.name + ".")


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_command_help_lists_every_config_key_with_type_and_default(command, capsys):
    import typing

    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--print-config" in out and "--set KEY=VALUE" in out
    lines = out.splitlines()
    keys = list(_every_key(cli._resolve(cli.COMMANDS[command].config)))
    assert len(keys) > (5 if command in UTILITIES else 20)
    for key, hint in keys:
        line = next((ln for ln in lines if ln.split()[:1] in ([key], [key + ":"])), None)
        assert line is not None, f"{key} is missing from `jaxrlhf {command} --help`"
        if typing.get_origin(hint) is typing.Literal:  # choices are shown
            assert "{" + ",".join(map(str, typing.get_args(hint))) + "}" in line, line
    # A key's type and default: a float with its default value.
    lr = "sft.optimizer.learning_rate" if command == "demo" else "optimizer.learning_rate"
    assert command in UTILITIES or any(ln.split()[:3] == [lr, "float", "="] for ln in lines)


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    overrides = ["ppo.clip_eps=0.3", f"logging.run_dir={tmp_path / 'never'}"]
    args = ["ppo", "--config", str(CONFIGS / "ppo.yaml"), *(f"--set={o}" for o in overrides)]
    args.append("--print-config")
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["ppo"]["clip_eps"] == 0.3
    assert not (tmp_path / "never").exists()
    # The printed YAML is a config file giving the same config.
    (tmp_path / "resolved.yaml").write_text(out)
    expected = cli.load_command_config("ppo", str(CONFIGS / "ppo.yaml"), overrides)
    assert cli.load_command_config("ppo", str(tmp_path / "resolved.yaml"), []) == expected
    # --quick's preset is part of what the demo would run.
    assert cli.main(["demo", "--quick", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["quick"] is True
    # One key of a section keeps the command's own defaults for the others (DPO's learning rate and run
    # directory were reset to the section class's: 1e-5 and runs/run).
    dpo = cli.load_command_config("dpo", None, ["logging.log_every=5", "optimizer.warmup_steps=3"])
    assert (dpo.logging.run_dir, dpo.logging.log_every) == ("runs/dpo", 5)
    assert (dpo.optimizer.learning_rate, dpo.optimizer.warmup_steps) == (1e-6, 3)


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["kto"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.learning_rte=1e-5", "optimizer.learning_rte: unknown key for OptimizerConfig"),
        ("train.steps=many", "train.steps: expected int | None, got str 'many'"),
        ("ppo.kl_estimator=k9", "ppo.kl_estimator: expected Optional[Literal['k1', 'k2', 'k3']], got"),
        ("optimizer.warmup_steps=-1", "warmup_steps must be >= 0"),
        ("notakey", "expected key=value"),
    ],
)
def test_config_errors_name_the_key(tmp_path, capsys, override, message):
    config = sft_config(tmp_path, "unused.jsonl")
    assert run(tmp_path, config, "--set", override, command="ppo") == 1
    line = error_line(capsys)
    assert line.startswith("jaxrlhf ppo: error: ") and message in line
    assert "Traceback" not in capsys.readouterr().err


def test_kl_in_the_loss_defaults_to_k2_and_refuses_k1():
    assert cli.load_command_config("ppo", None, []).ppo.effective_kl_estimator == "k1"
    in_loss = cli.load_command_config("a2c", None, ["a2c.kl_in_reward=false"]).a2c
    assert in_loss.kl_estimator is None and in_loss.effective_kl_estimator == "k2"
    with pytest.raises(ConfigError, match=r"kl_estimator: k1 cannot be the KL in the loss .* gradient is 0"):
        cli.load_command_config("ppo", None, ["ppo.kl_in_reward=false", "ppo.kl_estimator=k1"])


def test_config_file_errors_name_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1\n")
    assert cli.main(["sft", "--config", str(path)]) == 1
    assert f"{path}:" in error_line(capsys)
    path.write_text(yaml.safe_dump({"trian": {"steps": 1}}))
    assert cli.main(["sft", "--config", str(path)]) == 1
    line = error_line(capsys)
    assert str(path) in line and "trian: unknown key for SFTRunConfig" in line


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"path": "m", "architecture": {}}}, "exactly one of model.path or model.architecture"),
        ({"model": {"architecture": {}}}, "model.tokenizer: required"),
        ({"train": {}}, "give train.steps or train.epochs"),
        ({"model": {"path": "/nonexistent/model"}}, "/nonexistent/model: model directory not found"),
    ],
)
def test_inconsistent_sections_are_config_errors(tmp_path, capsys, change, message):
    (tmp_path / "train.jsonl").write_text('{"prompt": "ab", "completion": "c"}\n')
    config = {**sft_config(tmp_path, str(tmp_path / "train.jsonl")), **change}
    assert run(tmp_path, config) == 1
    assert message in error_line(capsys)


def test_rl_needs_exactly_one_reward_source(tmp_path, capsys):
    write = tmp_path / "prompts.jsonl"
    write.write_text('{"prompt": "ab"}\n{"prompt": "ba"}\n')
    config = sft_config(tmp_path, str(write))
    assert run(tmp_path, config, command="a2c") == 1
    assert "give exactly one of reward.model_path, reward.function or reward.functions" in error_line(capsys)
    config["reward"] = {"function": "length", "functions": [{"function": "length"}]}
    assert run(tmp_path, config, command="a2c") == 1
    assert "(got reward.function and reward.functions)" in error_line(capsys)
    config["reward"] = {"function": "no_such_reward"}
    assert run(tmp_path, config, command="a2c") == 1
    assert "data.max_prompt_length + generation.max_new_tokens = 36 tokens exceeds the model's " \
           "max_position_embeddings (32)" in error_line(capsys)
    config["generation"] = {"max_new_tokens": 4, "temperature": 0.7}
    assert run(tmp_path, config, command="a2c") == 1
    assert "generation.temperature: 0.7 differs from the algorithm's temperature 1.0" in error_line(capsys)
    config["generation"] = {"max_new_tokens": 4}
    assert run(tmp_path, config, command="a2c") == 1
    assert "reward.function: unknown reward 'no_such_reward'" in error_line(capsys)


@pytest.mark.parametrize(("override", "value"), [("top_k", 5), ("top_p", 0.9), ("min_new_tokens", 1)])
def test_on_policy_rl_refuses_filtered_sampling(tmp_path, capsys, override, value):
    """Top-k, top-p and a minimum length sample from another distribution than the log-probs' softmax."""
    config = sft_config(tmp_path, str(tmp_path / "prompts.jsonl"))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ab"}\n{"prompt": "ba"}\n')
    config["reward"] = {"function": "length"}
    config["generation"] = {"max_new_tokens": 4, override: value}
    assert run(tmp_path, config, command="ppo") == 1
    line = error_line(capsys)
    assert f"generation.{override}: {value} is not supported by on-policy RL" in line
    assert "the first PPO ratio would read 1 while the update is off-policy" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("lines", "where", "message"),
    [
        (['{"prompt": "ab", "completion": "c"}', '{"prompt": "ab", "completion": '], ":2:", "malformed JSON"),
        (['{"prompt": "ab", "completion": "c"}', '{"prompt": "ab"}'], ":2:", "missing field 'completion'"),
        ([], "", "no records"),
        (['{"prompt": "abcabc", "completion": "c"}'], ":1:", "more than data.max_prompt_length=4"),
    ],
    ids=["malformed-json", "missing-field", "empty-file", "prompt-too-long"],
)
def test_bad_data_gives_one_line_naming_file_and_line(tmp_path, capsys, lines, where, message):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    assert run(tmp_path, sft_config(tmp_path, str(data))) == 1
    line = error_line(capsys)
    assert line.startswith(f"jaxrlhf sft: error: {data}{where}") and message in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_file_and_debug_traceback(tmp_path, capsys):
    config = sft_config(tmp_path, str(tmp_path / "missing.jsonl"))
    assert run(tmp_path, config) == 1
    assert "missing.jsonl: no such file" in error_line(capsys)
    with pytest.raises(ConfigError, match=r"data\.train_file: "):
        run(tmp_path, config, "--debug")


def test_batch_larger_than_the_dataset_is_a_data_error(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "ab", "completion": "c"}) + "\n")
    assert run(tmp_path, sft_config(tmp_path, str(data))) == 1
    assert "data.batch_size=2 exceeds the file's 1 examples" in error_line(capsys)


@pytest.mark.parametrize("command", sorted(set(cli.COMMANDS) - {"demo"} - UTILITIES))
def test_shipped_configs_are_valid(command):
    config = cli.load_command_config(command, str(CONFIGS / f"{command}.yaml"), [])
    assert config.train.steps or config.train.epochs
    with pytest.raises(ConfigError, match="unknown key"):
        cli.load_command_config(command, str(CONFIGS / f"{command}.yaml"), ["data.nope=1"])


def test_demo_config_and_quick_flag():
    """configs/demo.yaml loads; --quick applies the smoke-run preset before any --set."""
    config = cli.load_command_config("demo", str(CONFIGS / "demo.yaml"), [])
    assert config.ppo.iterations > 6 and not config.run.quick
    args = cli.build_parser().parse_args(["demo", "--quick", "--set", "ppo.iterations=7"])
    assert args.quick and args.overrides == ["ppo.iterations=7"]
    with pytest.raises(SystemExit):  # only the demo has a --quick flag
        cli.build_parser().parse_args(["sft", "--quick"])


def test_demo_full_flag(capsys):
    """--full: every method over eight seeds (before any --set); with --quick, a one-line error."""
    assert cli.main(["demo", "--full", "--print-config"]) == 0
    run = yaml.safe_load(capsys.readouterr().out)["run"]
    assert run["full"] is True and run["seeds"] == 8
    assert cli.main(["demo", "--full", "--set", "run.seeds=6", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["seeds"] == 6
    assert cli.main(["demo", "--quick", "--full", "--print-config"]) == 1
    assert capsys.readouterr().err.strip().endswith("--quick and --full: choose one preset")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["ppo", "--full"])


# The recipes that are configs of another command: configs/<name>.yaml runs with `jaxrlhf <command>`.
RECIPES = {"dr_grpo": "grpo", "dapo": "grpo", "gspo": "grpo", "reinforce_pp": "rloo", "remax": "rloo",
           "sft_arithmetic": "sft"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_configs_are_valid(name):
    command = RECIPES[name]
    config = cli.load_command_config(command, str(CONFIGS / f"{name}.yaml"), [])
    assert config.train.steps
    if command in ("grpo", "rloo"):
        algo = getattr(config, command)
        assert algo.advantage == {"dr_grpo": "dr_grpo", "dapo": "grpo", "gspo": "grpo",
                                  "reinforce_pp": "reinforce_pp_baseline", "remax": "remax"}[name]
        assert config.reward.function == "task:arithmetic,answer_order=lsb"


@pytest.mark.parametrize(
    ("command", "overrides", "message"),
    [
        ("grpo", ["grpo.group_size=1"], "--set: grpo.group_size: 1 is below 2, but the 'grpo' baseline"),
        ("rloo", ["rloo.group_size=1"], "--set: rloo.group_size: 1 is below 2, but the 'rloo' baseline"),
        ("grpo", ["grpo.group_size=3", "grpo.num_minibatches=4"],
         "grpo.num_minibatches: data.batch_size × grpo.group_size = 6 sequences per iteration do not split"),
        # The key that does not divide is the one named (it named num_minibatches, which a2c does not have)
        ("grpo", ["grpo.group_size=3", "grpo.num_minibatches=2", "grpo.grad_accum_steps=2"],
         "grpo.grad_accum_steps: data.batch_size × grpo.group_size = 6 sequences per iteration do not split "
         "into 2 minibatches (grpo.num_minibatches) × 2 micro-batches (grpo.grad_accum_steps)"),
        ("a2c", ["a2c.grad_accum_steps=3"], "a2c.grad_accum_steps: data.batch_size = 2 sequences per "
         "iteration do not split into 3 micro-batches (a2c.grad_accum_steps) of equal size"),
        ("grpo", ["grpo.ratio=sequence", "grpo.loss_agg=token_mean"], "--set: grpo.loss_agg: GSPO's"),
        ("rloo", ["rloo.advantage=ppo"], "rloo.advantage: expected Optional[Literal['grpo', 'dr_grpo', "),
    ],
)
def test_critic_free_bad_input_is_one_line_naming_the_key(tmp_path, capsys, command, overrides, message):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ab"}\n')  # inputs exist: the config is at fault
    config = sft_config(tmp_path, str(tmp_path / "prompts.jsonl"))
    config["reward"] = {"function": "length"}
    args = [a for o in overrides for a in ("--set", o)]
    assert run(tmp_path, config, *args, command=command) == 1
    line = error_line(capsys)
    assert line.startswith(f"jaxrlhf {command}: error: ") and message in line, line
    assert not (tmp_path / "run").exists()


def test_task_data_writes_disjoint_splits_and_a_tokenizer(tmp_path, capsys):
    out = tmp_path / "arith"
    assert cli.main(["task-data", "--set", f"out_dir={out}", "--set", "sft_examples=64",
                     "--set", "eval_examples=16", "--set", "rl_prompts=32"]) == 0
    assert "RL reward: --set reward.function=task:arithmetic" in capsys.readouterr().out
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]
    sft, prompts, held_out = read("sft.jsonl"), read("prompts.jsonl"), read("eval_prompts.jsonl")
    assert (len(sft), len(prompts), len(held_out), len(read("sft_eval.jsonl"))) == (64, 32, 16, 16)
    assert set(sft[0]) == {"prompt", "completion"} and set(prompts[0]) == {"prompt"}
    seen = lambda rows: {r["prompt"] for r in rows}
    assert not seen(sft) & seen(prompts) and not seen(prompts) & seen(held_out)
    assert not seen(sft) & seen(held_out)
    from jaxrlhf.oracle import get_reward

    oracle = get_reward("task:arithmetic")
    gold = oracle.score_texts([r["prompt"] for r in held_out], [r["completion"] for r in held_out])
    assert (gold == 1.0).all()  # the held-out completions are the optimal answers
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "tokenizer").get_vocab()
    assert cli.main(["task-data", "--set", "task=nope", "--set", f"out_dir={out}"]) == 1
    assert "task: unknown task 'nope'" in error_line(capsys)


# ------------------------------------------------------------------ one --set switches the source


def test_model_path_replaces_the_files_architecture_and_tokenizer():
    """configs/sft.yaml trains from scratch with a toy tokenizer; --set model.path takes both from the
    model directory instead, unless the tokenizer is given too."""
    written = cli.load_command_config("sft", str(CONFIGS / "sft.yaml"), [])
    assert written.model.architecture is not None and written.model.tokenizer.startswith("char:")
    cfg = cli.load_command_config("sft", str(CONFIGS / "sft.yaml"), ["model.path=my-model"])
    assert (cfg.model.path, cfg.model.architecture, cfg.model.tokenizer) == ("my-model", None, None)
    assert cfg.model.dtype == written.model.dtype and cfg.data == written.data  # nothing else moves
    cfg = cli.load_command_config("sft", str(CONFIGS / "sft.yaml"), ["model.path=m", "model.tokenizer=tok"])
    assert cfg.model.tokenizer == "tok"
    back = cli.load_command_config("reward", str(CONFIGS / "reward.yaml"),
                                   ["model.architecture={hidden_size: 16}", "model.tokenizer=char:ab"])
    assert back.model.path is None and back.model.architecture.hidden_size == 16


def test_reward_function_replaces_the_reward_model_and_its_critic_default():
    from jaxrlhf.train.run_config import critic_init_path

    written = cli.load_command_config("a2c", str(CONFIGS / "a2c.yaml"), [])
    assert written.a2c.critic == "separate"
    assert critic_init_path(written.critic, written.reward) == "runs/reward/export"  # the reward model
    cfg = cli.load_command_config("a2c", str(CONFIGS / "a2c.yaml"), ["reward.function=my_rewards:score"])
    assert cfg.reward.model_path is None and cfg.reward.function == "my_rewards:score"
    assert critic_init_path(cfg.critic, cfg.reward) is None  # the policy's weights
    several = cli.load_command_config(
        "ppo", str(CONFIGS / "ppo.yaml"),
        ["reward.functions=[{function: length, weight: 0.5}, {function: 'm:f', name: answer}]"])
    assert several.reward.model_path is None
    assert [(f.function, f.weight, f.name) for f in several.reward.functions] == [
        ("length", 0.5, None), ("m:f", 1.0, "answer")]
    # And back: over a config file naming a function, --set reward.model_path replaces it.
    cfg = cli.load_command_config("a2c", None, ["reward.model_path=rm"])
    assert cfg.reward.function is None


# ------------------------------------------------------------------ the shipped configs' paths

INPUT_KEYS = ("train_file", "eval_file", "path", "model_path", "tokenizer")


def _input_paths(path: Path):
    """(line number, key, value, comment) of each input path a config file names on an uncommented line."""
    import re

    pattern = re.compile(r"^\s*(\w+):\s*([^#\s][^#]*?)\s*(?:#\s*(.*))?$")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        m = pattern.match(line)
        if m and m.group(1) in INPUT_KEYS and m.group(2) not in ("null", "~") and not m.group(2).startswith(
                ('"char:', "char:", "{")):
            yield number, m.group(1), m.group(2).strip("\"'"), m.group(3) or ""


def test_every_path_in_the_shipped_configs_exists_or_is_documented_as_the_users():
    """A path in configs/*.yaml exists in the repository, or its comment says whose it is: "yours" (a
    file the user supplies) or "written by: jaxrlhf <command> ..." (another command's output)."""
    repo = CONFIGS.parent
    seen = 0
    for config in sorted(CONFIGS.glob("*.yaml")):
        for number, key, value, comment in _input_paths(config):
            seen += 1
            documented = comment.startswith("yours") or comment.startswith("written by: jaxrlhf ")
            assert (repo / value).exists() or documented, (
                f"{config.name}:{number}: {key}: {value} does not exist and its comment does not say it is "
                "the user's ('# yours: ...') or another command's ('# written by: jaxrlhf ...')")
    assert seen >= 6  # the parser found the data and model paths


WITH_CONFIG = sorted(c for c in set(cli.COMMANDS) - {"demo"} if (CONFIGS / f"{c}.yaml").exists())


@pytest.mark.parametrize("command", WITH_CONFIG)
def test_shipped_configs_name_a_missing_input_before_loading_anything(command, tmp_path, monkeypatch, capsys):
    """Run as written where none of the user's files exist: one line naming the key and the file, before
    any model or tokenizer is loaded."""
    from jaxrlhf.models import hf_io
    from jaxrlhf.train import model_setup

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a model or tokenizer before checking the inputs")

    monkeypatch.setattr(hf_io, "load", must_not_load)
    monkeypatch.setattr(model_setup, "load_tokenizer", must_not_load)
    monkeypatch.chdir(tmp_path)
    assert cli.main([command, "--config", str(CONFIGS / f"{command}.yaml")]) == 1
    line = error_line(capsys)
    config = cli.load_command_config(command, str(CONFIGS / f"{command}.yaml"), [])
    assert line == f"jaxrlhf {command}: error: data.train_file: {config.data.train_file}: no such file"
    (tmp_path / config.data.train_file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / config.data.train_file).write_text('{"prompt": "a", "completion": "b", "chosen": "b", '
                                                   '"rejected": "c"}\n')
    eval_file = getattr(config.data, "eval_file", None)
    if eval_file is not None:  # a config's eval file is an input too: present, so the model is next
        (tmp_path / eval_file).write_text((tmp_path / config.data.train_file).read_text())
    if config.model.path is not None:
        assert cli.main([command, "--config", str(CONFIGS / f"{command}.yaml")]) == 1
        assert error_line(capsys) == (f"jaxrlhf {command}: error: model.path: {config.model.path}: model "
                                      "directory not found")
    assert not (tmp_path / config.logging.run_dir).exists()  # no run directory was written

"""Config validation as a user meets it: out-of-range values, micro-batches that do not split the batch, and
errors that name the dotted key and the layer (file or --set) that set it: one line, exit 1, no run dir."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.steps import OptimizerConfig
from jaxrlhf.steps.rl_config import A2CConfig, GRPOConfig, PPOConfig, RLOOConfig
from jaxrlhf.train.run_config import DataSection, check_grad_accum

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Every shipped RL config: (command, its algorithm section).
RL_CONFIGS = {"ppo": "ppo", "a2c": "a2c", "grpo": "grpo", "dr_grpo": "grpo", "dapo": "grpo", "gspo": "grpo",
              "rloo": "rloo", "reinforce_pp": "rloo", "remax": "rloo"}
ROWS = {
    "sft": '{"prompt": "ab", "completion": "c"}\n',
    "reward": '{"prompt": "ab", "chosen": "c", "rejected": "a"}\n',
    "dpo": '{"prompt": "ab", "chosen": "c", "rejected": "a"}\n',
    "ilql": '{"prompt": "ab", "response": "c", "reward": 1.0}\n',
}


def from_scratch(tmp_path: Path, command: str, batch_size: int = 2) -> dict:
    """A from-scratch config of ``command`` whose inputs exist (so only the value under test is at fault)."""
    data = tmp_path / f"{command}.jsonl"
    data.write_text(ROWS[command] * 4)
    return {
        "model": {"architecture": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                   "max_position_embeddings": 32},
                  "tokenizer": "char:abc"},
        "data": {"train_file": str(data), "batch_size": batch_size, "max_prompt_length": 4,
                 "max_response_length": 4},
        "train": {"steps": 1},
        "logging": {"run_dir": str(tmp_path / "run"), "mfu_matmul_size": 0, "tensorboard": False,
                    "progress_bar": False},
    }


def main(tmp_path: Path, command: str, config: dict, *overrides: str) -> int:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli.main([command, "--config", str(path), *(a for o in overrides for a in ("--set", o))])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


# ------------------------------------------------------------------------------ out-of-range values


@pytest.mark.parametrize(("override", "message"), [
    ("optimizer.learning_rate=-1", "optimizer.learning_rate must be a finite number >= 0, got -1.0"),
    ("optimizer.learning_rate=.nan", "optimizer.learning_rate must be a finite number >= 0, got nan"),
    ("optimizer.learning_rate=.inf", "optimizer.learning_rate must be a finite number >= 0, got inf"),
    ("optimizer.b1=2", "optimizer.b1 must be a finite number in [0, 1), got 2.0"),
    ("optimizer.b1=1", "optimizer.b1 must be a finite number in [0, 1), got 1.0"),
    ("optimizer.b2=1.5", "optimizer.b2 must be a finite number in [0, 1), got 1.5"),
    ("optimizer.b2=-0.1", "optimizer.b2 must be a finite number in [0, 1), got -0.1"),
    ("optimizer.eps=0", "optimizer.eps must be a finite number > 0, got 0.0"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay must be a finite number >= 0, got -1.0"),
    ("optimizer.end_lr_factor=-2", "optimizer.end_lr_factor must be a finite number in [0, 1], got -2.0"),
    ("optimizer.end_lr_factor=10", "optimizer.end_lr_factor must be a finite number in [0, 1], got 10.0"),
    ("optimizer.max_grad_norm=.nan",
     "optimizer.max_grad_norm must be a number (null or <= 0: no clipping), got nan"),
])
def test_bad_optimizer_values_are_one_line_naming_the_key(tmp_path, capsys, override, message):
    assert main(tmp_path, "sft", from_scratch(tmp_path, "sft"), override) == 1
    assert error_line(capsys) == f"jaxrlhf sft: error: --set: {message}"
    assert not (tmp_path / "run").exists()


def test_optimizer_boundaries_and_traced_values_are_accepted():
    edge = OptimizerConfig(learning_rate=0.0, b1=0.0, b2=0.0, eps=1e-12, weight_decay=0.0, end_lr_factor=0.0,
                           max_grad_norm=None)
    assert edge.learning_rate == 0.0
    assert OptimizerConfig(end_lr_factor=1.0).end_lr_factor == 1.0  # a flat schedule
    # A vmapped learning-rate sweep may hold a non-Python scalar: only Python numbers are checked.
    np = pytest.importorskip("numpy")
    assert OptimizerConfig(learning_rate=np.float32(1e-3)).learning_rate == np.float32(1e-3)
    with pytest.raises(ValueError, match=r"OptimizerConfig\.learning_rate"):  # built in Python: the class
        OptimizerConfig(learning_rate=math.nan)


RL_BAD = [
    ("kl_coef", "-0.5", "must be a finite number >= 0, got -0.5"),
    ("kl_coef", ".nan", "must be a finite number >= 0, got nan"),
    ("gamma", "1.5", "must be in [0, 1], got 1.5"),
    ("gamma", ".nan", "must be in [0, 1], got nan"),
    ("lam", "-1", "must be in [0, 1], got -1.0"),
]


@pytest.mark.parametrize(("name", "field", "value", "rule"), [
    (name, *bad) for name in sorted(RL_CONFIGS) for bad in RL_BAD
    if bad[0] == "kl_coef" or RL_CONFIGS[name] in ("ppo", "a2c")  # GAE: the critic's methods only
])
def test_bad_rl_values_name_the_key_in_every_shipped_config(name, field, value, rule):
    command = RL_CONFIGS[name]
    with pytest.raises(ConfigError) as info:
        cli.load_command_config(command, str(CONFIGS / f"{name}.yaml"), [f"{command}.{field}={value}"])
    assert str(info.value) == f"--set: {command}.{field} {rule}"


@pytest.mark.parametrize("cls", [PPOConfig, A2CConfig, GRPOConfig, RLOOConfig])
def test_rl_boundaries_are_accepted_and_nan_is_not(cls):
    critic = cls in (PPOConfig, A2CConfig)
    edge = cls(kl_coef=0.0, **({"gamma": 0.0, "lam": 1.0} if critic else {}))
    assert edge.kl_coef == 0.0
    for field, bad in [("kl_coef", -1.0), ("kl_coef", math.nan), ("clip_eps", math.nan),
                       ("temperature", math.nan), ("kl_target", 0.0)] + (
            [("gamma", 1.0001), ("lam", math.nan), ("vf_coef", -0.1)] if critic else []):
        if field == "clip_eps" and cls is A2CConfig:
            continue
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
            cls(**{field: bad})


# ----------------------------------------------------------------- micro-batches of the supervised trainers


@pytest.mark.parametrize(("command", "key"), [
    ("sft", "sft.grad_accum_steps"),
    ("reward", "reward_model.grad_accum_steps"),
    ("dpo", "dpo.grad_accum_steps"),
    ("ilql", "ilql.grad_accum_steps"),
])
def test_grad_accum_that_does_not_split_the_batch_fails_before_the_run(tmp_path, capsys, command, key):
    config = from_scratch(tmp_path, command, batch_size=4)
    assert main(tmp_path, command, config, f"{key}=3") == 1
    assert error_line(capsys) == (
        f"jaxrlhf {command}: error: {key}: data.batch_size=4 does not split into {key}=3 micro-batches of "
        "equal size (make data.batch_size a multiple of it)")
    assert not (tmp_path / "run").exists()


def test_grad_accum_that_splits_the_batch_passes():
    for steps in (1, 2, 4, 8):
        check_grad_accum("sft.grad_accum_steps", steps, DataSection(batch_size=8))
    with pytest.raises(ConfigError, match=r"^sft\.grad_accum_steps: data\.batch_size=8 does not split"):
        check_grad_accum("sft.grad_accum_steps", 3, DataSection(batch_size=8))


# ---------------------------------------------------------------------- which layer set the bad value


def test_a_bad_set_value_is_blamed_on_set_not_on_the_defaults(tmp_path, capsys):
    args = ["sft", "--set", "model.path=my-model", "--set", "data.train_file=sft.jsonl",
            "--set", "optimizer.learning_rate=-1", "--print-config"]
    assert cli.main(args) == 1
    line = error_line(capsys)
    assert line == "jaxrlhf sft: error: --set: optimizer.learning_rate must be a finite number >= 0, got -1.0"
    assert "defaults" not in line and "OptimizerConfig" not in line


def test_a_bad_set_value_is_blamed_on_set_not_on_the_file(capsys):
    ppo = str(CONFIGS / "ppo.yaml")
    assert yaml.safe_load(Path(ppo).read_text())["ppo"]["clip_eps"] == 0.2  # the file's value is fine
    assert cli.main(["ppo", "--config", ppo, "--set", "ppo.clip_eps=-0.1", "--print-config"]) == 1
    line = error_line(capsys)
    assert line == "jaxrlhf ppo: error: --set: ppo.clip_eps must be a finite number > 0, got -0.1"
    # A whole section given by --set owns its keys too.
    with pytest.raises(ConfigError, match=r"^--set: ppo\.clip_eps must be"):
        cli.load_command_config("ppo", ppo, ["ppo={clip_eps: -0.1}"])


def test_a_bad_file_value_is_blamed_on_the_file_even_with_other_sets(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  clip_eps: -0.2\noptimizer:\n  b1: 1.0\n")
    with pytest.raises(ConfigError) as info:
        cli.load_command_config("ppo", str(path), ["ppo.kl_coef=0.1", "train.steps=3"])
    assert str(info.value) == f"{path}: ppo.clip_eps must be a finite number > 0, got -0.2"
    # Fixing it with --set moves on to the file's next bad value.
    with pytest.raises(ConfigError) as info:
        cli.load_command_config("ppo", str(path), ["ppo.clip_eps=0.1"])
    assert str(info.value) == f"{path}: optimizer.b1 must be a finite number in [0, 1), got 1.0"
    # Type errors and unknown keys too.
    path.write_text("optimizer:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: optimizer\.bogus: unknown key for OptimizerConfig"):
        cli.load_command_config("ppo", str(path), ["optimizer.b1=0.5"])
    with pytest.raises(ConfigError, match=r"^--set: optimizer\.b1: expected float, got str 'x'"):
        cli.load_command_config("ppo", str(CONFIGS / "ppo.yaml"), ["optimizer.b1=x"])


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"Inner.lr must be >= 0, got {self.lr}")
        if self.steps < 1:
            raise ValueError(f"steps and lr disagree ({self.steps})")


@dataclasses.dataclass(frozen=True)
class Section:
    inner: Inner | None = None  # an optional section: its own error, not "expected Inner | None"
    other: Inner = dataclasses.field(default_factory=Inner)


def test_section_validation_names_the_dotted_key_and_its_layer(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(Section, overrides=["inner.lr=-1"])
    assert str(info.value) == "--set: inner.lr must be >= 0, got -1.0" and info.value.key == "inner.lr"
    path = tmp_path / "c.yaml"
    path.write_text("other:\n  lr: -2\n")
    with pytest.raises(ConfigError) as info:
        load_config(Section, path, ["inner.lr=1"])
    assert str(info.value) == f"{path}: other.lr must be >= 0, got -2.0"
    # A message naming no field goes under its section's key.
    with pytest.raises(ConfigError) as info:
        load_config(Section, overrides=["other.steps=0"])
    assert str(info.value) == "--set: other: steps and lr disagree (0)"
    # A key neither layer set alone (the file gave the section, --set a part of it): both are named.
    path.write_text("other:\n  lr: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Section, path, ["other.steps=0"])
    assert str(info.value) == f"{path} + --set: other: steps and lr disagree (0)"


def test_a_preset_is_its_own_layer(tmp_path):
    """--quick/--full values sit between the file and --set, and an error on one of them names the preset."""
    with pytest.raises(ConfigError) as info:
        load_config(Section, overrides=[], preset=["inner.lr=-1"], preset_name="--quick")
    assert str(info.value) == "--quick: inner.lr must be >= 0, got -1.0"
    assert load_config(Section, overrides=["inner.lr=2"], preset=["inner.lr=-1"]).inner.lr == 2.0  # --set
    path = tmp_path / "c.yaml"
    path.write_text("other:\n  lr: -2\n")
    assert load_config(Section, path, preset=["other.lr=3"]).other.lr == 3.0  # the preset wins over the file
    with pytest.raises(ConfigError) as info:
        load_config(Section, path, ["inner.lr=1"], preset=["inner.steps=2"], preset_name="--quick")
    assert str(info.value) == f"{path}: other.lr must be >= 0, got -2.0"
    path.write_text("other:\n  lr: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Section, path, ["inner.lr=1"], preset=["other.steps=0"], preset_name="--full")
    assert str(info.value) == f"{path} + --full + --set: other: steps and lr disagree (0)"


def test_a_bad_quick_preset_value_is_blamed_on_the_preset(capsys, monkeypatch):
    from jaxrlhf.experiments import demo_config

    monkeypatch.setattr(demo_config, "QUICK_OVERRIDES", (*demo_config.QUICK_OVERRIDES, "ppo.iterations=0"))
    assert cli.main(["demo", "--quick", "--print-config"]) == 1
    assert error_line(capsys) == "jaxrlhf demo: error: --quick: ppo.iterations: must be >= 1, got 0"
    assert cli.main(["demo", "--quick", "--set", "ppo.iterations=2", "--print-config"]) == 0  # --set wins
    assert "iterations: 2" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"^--quick: ppo\.iterations: must be >= 1, got 0$"):
        demo_config.load_demo_config(quick=True)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("logging.run_dir", "victim.txt", "victim.txt: is not a directory"),
    ("checkpoint.dir", "victim.txt/sub", "victim.txt/sub: its part victim.txt is not a directory"),
])
def test_an_output_directory_that_is_a_file_fails_before_the_run(tmp_path, capsys, monkeypatch, key, value,
                                                                  message):
    """A file where a run writes its directory failed at the first write (a traceback), or after training
    (the checkpoint); now it is one line up front and the file is untouched."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "victim.txt").write_text("mine")
    config = from_scratch(tmp_path, "sft")
    assert main(tmp_path, "sft", config, f"{key}={value}") == 1
    assert error_line(capsys).endswith(f"{key}: {message}")
    assert (tmp_path / "victim.txt").read_text() == "mine" and not (tmp_path / "run").exists()

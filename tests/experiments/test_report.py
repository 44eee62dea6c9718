"""The plots as valid PNGs (with Gao fits drawn), and the report's commands for running the stages again.
(The report rendered from analysed results: tests/experiments/test_demo_analysis.py.)"""

import math

import numpy as np

from jaxrlhf.experiments.curves import CurvePoint
from jaxrlhf.experiments.plots import plot_reward_vs_sqrt_kl
from jaxrlhf.experiments.report import reuse_commands


def test_plots_are_valid_pngs(tmp_path):
    import matplotlib.image

    curves = {
        "PPO": [CurvePoint(0, 0.0, 0.3, 0.05, 0.2), CurvePoint(10, 1.0, 0.8, 0.07, 1.2, math.nan)],
        "best-of-n": [CurvePoint(n, math.log(n) - (n - 1) / n, 0.3 + 0.1 * i, 0.04, 0.2 * i)
                      for i, n in enumerate((1, 2, 4))],
        "A2C": [],
    }
    fit = {"form": "rl", "alpha": 0.5, "beta": 0.2, "gold_at_zero": 0.3, "d_max": 1.0}
    fits = {"PPO": fit, "best-of-n": {"form": "bon", "error": "need 3 points"}, "ILQL": fit}
    curves["ILQL"] = [CurvePoint(0, 0.0, 0.3, 0.05, 0.2), CurvePoint(1, 0.5, 0.5, 0.05, 0.4)]  # no style
    for metric in ("gold", "proxy"):
        path = plot_reward_vs_sqrt_kl(curves, metric, tmp_path / "plots" / f"{metric}.png", optimum=1.0,
                                      fits=fits if metric == "gold" else None)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert np.ptp(image) > 0  # not a blank canvas


def test_reuse_commands_write_a_new_run_and_read_nothing_the_demo_wrote_as_output(tmp_path):
    """The report's "run it again" commands: each stage's run directory, and every input that was another
    stage's output (exports, checkpoints), move to <run>-again; the demo's data files and tokenizer are
    read where they are. Loaded as the CLI loads them, no path a command writes lies in the demo's run."""
    import shlex

    import yaml

    from jaxrlhf import cli

    root = tmp_path / "demo-1"
    (root / "configs").mkdir(parents=True)
    stage_configs = {
        "sft": {"model": {"architecture": {"hidden_size": 16}, "tokenizer": str(root / "tokenizer")},
                "data": {"train_file": str(root / "data/demos.jsonl")},
                "logging": {"run_dir": str(root / "sft")}},
        "reward": {"model": {"path": str(root / "sft/export")}, "logging": {"run_dir": str(root / "reward")},
                   "checkpoint": {"dir": str(root / "reward/checkpoints")}},
        "ppo": {"model": {"path": str(root / "sft/export")},
                "reward": {"model_path": str(root / "reward/export")},
                "logging": {"run_dir": str(root / "ppo")}},
    }
    for name, config in stage_configs.items():
        (root / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(config))
    results = {"run_dir": str(root), "configs": {n: f"configs/{n}.yaml" for n in stage_configs}}
    again = tmp_path / "demo-1-again"
    commands = reuse_commands(results)
    assert commands[0] == (f"jaxrlhf sft --config {root}/configs/sft.yaml --set logging.run_dir={again}/sft")
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "jaxrlhf"
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        config = cli.load_command_config(argv[1], argv[3], sets)
        for written in (config.logging.run_dir, config.checkpoint.dir):
            assert written is None or not written.startswith(str(root) + "/"), (command, written)
        for read in (config.model.path, getattr(getattr(config, "reward", None), "model_path", None)):
            assert read is None or read.startswith(str(again)), (command, read)
        assert config.model.tokenizer in (None, str(root / "tokenizer"))  # an input: read where it is

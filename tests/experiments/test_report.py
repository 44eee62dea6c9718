"""report.md and the console summary rendered from a fixed results dict; the plots as valid PNGs."""

import math

import numpy as np

from jaxrlhf.experiments.curves import CurvePoint
from jaxrlhf.experiments.plots import plot_reward_vs_sqrt_kl
from jaxrlhf.experiments.report import (
    comparison_table,
    render_report,
    render_summary,
    reuse_commands,
    table_rows,
)


def _policy(gold, gold_ci, proxy, kl, optimal):
    return {"name": "x", "gold": gold, "gold_ci": gold_ci, "proxy": proxy, "proxy_ci": 0.05, "kl": kl,
            "kl_ci": 0.01, "optimal": optimal, "finished": 1.0, "length": 3.0, "samples": 1024}


def _point(x, kl, gold, proxy):
    return {"x": x, "kl": kl, "gold": gold, "gold_ci": 0.04, "proxy": proxy, "proxy_ci": 0.03, "optimal": 0.5}


def make_results():
    return {
        "run_dir": "/runs/demo-1", "quick": False,
        "task": {"name": "random_walk", "description": "random_walk: a 12-node graph",
                 "oracle": "the task's own (random_walk)"},
        "settings": [["task", "random_walk (seed 0)"], ["seed", "0"]],
        "timings": {"sft": 42.0, "rl": 78.4, "total": 194.0},
        "data": {"files": {"demonstrations": "data/demonstrations.jsonl"},
                 "feedback": {"kind": "preference", "train_records": 769, "eval_records": 85,
                              "dropped_unfinished": 2,
                              "coverage": {"kind": "preference", "records": 769, "distinct_prompts": 11,
                                           "distinct_responses": 743, "distinct_prompt_responses": 879,
                                           "comparisons": 769, "distinct_comparisons": 700}}},
        "sft": {"eval_loss": 0.5312, "eval_token_accuracy": 0.8125},
        "reward_model": {"eval_accuracy": 0.8824, "agreement": 0.8646, "agreement_pairs": 384},
        "policies": {"SFT": _policy(0.3061, 0.0491, 0.2163, 0.0, 0.378),
                     "PPO": _policy(0.8004, 0.0709, 1.2791, 1.3271, 0.894),
                     "A2C": _policy(0.6331, 0.0718, 1.1512, 1.2122, math.nan)},
        "best_of_n": [_point(1, 0.0, 0.285, 0.257), _point(4, math.log(4) - 0.75, 0.837, 1.12),
                      _point(16, math.log(16) - 15 / 16, 0.857, 1.271)],
        "curves": {"PPO": [_point(0, 0.0, 0.306, 0.216), _point(12, 1.286, 0.679, 1.18)]},
        "verdicts": {"PPO": {"overoptimized": False, "text": "no: gold is highest at the last point"},
                     "best-of-n": {"overoptimized": True, "text": "yes: gold fell from 0.9 to 0.7"}},
        "rule": "over-optimised when gold falls while proxy rises",
        "acceptance": {"ppo_beats_sft": True},
        "exports": {"PPO": "ppo/export"}, "logs": {"demo evaluation metrics": "metrics.jsonl"},
        "plots": {"gold": "plots/gold_vs_sqrt_kl.png", "proxy": "plots/proxy_vs_sqrt_kl.png"},
        "configs": {"sft": "configs/sft.yaml", "ppo": "configs/ppo.yaml"},
    }


def test_comparison_table_exact_lines():
    assert comparison_table(make_results()) == [
        "| policy | gold reward (95% CI) | proxy reward | KL to SFT (nats) | √KL | optimal answers |",
        "|---|---:|---:|---:|---:|---:|",
        "| SFT | 0.306 ± 0.049 | 0.216 | 0.000 | 0.000 | 37.8% |",
        "| best-of-4 | 0.837 ± 0.040 | 1.120 | 0.636 | 0.798 | 50.0% |",
        "| best-of-16 | 0.857 ± 0.040 | 1.271 | 1.835 | 1.355 | 50.0% |",
        "| PPO | 0.800 ± 0.071 | 1.279 | 1.327 | 1.152 | 89.4% |",
        "| A2C | 0.633 ± 0.072 | 1.151 | 1.212 | 1.101 | n/a |",
    ]
    # best-of-64 was not measured, so it has no row.
    policies = [r["policy"] for r in table_rows(make_results())]
    assert policies == ["SFT", "best-of-4", "best-of-16", "PPO", "A2C"]


def test_report_sections_links_and_numbers():
    report = render_report(make_results())
    lines = report.splitlines()
    assert lines[0] == "# jaxrlhf demo: random_walk"
    for line in comparison_table(make_results()):
        assert line in lines
    assert ("PPO beats SFT on gold reward with non-overlapping 95% intervals: **yes** "
            "(PPO 0.800 ± 0.071 vs SFT 0.306 ± 0.049).") in lines
    assert "Rule: over-optimised when gold falls while proxy rises." in lines
    assert "- **best-of-n**: yes: gold fell from 0.9 to 0.7." in lines
    assert "![gold reward against √KL](plots/gold_vs_sqrt_kl.png)" in lines
    assert "![proxy reward against √KL](plots/proxy_vs_sqrt_kl.png)" in lines
    assert "- held-out pairwise accuracy on annotator labels: 0.882 (85 held-out records)" in lines
    assert ("- agreement with the oracle on fresh SFT samples: 0.865 (384 pairs the oracle does not "
            "tie)") in lines
    assert ("- coverage (train): 11 distinct prompts, 743 distinct responses, 879 distinct (prompt, "
            "response) pairs, 769 comparisons (700 distinct)") in lines
    assert ("- held-out next-token loss 0.531, token accuracy 0.812 on the behaviour policy's "
            "demonstrations") in lines
    assert "| 12 | 1.134 | 0.679 ± 0.040 | 1.180 | 50.0% |" in lines  # the PPO curve
    assert "| rl | 1m18s |" in lines and "| total | 3m14s |" in lines
    assert "- final policy, PPO (Hugging Face format): `ppo/export`" in lines
    assert ("jaxrlhf sft --config /runs/demo-1/configs/sft.yaml --set logging.run_dir=/runs/demo-1-again/sft"
            in lines)
    assert "(--quick)" in render_report({**make_results(), "quick": True}).splitlines()[0]


def test_summary_names_the_run_directory_and_fits_a_screen():
    summary = render_summary(make_results())
    lines = summary.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 120
    assert lines[0] == "jaxrlhf demo finished in 3m14s: random_walk"
    assert "run directory: /runs/demo-1" in lines
    assert "over-optimised? best-of-n: yes" in lines
    assert any(line.startswith("PPO ") and "0.800 ± 0.071" in line for line in lines)


def test_plots_are_valid_pngs(tmp_path):
    import matplotlib.image

    curves = {
        "PPO": [CurvePoint(0, 0.0, 0.3, 0.05, 0.2), CurvePoint(10, 1.0, 0.8, 0.07, 1.2, math.nan)],
        "best-of-n": [CurvePoint(n, math.log(n) - (n - 1) / n, 0.3 + 0.1 * i, 0.04, 0.2 * i)
                      for i, n in enumerate((1, 2, 4))],
        "A2C": [],
    }
    for metric in ("gold", "proxy"):
        path = plot_reward_vs_sqrt_kl(curves, metric, tmp_path / "plots" / f"{metric}.png", optimum=1.0)
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

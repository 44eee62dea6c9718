"""``jaxrlhf ilql`` end to end on a tiny model from scratch (char tokenizer): it trains and exports the
backbone with its heads, a resumed run continues exactly, and bad data are one-line errors naming the line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf.train.checkpoint import CheckpointManager
from jaxrlhf.train.ilql import load_ilql_heads
from jaxrlhf.train.metrics import read_metrics_jsonl

LETTERS = "abcdefg"
SHAPES = {"batch_size": 8, "max_prompt_length": 6, "max_response_length": 6,
          "prompt_buckets": [6], "response_buckets": [6]}
QUIET = {"log_every": 1, "mfu_matmul_size": 0, "tensorboard": False, "progress_bar": False}
STEPS = 4
METRICS = ("loss/ilql", "loss/q", "loss/v", "loss/cql", "q/mean", "v/mean", "td/error")


def rated_rows(seed: int, n: int) -> list[dict]:
    """Random prompts and responses; the reward counts the response's a's."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 5)))
    rows = [{"prompt": word(), "response": word()} for _ in range(n)]
    return [{**r, "reward": float(r["response"].count("a"))} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilql")
    write_jsonl(root / "train.jsonl", rated_rows(0, 40))
    return root


def ilql_config(workdir: Path, run_dir: str) -> dict:
    return {
        "model": {"architecture": {"family": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                   "max_position_embeddings": 16},
                  "tokenizer": f"char:{LETTERS}"},
        "data": {"train_file": str(workdir / "train.jsonl"), "eval_fraction": 0.2, **SHAPES},
        "optimizer": {"learning_rate": 3e-3, "schedule": "constant"},
        "ilql": {"gamma": 1.0},
        "train": {"steps": STEPS, "seed": 0, "eval_every": 0},
        "checkpoint": {"every": 2, "keep": 3},
        "logging": {"run_dir": str(workdir / run_dir), **QUIET},
    }


def run_ilql(config: dict, directory: Path, *overrides: str) -> int:
    path = directory / f"ilql-{len(list(directory.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli.main(["ilql", "--config", str(path), *[a for o in overrides for a in ("--set", o)]])


def step_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if "loss/ilql" in r}


@pytest.fixture(scope="module")
def trained(workdir):
    assert run_ilql(ilql_config(workdir, "full"), workdir) == 0
    return workdir / "full"


def test_ilql_trains_evaluates_and_exports_its_heads(trained):
    records = step_records(trained)
    assert sorted(records) == list(range(1, STEPS + 1))
    for name in METRICS:
        assert all(np.isfinite(r[name]) for r in records.values()), name
    final = read_metrics_jsonl(trained / "metrics.jsonl")
    assert any("eval/loss/ilql" in r and np.isfinite(r["eval/loss/ilql"]) for r in final)
    q, v, target = load_ilql_heads(trained / "export")
    with pytest.raises(ValueError, match=r"nowhere: no such directory"):  # not "no ILQL heads"
        load_ilql_heads(trained / "nowhere")
    assert len(q) == len(target) == 2
    kernel = q[0]["proj"]["kernel"]
    assert kernel.shape[0] == 32 and q[0]["proj"]["bias"].shape == kernel.shape[1:]
    assert v["proj"]["kernel"].shape == (32, 1)


def test_a_resumed_run_continues_exactly(workdir, trained):
    config = ilql_config(workdir, "resumed")
    assert run_ilql(config, workdir, "train.stop_at_step=2") == 0
    assert CheckpointManager(workdir / "resumed" / "checkpoints").all_steps() == [2]
    assert not (workdir / "resumed" / "export").exists()
    assert run_ilql(config, workdir) == 0
    got, want = step_records(workdir / "resumed"), step_records(trained)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for name in METRICS:
            np.testing.assert_allclose(got[step][name], want[step][name], rtol=1e-5, err_msg=f"{step} {name}")
    a, b = load_ilql_heads(workdir / "resumed" / "export"), load_ilql_heads(trained / "export")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "ab", "response": "cd"}, "missing field 'rating' (or 'reward')"),
    ({"prompt": "ab", "response": "cd", "reward": "high"}, "'reward' must be a finite number"),
    ({"prompt": "ab", "response": "cd", "reward": 1.0, "rating": 2.0}, "both 'rating' and 'reward'"),
    ({"prompt": "ab", "response": "cd", "reward": float("inf")}, "'reward' must be a finite number"),
])
def test_bad_data_is_a_one_line_error_naming_the_line(workdir, capsys, line, message):
    rows = rated_rows(3, 12)
    rows[4] = line
    path = write_jsonl(workdir / "bad.jsonl", rows)
    config = ilql_config(workdir, "bad")
    config["data"].update(train_file=path, eval_fraction=0.0)
    assert run_ilql(config, workdir) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{path}:5" in err and message in err, err
    assert not (workdir / "bad").exists()

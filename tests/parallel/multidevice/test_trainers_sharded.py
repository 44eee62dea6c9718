"""The trainers run unchanged on a (data=2, fsdp=4) mesh of 8 devices: same SFT parameters as one device,
and an FSDP PPO run that checkpoints, logs its per-device bytes and exports a loadable model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxrlhf import cli
from jaxrlhf.models import hf_io
from jaxrlhf.train.checkpoint import CheckpointManager

ALPHABET = "abcdef"
SHAPES = {
    "batch_size": 8,
    "max_prompt_length": 8,
    "max_response_length": 8,
    "prompt_buckets": [8],
    "response_buckets": [8],
}
QUIET = {"log_every": 1, "mfu_matmul_size": 64, "tensorboard": False, "progress_bar": False}
FSDP = ("parallel.data=2", "parallel.fsdp=4", "parallel.fsdp_min_size=256")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    rng = random.Random(0)
    words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 6))) for _ in range(16)]
    (root / "sft.jsonl").write_text(
        "".join(json.dumps({"prompt": w, "completion": w[::-1]}) + "\n" for w in words)
    )
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return root


def run(command, config, workdir, *overrides):
    path = workdir / f"{command}-{len(list(workdir.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli.main([command, "--config", str(path), *[a for o in overrides for a in ("--set", o)]])


def sft_config(workdir, run_dir):
    return {
        "model": {
            "architecture": {
                "family": "gpt2",
                "hidden_size": 32,
                "num_layers": 1,
                "num_heads": 4,
                "max_position_embeddings": 32,
            },
            "tokenizer": f"char:{ALPHABET}",
        },
        "data": {"train_file": str(workdir / "sft.jsonl"), **SHAPES},
        "optimizer": {"learning_rate": 3e-3},
        "train": {"steps": 3, "seed": 1},
        "logging": {"run_dir": str(workdir / run_dir), **QUIET},
    }


def test_sft_on_an_fsdp_mesh_matches_one_device(workdir, capfd):
    assert run("sft", sft_config(workdir, "sft-one"), workdir, "parallel.data=1") == 0
    assert run("sft", sft_config(workdir, "sft-fsdp"), workdir, *FSDP) == 0
    log = capfd.readouterr().err
    assert "device mesh {'data': 2, 'fsdp': 4} over 8 device(s)" in log
    assert "MiB per device" in log
    assert "recompiled" not in log  # the state keeps its FSDP layout from step to step
    assert "do not split over" not in log  # 8 rows per micro-batch on 8 devices
    one = load_file(str(workdir / "sft-one" / "export" / "model.safetensors"))
    many = load_file(str(workdir / "sft-fsdp" / "export" / "model.safetensors"))
    for name, value in one.items():
        np.testing.assert_allclose(many[name], value, atol=1e-5, err_msg=name)


def test_ppo_on_an_fsdp_mesh_checkpoints_and_exports(workdir):
    config = {
        "model": {"path": str(workdir / "sft-fsdp" / "export")},
        "data": {"train_file": str(workdir / "prompts.jsonl"), **SHAPES},
        "optimizer": {"learning_rate": 1e-3},
        "ppo": {"epochs": 2, "num_minibatches": 2},
        "generation": {"max_new_tokens": 6},
        "reward": {"function": "token_count:9"},
        "train": {"steps": 2},
        "checkpoint": {"every": 1, "keep": 2},
        "logging": {"run_dir": str(workdir / "ppo-fsdp"), **QUIET},
    }
    assert run("ppo", config, workdir, *FSDP) == 0
    with CheckpointManager(workdir / "ppo-fsdp" / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 2
    _, params, tokenizer = hf_io.load(workdir / "ppo-fsdp" / "export")
    assert tokenizer is not None and np.isfinite(params["embed"]).all()
    # 8 sequences in 2 minibatches: 4 rows per pass on 8 devices, each computed on every device.
    assert ("ppo.grad_accum_steps: micro-batches of 4 rows do not split over the 8 devices"
            in (workdir / "ppo-fsdp" / "run.log").read_text())
    records = [json.loads(line) for line in (workdir / "ppo-fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "objective/kl" in records[-1]

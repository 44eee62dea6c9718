"""Multi-host for real: 2 processes × 4 simulated CPU devices on this machine (``jaxrlhf.launch``; a
coordinator on 127.0.0.1, collectives through gloo), each case a subprocess launch.

- the data loader splits every global batch between processes without overlap;
- an RL run on 2 × 4 devices ends with the parameters of the same run on 1 × 1 device, and no program it
  compiled runs a loop holding collectives unordered beside another collective (gloo would hang);
- only process 0 writes logs and the export, while every process writes its part of each checkpoint;
- a 2-process checkpoint resumes in 1 process, whose checkpoint resumes in 2, ending where an uninterrupted
  run ends.

The trainers are driven only through their command line and public config keys. Adding a trainer (e.g. the
critic-free GRPO beside PPO) is one entry in :data:`ALGORITHMS`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxrlhf.collective_order import unordered_collectives
from jaxrlhf.data import BatchIterator, make_char_tokenizer
from jaxrlhf.launch import LaunchError, jaxrlhf_command, launch
from jaxrlhf.models import hf_io
from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.transformer import LanguageModel

HERE = Path(__file__).parent
ALPHABET = "abcdef"
# Seconds per launch: generous for a loaded 2-core machine, never a hang (JAXRLHF_MULTIHOST_TIMEOUT: more).
TIMEOUT = int(os.environ.get("JAXRLHF_MULTIHOST_TIMEOUT", 600))
PROCESSES, LOCAL_DEVICES = 2, 4
TOLERANCE = 1e-5

# The command and config section of each RL trainer under test: {name: (command, overrides of the base)}.
ALGORITHMS = {
    "ppo": ("ppo", {"ppo": {"epochs": 2, "num_minibatches": 2}}),
    "grpo": ("grpo", {"grpo": {"group_size": 2, "epochs": 1, "num_minibatches": 2}}),  # 16 sequences
}
STEPS = 3
pytestmark = pytest.mark.slow  # every case launches processes that compile a whole run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny saved policy (GPT-2 shape, d=32, 1 layer, char tokenizer) and a prompt file."""
    root = tmp_path_factory.mktemp("multihost")
    tokenizer = make_char_tokenizer(ALPHABET)
    config = gpt2_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LanguageModel(config)
    hf_io.save(root / "policy", model, model.init(jax.random.key(0)), tokenizer=tokenizer)
    rng = random.Random(0)
    words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 6))) for _ in range(16)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return root


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def algorithm(request):
    return request.param


def rl_config(workdir: Path, algorithm: str) -> dict:
    _, section = ALGORITHMS[algorithm]
    return {
        "model": {"path": str(workdir / "policy")},
        "data": {
            "train_file": str(workdir / "prompts.jsonl"),
            "batch_size": 8,
            "max_prompt_length": 8,
            "max_response_length": 8,
            "prompt_buckets": [8],
            "response_buckets": [8],
        },
        "optimizer": {"learning_rate": 1e-3},
        "generation": {"max_new_tokens": 6},
        "reward": {"function": "token_count:9"},  # jittable
        "train": {"steps": STEPS, "seed": 0},
        "checkpoint": {"every": 1, "keep": STEPS},
        "logging": {"log_every": 1, "mfu_matmul_size": 0, "tensorboard": False, "progress_bar": False},
        **section,
    }


def run_rl(workdir: Path, algorithm: str, name: str, processes: int, devices: int, *overrides: str,
           env: dict[str, str] | None = None):
    """``jaxrlhf <command>`` as ``processes`` processes × ``devices`` devices; ``{process_id}`` in an
    override is each process's id; ``env`` adds environment variables. Fails with the launcher's message
    (process, last lines) on any error."""
    command, _ = ALGORITHMS[algorithm]
    path = workdir / f"{algorithm}-{name}.yaml"
    path.write_text(yaml.safe_dump(rl_config(workdir, algorithm)))
    argv = [command, "--config", str(path), *(a for o in overrides for a in ("--set", o))]
    try:
        return launch(
            jaxrlhf_command(argv),
            processes,
            local_devices=devices,
            timeout=TIMEOUT,
            log_dir=workdir / "logs" / f"{algorithm}-{name}",
            env=None if env is None else {**os.environ, **env},
        )
    except LaunchError as e:
        pytest.fail(f"{algorithm} {name}: {e}", pytrace=False)


def exported(run_dir: Path) -> dict[str, np.ndarray]:
    """Every exported tensor of an RL run (policy LM and its value head), by file and name."""
    out = {}
    for file in sorted((run_dir / "export").glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    assert out, f"no export in {run_dir}"
    return out


def assert_same_params(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    worst = max(float(np.max(np.abs(actual[k] - expected[k]))) for k in expected)
    assert worst <= TOLERANCE, f"{what}: parameters differ by up to {worst:.3g} (> {TOLERANCE})"


def test_data_is_split_by_process_without_overlap(tmp_path):
    num_examples, batch_size, seed, num_batches = 24, 8, 3, 4  # batch 4 crosses an epoch
    script = [
        sys.executable,
        str(HERE / "multihost_data.py"),
        *map(str, (num_examples, batch_size, seed, num_batches)),
    ]
    results = launch(script, PROCESSES, local_devices=LOCAL_DEVICES, timeout=120, log_dir=tmp_path)
    records = [
        json.loads(line[5:]) for r in results for line in r.output.splitlines() if line.startswith("ROWS ")
    ]
    assert [r["process"] for r in records] == [0, 1]
    assert all(r["processes"] == PROCESSES and r["devices"] == PROCESSES * LOCAL_DEVICES for r in records)
    one = BatchIterator(list(range(num_examples)), batch_size, seed=seed, process_index=0, process_count=1)
    for b in range(num_batches):
        expected = next(one)
        shares = [r["local"][b] for r in records]
        assert all(len(s) == batch_size // PROCESSES for s in shares)
        assert not set(shares[0]) & set(shares[1]), f"batch {b}: processes share rows {shares}"
        assert shares[0] + shares[1] == expected  # process p holds the p-th slice of the global batch
        for r in records:  # the mesh assembles the 1-process batch, in its order, on every process
            assert r["global"][b] == expected
            assert r["process_rows"][b] == [r["local"][b]] * 2  # and gives each process its rows back
    assert [r["local_to_host"] for r in records] == [[0, 1, 2], [1, 2, 3]]


@pytest.fixture(scope="module")
def one_device(workdir, algorithm):
    """The reference: an uninterrupted run in 1 process on 1 device."""
    run_rl(workdir, algorithm, "one", 1, 1, f"logging.run_dir={workdir / algorithm / 'one'}")
    return exported(workdir / algorithm / "one")


@pytest.fixture(scope="module")
def two_processes(workdir, algorithm):
    """2 processes × 4 devices on a (data=2, fsdp=4) mesh; each process gets its own run directory (so we
    see who writes what) and all share one checkpoint directory. TensorBoard on, samples logged."""
    root = workdir / algorithm / "two"
    # Each process dumps the programs it compiled (optimised HLO, as text) to its own directory; compiled
    # afresh (the persistent cache, whose key leaves out the dump flags, would skip compiling and dumping).
    dump = f"--xla_dump_to={root}/hlo-{{process_id}} --xla_dump_hlo_as_text"
    results = run_rl(
        workdir,
        algorithm,
        "two",
        PROCESSES,
        LOCAL_DEVICES,
        f"logging.run_dir={root}/run-{{process_id}}",
        f"checkpoint.dir={root}/checkpoints",
        "parallel.data=2",
        "parallel.fsdp=4",
        "parallel.fsdp_min_size=256",
        "logging.tensorboard=true",
        "logging.sample_every=1",
        env={"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {dump}".strip(),
             "JAX_ENABLE_COMPILATION_CACHE": "false"},
    )
    return root, results


def test_two_processes_match_one_process(one_device, two_processes):
    root, results = two_processes
    assert "over 8 device(s) in 2 process(es)" in results[0].output
    assert_same_params(exported(root / "run-0"), one_device, "2 processes × 4 devices vs 1 × 1")


def test_no_loop_holding_collectives_runs_unordered(two_processes):
    """Every program the 2-process run compiled, on each process: its loops are fenced
    (jaxrlhf.collective_order), so none that holds collectives runs unordered beside another collective."""
    root, _ = two_processes
    for p in range(PROCESSES):
        modules = sorted((root / f"hlo-{p}").glob("*after_optimizations.txt"))
        assert any("experience" in m.name for m in modules), (p, [m.name for m in modules])
        hazards = {m.name: found for m in modules if (found := unordered_collectives(m.read_text()))}
        assert not hazards, f"process {p}: collectives unordered against loops: {hazards}"


def test_only_process_zero_writes_logs_and_exports(two_processes):
    root, _ = two_processes
    main = root / "run-0"
    for name in ("metrics.jsonl", "run.log", "config.yaml", "text.jsonl", "export/model.safetensors"):
        assert (main / name).is_file(), name
    assert list(main.glob("events.out.tfevents.*")), "no TensorBoard events from process 0"
    records = [json.loads(line) for line in (main / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert not (root / "run-1").exists(), sorted(p.name for p in (root / "run-1").rglob("*"))


def test_checkpoints_are_written_by_every_process(two_processes):
    root, _ = two_processes
    steps = sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == list(range(1, STEPS + 1))
    for step in steps:
        state = root / "checkpoints" / str(step) / "state"
        assert (root / "checkpoints" / str(step) / "commit_success.txt").is_file()
        for p in range(PROCESSES):  # each process wrote its shards and their metadata
            assert (state / f"ocdbt.process_{p}").is_dir(), f"step {step}: nothing from process {p}"
            assert (state / "array_metadatas" / f"process_{p}").is_file()


# One algorithm is enough to test resuming across process counts (the checkpoint path is shared by all); the
# others' programs are covered by the equality runs and the collective-order check above.
@pytest.mark.parametrize("algorithm", ["ppo"], indirect=True)
def test_checkpoints_resume_across_process_counts(workdir, algorithm, one_device, two_processes):
    """2 processes (step 1) → 1 process (step 2) → 2 processes (the last step) = the uninterrupted run."""
    two_root, _ = two_processes
    root = workdir / algorithm / "resumed"
    shutil.copytree(two_root / "checkpoints" / "1", root / "checkpoints" / "1")  # the 2-process step 1
    common = (f"checkpoint.dir={root}/checkpoints", "parallel.fsdp_min_size=256")
    run_rl(
        workdir, algorithm, "resume-1", 1, 1, f"logging.run_dir={root}/one", "train.stop_at_step=2", *common
    )
    assert "resuming from step 1" in (root / "one" / "run.log").read_text()
    assert (root / "checkpoints" / "2" / "commit_success.txt").is_file()
    run_rl(
        workdir,
        algorithm,
        "resume-2",
        PROCESSES,
        LOCAL_DEVICES,
        f"logging.run_dir={root}/two-{{process_id}}",
        "parallel.data=2",
        "parallel.fsdp=4",
        *common,
    )
    log = (root / "two-0" / "run.log").read_text()
    assert "resuming from step 2" in log
    assert_same_params(exported(root / "two-0"), one_device, "resumed 2 → 1 → 2 processes vs uninterrupted")

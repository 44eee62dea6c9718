"""End-to-end trainer runs through ``cli.main``: sft → reward → ppo / a2c on tiny data, resume, non-finite.

One chain of module-scoped runs shares the compiled steps: a tiny GPT-2 trained from scratch by ``sft`` (char
tokenizer), whose export is the backbone of the ``reward`` run and the policy of the RL runs. Every run uses
one prompt and one response bucket, so each step compiles once per process (and the persistent compilation
cache serves the repeated runs).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxrlhf import cli
from jaxrlhf.models import hf_io
from jaxrlhf.oracle import register_reward
from jaxrlhf.train.checkpoint import CheckpointManager, first_nonfinite_leaf
from jaxrlhf.train.metrics import read_metrics_jsonl

ALPHABET = "abcdef"
SHAPES = {
    "batch_size": 4,
    "max_prompt_length": 8,
    "max_response_length": 8,
    "prompt_buckets": [8],
    "response_buckets": [8],
}
QUIET = {"log_every": 1, "mfu_matmul_size": 64, "tensorboard": False, "progress_bar": False}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_command(command: str, config: dict, directory: Path, *overrides: str) -> int:
    path = directory / f"{command}-{len(list(directory.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli.main([command, "--config", str(path), *[a for o in overrides for a in ("--set", o)]])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny datasets: reverse the prompt (sft), reversed ≻ copied (preferences), prompts (RL)."""
    root = tmp_path_factory.mktemp("trainers")
    rng = random.Random(0)
    words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 6))) for _ in range(16)]
    write_jsonl(root / "sft.jsonl", [{"prompt": w, "completion": w[::-1]} for w in words])
    write_jsonl(root / "prefs.jsonl", [{"prompt": w, "chosen": w[::-1], "rejected": w + "a"} for w in words])
    write_jsonl(root / "prompts.jsonl", [{"prompt": w} for w in words])
    return root


def sft_config(workdir: Path, run_dir: str) -> dict:
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
        "data": {"train_file": str(workdir / "sft.jsonl"), "eval_file": str(workdir / "sft.jsonl"), **SHAPES},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 1},
        "train": {"steps": 4, "seed": 1},
        "checkpoint": {"every": 2, "keep": 2},
        "logging": {"run_dir": str(workdir / run_dir), **QUIET, "tensorboard": True, "log_every": 2},
    }


@pytest.fixture(scope="module")
def sft_run(workdir):
    assert run_command("sft", sft_config(workdir, "sft"), workdir) == 0
    return workdir / "sft"


def reward_config(workdir: Path, policy: Path) -> dict:
    return {
        "model": {"path": str(policy / "export")},
        "data": {
            "train_file": str(workdir / "prefs.jsonl"),
            "eval_file": str(workdir / "prefs.jsonl"),
            **SHAPES,
        },
        "optimizer": {"learning_rate": 3e-3},
        "train": {"steps": 4},
        "checkpoint": {"every": 2},
        "logging": {"run_dir": str(workdir / "reward"), **QUIET},
    }


@pytest.fixture(scope="module")
def reward_run(workdir, sft_run):
    assert run_command("reward", reward_config(workdir, sft_run), workdir) == 0
    return workdir / "reward"


def ppo_config(workdir: Path, policy: Path, reward: Path, run_dir: str) -> dict:
    return {
        "model": {"path": str(policy / "export")},
        "data": {"train_file": str(workdir / "prompts.jsonl"), **SHAPES},
        "optimizer": {"learning_rate": 1e-3},
        "ppo": {"epochs": 2, "num_minibatches": 2, "adaptive_kl": True, "kl_coef": 0.2, "kl_horizon": 100},
        "generation": {"max_new_tokens": 8},
        "reward": {"model_path": str(reward / "export")},
        "train": {"steps": 3, "seed": 3},
        "checkpoint": {"every": 1, "keep": 5},
        "logging": {"run_dir": str(workdir / run_dir), **QUIET, "sample_every": 1},
    }


@pytest.fixture(scope="module")
def ppo_run(workdir, sft_run, reward_run):
    assert run_command("ppo", ppo_config(workdir, sft_run, reward_run, "ppo"), workdir) == 0
    return workdir / "ppo"


def last_record_with(run_dir: Path, name: str) -> dict:
    return [r for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if name in r][-1]


def assert_export_loads_in_transformers(export: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    model, params, _ = hf_io.load(export)
    tokens = np.array([[8, 9, 10, 11, 2]], np.int32)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    mask = np.ones_like(tokens)
    got, _, _ = model.apply(params, tokens, np.arange(5, dtype=np.int32)[None], mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def assert_scores_in_transformers(export: Path, head: str) -> None:
    """The export loads with AutoModelForSequenceClassification (num_labels 1) and scores as jaxrlhf's
    ``head`` does at the last token (HF's score layer has no bias: jaxrlhf's minus the head's bias)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxrlhf.rollout.scoring import sequence_scores

    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert hf_model.config.num_labels == 1
    model, params, _ = hf_io.load(export)
    heads = hf_io.load_heads(export)
    tokens = np.array([[8, 9, 10, 11, 2], [9, 9, 8, 2, 10]], np.int32)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits[:, 0].numpy()
    got = np.asarray(sequence_scores(model, params, heads[head], tokens, np.ones_like(tokens)))
    np.testing.assert_allclose(got - float(heads[head]["proj"]["bias"][0]), want, atol=1e-5)


def test_sft_writes_metrics_checkpoints_and_a_transformers_export(sft_run):
    record = last_record_with(sft_run, "loss/sft")
    assert record["step"] == 4
    for name in (
        "loss/sft",
        "train/accuracy",
        "train/grad_norm",
        "lr",
        "timing/update",
        "timing/step_total",
        "perf/tokens_per_s",
        "perf/mfu",
        "train/nonfinite_skips",
    ):
        assert np.isfinite(record[name]), name
    evaluation = last_record_with(sft_run, "eval/loss")
    assert 0 < evaluation["eval/loss"] < np.log(len(ALPHABET) + 8) + 1
    assert CheckpointManager(sft_run / "checkpoints").all_steps() == [2, 4]
    assert list(sft_run.glob("events.out.tfevents.*"))
    assert (sft_run / "config.yaml").is_file()
    from jaxrlhf.config import load_config
    from jaxrlhf.train.sft import SFTRunConfig

    assert load_config(SFTRunConfig, sft_run / "config.yaml").train.steps == 4  # reloadable as a config
    assert_export_loads_in_transformers(sft_run / "export")


def test_reward_model_export_holds_head_and_unit_normalisation(reward_run):
    export = reward_run / "export"
    heads = hf_io.load_heads(export)
    assert heads["reward_head"]["proj"]["kernel"].shape == (32, 1)
    norm = json.loads((export / "reward_normalization.json").read_text())
    fit = last_record_with(reward_run, "val/reward_mean_raw")
    # gain·r + bias has mean 0 and std 1 on the fitted sample.
    assert norm["gain"] * fit["val/reward_mean_raw"] + norm["bias"] == pytest.approx(0.0, abs=1e-5)
    assert norm["gain"] * fit["val/reward_std_raw"] == pytest.approx(1.0, rel=1e-4)
    assert 0.0 <= last_record_with(reward_run, "eval/accuracy")["eval/accuracy"] <= 1.0
    assert "loss/reward" in last_record_with(reward_run, "loss/reward")
    assert_scores_in_transformers(export, "reward_head")


def test_ppo_logs_reference_metric_names_and_exports_policy_with_value_head(ppo_run):
    record = last_record_with(ppo_run, "objective/kl")
    assert record["episode"] == 3 * 4
    for name in (
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/kl_coef",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "policy/entropy_avg",
        "val/ratio",
        "val/ratio_var",
        "val/num_eos_tokens",
        "val/var_explained",
        "lr",
        "timing/generation",
        "timing/score",
        "timing/update",
        "timing/step_total",
        "perf/tokens_per_s",
        "perf/mfu",
    ):
        assert np.isfinite(record[name]), name
    first = read_metrics_jsonl(ppo_run / "metrics.jsonl")[0]
    assert first["val/ratio_abs_dev_first_minibatch"] < 1e-5  # sampling and training log-probs agree
    samples = [json.loads(line) for line in (ppo_run / "text.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and samples[0]["text"].startswith("prompt: ")
    assert "value_head" in hf_io.load_heads(ppo_run / "export")
    assert_export_loads_in_transformers(ppo_run / "export")


def a2c_config(workdir: Path, policy: Path, reward: Path, run_dir: str) -> dict:
    """A2C with a separate critic initialised from the reward model, and a programmatic reward."""
    config = ppo_config(workdir, policy, reward, run_dir)
    del config["ppo"]
    config["a2c"] = {"critic": "separate"}
    config["critic"] = {"path": str(reward / "export")}
    config["reward"] = {"function": "token_count:8"}  # share of 'a' tokens
    config["train"]["steps"] = 2
    return config


def test_a2c_with_reward_function_and_separate_critic(workdir, sft_run, reward_run):
    assert run_command("a2c", a2c_config(workdir, sft_run, reward_run, "a2c"), workdir) == 0
    run_dir = workdir / "a2c"
    record = last_record_with(run_dir, "objective/scores")
    assert 0.0 <= record["objective/scores"] + 1.0  # minus at most the missing-EOS penalty
    assert record["episode"] == 8
    critic_heads = hf_io.load_heads(run_dir / "export_critic")
    assert "value_head" in critic_heads
    assert not (run_dir / "export" / hf_io.HEADS_FILE).exists()  # the policy export is the LM only
    # The critic is a sequence classifier whose score is its value head, as a reward model's export is.
    config = json.loads((run_dir / "export_critic" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert_scores_in_transformers(run_dir / "export_critic", "value_head")


def grpo_config(workdir: Path, policy: Path, run_dir: str) -> dict:
    """DAPO-style GRPO on the share of 'a' tokens: clip-higher, token means, dynamic sampling, over-long
    penalty, two minibatches; 2 prompts × 4 samples per iteration."""
    return {
        "model": {"path": str(policy / "export")},
        "data": {"train_file": str(workdir / "prompts.jsonl"), **SHAPES, "batch_size": 2},
        "optimizer": {"learning_rate": 1e-3},
        "grpo": {"group_size": 4, "num_minibatches": 2, "clip_eps_high": 0.28, "loss_agg": "token_mean",
                 "dynamic_sampling": True, "overlong_buffer": 4, "kl_coef": 0.1},
        "generation": {"max_new_tokens": 8},
        "reward": {"function": "token_count:8"},  # share of 'a' tokens
        "train": {"steps": 3, "seed": 3},
        "checkpoint": {"every": 1, "keep": 5},
        "logging": {"run_dir": str(workdir / run_dir), **QUIET, "sample_every": 1},
    }


def test_grpo_logs_trl_metric_names_exports_the_bare_policy_and_resumes(workdir, sft_run):
    assert run_command("grpo", grpo_config(workdir, sft_run, "grpo"), workdir) == 0
    run_dir = workdir / "grpo"
    record = last_record_with(run_dir, "reward")
    assert record["episode"] == 3 * 2 * 4  # sequences: steps × prompts × group size
    for name in ("reward", "reward_std", "frac_reward_zero_std", "groups/dropped", "completions/mean_length",
                 "completions/clipped_ratio", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                 "clip_ratio/region_mean", "objective/kl", "objective/scores", "objective/kl_coef",
                 "loss/policy_avg", "loss/kl_avg", "policy/approxkl_avg", "val/ratio", "lr",
                 "timing/generation", "timing/score", "timing/update", "perf/tokens_per_s", "perf/mfu"):
        assert np.isfinite(record[name]), name
    assert 0 <= record["frac_reward_zero_std"] <= 1 and record["train/updates"] == 2
    first = read_metrics_jsonl(run_dir / "metrics.jsonl")[0]
    assert first["val/ratio_abs_dev_first_minibatch"] < 1e-5
    assert not (run_dir / "export" / hf_io.HEADS_FILE).exists()  # no value head, no critic
    assert not (run_dir / "export_critic").exists()
    assert_export_loads_in_transformers(run_dir / "export")
    # Stopped after step 1 and resumed: the uninterrupted run's parameters.
    config = grpo_config(workdir, sft_run, "grpo-resumed")
    assert run_command("grpo", config, workdir, "train.stop_at_step=1") == 0
    assert run_command("grpo", config, workdir) == 0
    want, got = _tensors(run_dir / "export"), _tensors(workdir / "grpo-resumed" / "export")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)


def test_rloo_remax_scores_greedy_baselines_and_trains_on_the_samples(workdir, sft_run):
    """ReMax through ``jaxrlhf rloo``: 4 prompts × 1 sample + 4 greedy responses per iteration; a host
    reward function (TRL's fn(prompt, completion) form) is called once per batch on all 8."""
    config = grpo_config(workdir, sft_run, "remax")
    del config["grpo"]
    config["rloo"] = {"group_size": 1, "advantage": "remax", "ratio": "none", "kl_coef": 0.05}
    config["data"]["batch_size"] = 4
    calls = []

    def count_b(prompt: str, response: str) -> float:
        calls.append(prompt)
        return float(response.count("b"))

    register_reward("test_count_b", count_b, overwrite=True)
    config["reward"] = {"function": "test_count_b"}
    config["train"]["steps"] = 2
    assert run_command("rloo", config, workdir) == 0
    assert len(calls) == 2 * 8  # every sample and every greedy response, each iteration
    record = last_record_with(workdir / "remax", "reward")
    assert record["episode"] == 2 * 4 and np.isfinite(record["remax/greedy_reward"])
    assert record["loss/kl_avg"] == 0.0 and record["val/ratio_abs_dev_first_minibatch"] < 1e-5


def _tensors(export: Path) -> dict[str, np.ndarray]:
    return load_file(str(export / hf_io.SINGLE_FILE))


def test_sft_resume_reaches_the_same_parameters(workdir, sft_run, capsys):
    config = sft_config(workdir, "sft-resumed")
    config["logging"]["tensorboard"] = False
    assert run_command("sft", config, workdir, "train.stop_at_step=2") == 0
    run_dir = workdir / "sft-resumed"
    assert not (run_dir / "export").exists()
    assert CheckpointManager(run_dir / "checkpoints").all_steps() == [2]
    assert run_command("sft", config, workdir) == 0
    want, got = _tensors(sft_run / "export"), _tensors(run_dir / "export")
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    steps = [r["step"] for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if "loss/sft" in r]
    assert steps == [2, 4]
    # A fresh start over existing checkpoints is refused rather than mixed with them.
    assert run_command("sft", config, workdir, "checkpoint.resume=false") == 1
    assert "checkpoint.resume: false, but" in capsys.readouterr().err
    assert CheckpointManager(run_dir / "checkpoints").all_steps() == [2, 4]


def test_a_failed_retry_leaves_the_run_directory_as_it_was(workdir, sft_run, capsys):
    """A retry with bad input fails before writing: the config.yaml that produced the checkpoints stays."""
    files = ("config.yaml", "metrics.jsonl", "run.log")
    before = {name: (sft_run / name).read_bytes() for name in files}
    bad = workdir / "bad.jsonl"
    bad.write_text('{"prompt": "ab", "completion": "ba"}\n{"prompt": "ab", "completion": \n')
    config = sft_config(workdir, "sft")
    config["data"]["train_file"] = str(bad)
    config["train"]["steps"] = 6  # a config that differs from the one on disk
    assert run_command("sft", config, workdir) == 1
    assert f"{bad}:2:" in capsys.readouterr().err.strip().splitlines()[-1]
    assert {name: (sft_run / name).read_bytes() for name in files} == before
    assert not (sft_run / "config.yaml.prev").exists()


def test_resume_after_a_crash_logs_each_step_once(workdir, sft_run):
    """Steps logged after the last checkpoint of a crashed run are logged again on resume, not twice."""
    import shutil

    config = sft_config(workdir, "sft-crashed")
    config["logging"].update(tensorboard=False, log_every=1)
    assert run_command("sft", config, workdir, "train.stop_at_step=3") == 0
    run_dir = workdir / "sft-crashed"
    # The crash: step 3 was logged, but its checkpoint never committed.
    shutil.rmtree(run_dir / "checkpoints" / "3")
    logged = [r["step"] for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if "loss/sft" in r]
    assert logged == [1, 2, 3]
    assert run_command("sft", config, workdir) == 0
    records = read_metrics_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss/sft" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval/loss" in r] == [4]
    # The resumed run reaches the uninterrupted run's parameters.
    want, got = _tensors(sft_run / "export"), _tensors(run_dir / "export")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_ppo_resume_reaches_the_same_parameters_and_kl_coefficient(workdir, sft_run, reward_run, ppo_run):
    config = ppo_config(workdir, sft_run, reward_run, "ppo-resumed")
    assert run_command("ppo", config, workdir, "train.stop_at_step=1") == 0
    assert run_command("ppo", config, workdir) == 0
    want, got = _tensors(ppo_run / "export"), _tensors(workdir / "ppo-resumed" / "export")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)
    kl = [
        last_record_with(d, "objective/kl_coef")["objective/kl_coef"]
        for d in (ppo_run, workdir / "ppo-resumed")
    ]
    assert kl[0] == kl[1] and kl[0] != 0.2  # the adaptive controller moved and was restored


def test_memory_options_give_the_same_run(workdir, sft_run, reward_run, ppo_run):
    """A host-offloaded reference and a micro-batched reward model move memory, not the result."""
    config = ppo_config(workdir, sft_run, reward_run, "ppo-memory")
    assert run_command("ppo", config, workdir, "reference.offload=true", "reward.micro_batch_size=2") == 0
    want, got = _tensors(ppo_run / "export"), _tensors(workdir / "ppo-memory" / "export")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.filterwarnings("ignore:overflow encountered in reduce:RuntimeWarning")  # the logged mean
def test_nonfinite_rewards_stop_the_run_and_keep_the_last_good_checkpoint(
    workdir, sft_run, reward_run, capsys
):
    calls = []

    def nan_after_two_batches(prompt_tokens, prompt_mask, response_tokens, response_mask):
        # A NaN score is refused where it is returned (naming the reward); the float32 maximum is a finite
        # score whose returns and whitening overflow, so the update is non-finite and skipped.
        calls.append(1)
        value = 1.0 if len(calls) <= 2 else np.finfo(np.float32).max
        return np.full(len(response_tokens), value, np.float32)

    register_reward("test_nan_after_two", nan_after_two_batches, overwrite=True)
    config = a2c_config(workdir, sft_run, reward_run, "a2c-nan")  # the same compiled steps as above
    config["reward"] = {"function": "test_nan_after_two"}
    config["train"] = {"steps": 8, "max_consecutive_nonfinite": 2}
    assert run_command("a2c", config, workdir) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("jaxrlhf a2c: error: 2 consecutive non-finite steps (last at step 4)")
    manager = CheckpointManager(workdir / "a2c-nan" / "checkpoints")
    assert manager.all_steps() == [1, 2, 3]  # step 4 raised before saving
    good, _ = manager.restore(2)
    skipped, metadata = manager.restore(3)
    assert first_nonfinite_leaf(skipped) is None and metadata["nonfinite_skips"] == 1
    # The skipped update left the state as it was (only the RNG moved on).
    for a, b in zip(jax.tree.leaves(good["rl"]), jax.tree.leaves(skipped["rl"])):
        np.testing.assert_array_equal(a, b)
    assert not (workdir / "a2c-nan" / "export").exists()


# ------------------------------------------------------------------ TRL-style reward functions

RECEIVED: list[dict] = []


def reversed_answer(prompts, completions, answer, completion_ids, **kwargs):
    """TRL's signature: the prompts, the decoded completions and the dataset's `answer` column."""
    state = kwargs.get("trainer_state")
    RECEIVED.append(dict(prompts=prompts, completions=completions, answer=answer, ids=completion_ids,
                         other=sorted(kwargs), state=(state.global_step, state.max_steps)))
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def test_trl_reward_functions_get_the_dataset_columns_and_sum_with_weights(workdir, sft_run, reward_run):
    """reward.functions: a TRL-style function reading each prompt's `answer` (carried through batching to
    the host call, once per batch) plus a built-in, weighted; each logged as rewards/<name>/mean."""
    rows = [json.loads(line) for line in (workdir / "prompts.jsonl").read_text().splitlines()]
    answers = [{"prompt": r["prompt"], "answer": r["prompt"][::-1], "level": i} for i, r in enumerate(rows)]
    write_jsonl(workdir / "prompts_answers.jsonl", answers)
    register_reward("test_reversed_answer", reversed_answer, overwrite=True)
    config = a2c_config(workdir, sft_run, reward_run, "a2c-trl")
    config["data"]["train_file"] = str(workdir / "prompts_answers.jsonl")
    config["reward"] = {"functions": [{"function": "test_reversed_answer", "name": "answer"},
                                      {"function": "token_count:8", "weight": 0.5}]}
    RECEIVED.clear()
    assert run_command("a2c", config, workdir) == 0
    assert len(RECEIVED) == 2  # once per batch (2 steps)
    for call in RECEIVED:
        assert len(call["prompts"]) == len(call["completions"]) == len(call["ids"]) == 4
        assert call["answer"] == [p[::-1] for p in call["prompts"]]  # each row's own column
        assert call["other"] == ["level", "trainer_state"]
        assert all(isinstance(c, str) for c in call["completions"])
    # TRL's trainer_state: optimiser updates done before each batch, and the run's (A2C: one per iteration)
    assert [call["state"] for call in RECEIVED] == [(0, 2), (1, 2)]
    records = read_metrics_jsonl(workdir / "a2c-trl" / "metrics.jsonl")
    last = [r for r in records if "rewards/answer/mean" in r][-1]
    hits = [s == a for s, a in zip(RECEIVED[-1]["completions"], RECEIVED[-1]["answer"])]
    assert last["rewards/answer/mean"] == pytest.approx(np.mean(hits))
    assert 0.0 <= last["rewards/token_count:8/mean"] <= 1.0 and "rewards/token_count:8/std" in last


# ------------------------------------------------------------------ never lose work


def test_held_out_evaluation_without_an_eval_file(workdir, sft_run):
    config = sft_config(workdir, "sft-held-out")
    del config["data"]["eval_file"]
    config["data"]["eval_fraction"] = 0.25
    config["train"]["steps"] = 1
    assert run_command("sft", config, workdir) == 0
    log_text = (workdir / "sft-held-out" / "run.log").read_text()
    assert "no data.eval_file: holding out 4 of the 16 examples of" in log_text
    assert np.isfinite(last_record_with(workdir / "sft-held-out", "eval/loss")["eval/loss"])


def test_a_checkpoint_that_cannot_be_written_stops_in_one_line(workdir, sft_run, disk_full_at, capfd):
    """The disk fills up at the third checkpoint: one line on stderr naming the directory and the cause,
    checkpoints 1 and 2 intact, nothing a rerun trips on; the rerun resumes and ends as an uninterrupted
    run does."""
    config = sft_config(workdir, "sft-disk-full")
    config["checkpoint"] = {"every": 1, "keep": 5}
    config["logging"].update(level="WARNING", tensorboard=False)
    capfd.readouterr()
    disk_full_at(3)
    assert run_command("sft", config, workdir) == 1
    err = capfd.readouterr().err
    checkpoints = workdir / "sft-disk-full" / "checkpoints"
    where = err.split("device: ")[1].split(" (")[0]  # orbax's temporary file of step 3
    assert err.splitlines() == [
        f"jaxrlhf sft: error: cannot write a checkpoint to {checkpoints}: [Errno 28] No space left on "
        f"device: {where} (the checkpoints there, steps [1, 2], are intact; a rerun resumes from the last "
        "one)"]
    assert sorted(os.listdir(checkpoints)) == ["1", "2"]
    assert not (workdir / "sft-disk-full" / "export").exists()
    disk_full_at(0)
    assert run_command("sft", config, workdir) == 0
    want, got = _tensors(sft_run / "export"), _tensors(workdir / "sft-disk-full" / "export")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_checkpoints_of_a_run_on_other_data_are_a_one_line_error(workdir, sft_run, capsys):
    """Reusing a finished run's config with another train file (the demo's reuse commands did) must not
    crash on the data iterator: it says the directory belongs to another run."""
    config = sft_config(workdir, "sft")
    config["data"]["train_file"] = str(workdir / "prefs_as_sft.jsonl")
    write_jsonl(workdir / "prefs_as_sft.jsonl", [{"prompt": "ab", "completion": "ba"}] * 5)
    assert run_command("sft", config, workdir) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"jaxrlhf sft: error: {sft_run / 'checkpoints'} holds checkpoints of a run on "
                           "other data (")
    assert line.endswith("choose a new logging.run_dir (or checkpoint.dir)")


def _jaxrlhf(*args: str, cwd: Path) -> subprocess.Popen:
    """The real console script, in a subprocess (the signal test needs a process of its own)."""
    script = Path(sys.executable).with_name("jaxrlhf")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "jaxrlhf.cli"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([*command, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _interrupt_when_logged(process: subprocess.Popen, metrics: Path, signum: int, after_step: int) -> tuple:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and any(r["step"] >= after_step for r in read_metrics_jsonl(metrics)):
            process.send_signal(signum)
            break
        time.sleep(0.05)
    _, err = process.communicate(timeout=240)
    return process.returncode, err


@pytest.mark.slow
def test_ctrl_c_and_kill_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(workdir, sft_run):
    """SIGINT, then (on the rerun) SIGTERM, to the `jaxrlhf sft` process (the console script): each time
    the current step ends, a checkpoint commits, the process exits 128 + signal with one line saying where
    to resume, no traceback and no temporary directory; the third invocation (in-process: it needs no
    signal) finishes with the parameters of an uninterrupted run."""
    steps = 100  # each step saves a checkpoint (~0.1 s): enough of them that the signals land mid-run
    config = sft_config(workdir, "sft-signals")
    config["train"]["steps"] = steps
    config["checkpoint"] = {"every": 1, "keep": 2}  # asynchronous saves in flight when the signal comes
    config["logging"].update(tensorboard=False, log_every=1, level="WARNING")
    path = workdir / "sft-signals.yaml"
    path.write_text(yaml.safe_dump(config))
    reference = sft_config(workdir, "sft-signals-reference")
    reference["train"]["steps"] = steps
    reference["logging"].update(tensorboard=False, log_every=100)
    assert run_command("sft", reference, workdir) == 0

    run_dir = workdir / "sft-signals"
    stops = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        started = time.monotonic()
        after = stops[-1][0] + 3 if stops else 3
        code, err = _interrupt_when_logged(_jaxrlhf("sft", "--config", str(path), cwd=workdir),
                                           run_dir / "metrics.jsonl", signum, after_step=after)
        lines = err.strip().splitlines()
        assert code == 128 + signum, err
        assert "Traceback" not in err
        name = signal.Signals(signum).name
        assert lines[-1].startswith(f"jaxrlhf sft: interrupted by {name} after step "), err
        assert lines[-1].endswith(f": checkpoint saved in {run_dir / 'checkpoints'}; run the same command "
                                  "again to resume")
        step = int(lines[-1].split(" after step ")[1].split()[0])
        names = sorted(os.listdir(run_dir / "checkpoints"))
        assert str(step) in names and all(n.isdigit() for n in names), names
        stops.append((step, time.monotonic() - started))
    assert stops[1][0] > stops[0][0]  # the second invocation resumed rather than restarted
    assert cli.main(["sft", "--config", str(path)]) == 0  # the same command, run to the end
    want, got = _tensors(workdir / "sft-signals-reference" / "export"), _tensors(run_dir / "export")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    logged = [r["step"] for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if "loss/sft" in r]
    assert logged == list(range(1, steps + 1))  # every step once, across the three invocations
    print("signal stops (step, seconds):", stops)


LORA = {"enabled": True, "rank": 2, "alpha": 4.0, "targets": ["q", "v", "up"]}


def lora_sft_config(workdir: Path, sft_run: Path, run_dir: str) -> dict:
    config = sft_config(workdir, run_dir)
    config["model"] = {"path": str(sft_run / "export")}
    config["logging"]["tensorboard"] = False
    return {**config, "lora": LORA}


@pytest.fixture(scope="module")
def lora_sft_run(workdir, sft_run):
    assert run_command("sft", lora_sft_config(workdir, sft_run, "sft_lora"), workdir) == 0
    return workdir / "sft_lora"


def test_lora_sft_and_ppo_train_adapters_and_export(workdir, sft_run, reward_run, lora_sft_run):
    """lora.enabled: SFT and PPO train adapters on the frozen base; checkpoints hold only the adapters;
    the export is the merged model (transformers loads it) and export_adapter/ is PEFT's format."""
    assert (lora_sft_run / "export_adapter" / "adapter_config.json").exists()
    assert_export_loads_in_transformers(lora_sft_run / "export")
    ppo = {**ppo_config(workdir, sft_run, reward_run, "ppo_lora"), "lora": LORA}
    assert run_command("ppo", ppo, workdir) == 0
    run_dir = workdir / "ppo_lora"
    assert (run_dir / "export_adapter" / "adapter_model.safetensors").exists()
    manager = CheckpointManager(run_dir / "checkpoints", max_to_keep=None, async_save=False)
    saved, _ = manager.restore(manager.latest_step())
    manager.close()
    lm = saved["rl"]["policy"]["params"]["lm"]
    assert set(lm) == {"layers"} and "kernel" not in lm["layers"]["attn"]["qkv"]  # adapters only
    assert saved["rl"]["policy"].get("frozen") is None


def test_exports_keep_the_sampling_defaults_and_adapters_name_their_base_absolutely(
        workdir, sft_run, monkeypatch):
    """A base with a generation_config.json (sampling defaults transformers' generate reads) given by a
    relative model.path: the export keeps the file, and export_adapter/ records the base's absolute path,
    so PEFT loads the adapter from any directory."""
    import shutil

    base = workdir / "gen_base"
    shutil.copytree(sft_run / "export", base)
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}
    (base / hf_io.GENERATION_CONFIG_FILE).write_text(json.dumps(sampling))
    monkeypatch.chdir(workdir)
    config = {**lora_sft_config(workdir, sft_run, "sft_gen"), "model": {"path": "gen_base"}}
    config["train"] = {"steps": 1, "seed": 1}
    config["data"] = {**config["data"], "eval_file": None}
    assert run_command("sft", config, workdir) == 0
    export = workdir / "sft_gen" / "export"
    assert json.loads((export / hf_io.GENERATION_CONFIG_FILE).read_text()) == sampling
    transformers = pytest.importorskip("transformers")
    loaded = transformers.GenerationConfig.from_pretrained(export)
    assert (loaded.do_sample, loaded.temperature, loaded.top_p) == (True, 0.6, 0.9)
    adapter = json.loads((workdir / "sft_gen" / "export_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())


def test_a_finished_run_reruns_to_its_export_and_another_model_names_the_saved_one(
        workdir, sft_run, capsys):
    """Rerunning a finished run trains nothing and says so (it once logged "steps 5–4"); pointing a run
    directory's checkpoints at another model fails with one line naming the model that wrote them."""
    import shutil

    for name in ("sft_rerun", "sft_swapped"):
        shutil.copytree(sft_run, workdir / name, ignore=shutil.ignore_patterns("events.out.tfevents.*"))
    log_file = workdir / "sft_rerun" / "run.log"
    before = len(log_file.read_text())
    assert run_command("sft", sft_config(workdir, "sft_rerun"), workdir) == 0
    logged = log_file.read_text()[before:]
    assert "sft: already trained to step 4; evaluating and exporting again" in logged
    assert "steps 5" not in logged and "resuming from step 4" in logged
    assert_export_loads_in_transformers(workdir / "sft_rerun" / "export")
    swapped = sft_config(workdir, "sft_swapped")
    swapped["model"]["architecture"]["hidden_size"] = 48
    capsys.readouterr()
    assert run_command("sft", swapped, workdir) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the log lines, then the one error line
    assert err.startswith("jaxrlhf sft: error: checkpoint step 4 in ") and "shape" in err
    assert "written for another model or setup (model.architecture in" in err
    assert "choose a new logging.run_dir" in err


def test_lora_sft_resumed_from_an_adapters_only_checkpoint_ends_as_the_uninterrupted_run(
        workdir, sft_run, lora_sft_run):
    """Stopped at step 2 (a checkpoint of the adapters and their optimiser state, no base) and resumed: the
    base is reloaded from model.path and the run ends with the uninterrupted run's adapters and merged
    export."""
    config = lora_sft_config(workdir, sft_run, "sft_lora-resumed")
    assert run_command("sft", config, workdir, "train.stop_at_step=2") == 0
    run_dir = workdir / "sft_lora-resumed"
    manager = CheckpointManager(run_dir / "checkpoints", max_to_keep=None, async_save=False)
    assert manager.all_steps() == [2]
    saved, _ = manager.restore(2)
    manager.close()
    assert set(saved["train"]["params"]) == {"layers"} and saved["train"].get("frozen") is None
    assert run_command("sft", config, workdir) == 0
    for sub, file in (("export", hf_io.SINGLE_FILE), ("export_adapter", "adapter_model.safetensors")):
        want, got = load_file(str(lora_sft_run / sub / file)), load_file(str(run_dir / sub / file))
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{sub}: {name}")
    steps = [r["step"] for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if "loss/sft" in r]
    assert steps == [2, 4]


def test_lora_reward_model_trains_adapters_and_head_and_exports_the_merged_model(workdir, sft_run):
    config = {**reward_config(workdir, sft_run), "lora": LORA}
    config["logging"] = {**config["logging"], "run_dir": str(workdir / "reward_lora")}
    assert run_command("reward", config, workdir) == 0
    run_dir = workdir / "reward_lora"
    manager = CheckpointManager(run_dir / "checkpoints", max_to_keep=None, async_save=False)
    saved, _ = manager.restore(manager.latest_step())
    manager.close()
    params = saved["train"]["params"]
    assert set(params["lm"]) == {"layers"} and "kernel" not in params["lm"]["layers"]["attn"]["qkv"]
    assert "proj" in params["reward_head"] and saved["train"].get("frozen") is None
    record = last_record_with(run_dir, "loss/reward")
    assert np.isfinite(record["loss/reward"]) and record["train/grad_norm"] > 0
    # The export is the merged backbone: it differs from the base where the adapters moved it.
    base, merged = _tensors(sft_run / "export"), _tensors(run_dir / "export")
    shared = base.keys() & merged.keys()  # the backbone's (the reward export has a score layer, no LM head)
    assert "transformer.h.0.attn.c_attn.weight" in shared
    assert max(float(np.abs(merged[k] - base[k]).max()) for k in shared) > 0
    assert_scores_in_transformers(run_dir / "export", "reward_head")

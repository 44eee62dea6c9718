"""``jaxrlhf dpo`` end to end on a tiny model trained from scratch (char tokenizer): it learns a separable
preference (held-out accuracy and implicit reward margin rise), the cached and the on-the-fly reference give
the same steps, a resumed run continues exactly, identical pairs are an error or a counted drop, and the
reference cache maps every pair to its own log-probs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf.data import LengthBuckets, PreferenceExample, preference_batch
from jaxrlhf.models import hf_io
from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.steps.dpo import DPO_METRICS, make_reference_logps
from jaxrlhf.train.checkpoint import CheckpointManager
from jaxrlhf.train.dpo_data import hold_out, precompute_reference_logps, with_reference_logps
from jaxrlhf.train.metrics import read_metrics_jsonl

LETTERS = "abcdefg"
MARK = "h"  # the chosen response contains it, the rejected one never does
SHAPES = {"batch_size": 8, "max_prompt_length": 8, "max_response_length": 8,
          "prompt_buckets": [8], "response_buckets": [8]}
QUIET = {"log_every": 1, "mfu_matmul_size": 0, "tensorboard": False, "progress_bar": False}
STEPS = 30


def word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def separable_pairs(seed: int, n: int) -> list[dict]:
    """Random prompts and responses; the chosen one has the mark inserted somewhere."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = word(rng, 1, 4)
        at = rng.randint(0, len(chosen))
        rows.append({"prompt": word(rng, 2, 5), "chosen": chosen[:at] + MARK + chosen[at:],
                     "rejected": word(rng, 2, 5)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    write_jsonl(root / "train.jsonl", separable_pairs(0, 64))
    write_jsonl(root / "eval.jsonl", separable_pairs(1, 32))  # fresh prompts and responses
    return root


def dpo_config(workdir: Path, run_dir: str, **dpo) -> dict:
    return {
        "model": {"architecture": {"family": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                   "max_position_embeddings": 16},
                  "tokenizer": f"char:{LETTERS}{MARK}"},
        "data": {"train_file": str(workdir / "train.jsonl"), "eval_file": str(workdir / "eval.jsonl"),
                 **SHAPES},
        "optimizer": {"learning_rate": 3e-3, "schedule": "constant"},
        "dpo": {"beta": 0.1, **dpo},
        "train": {"steps": STEPS, "seed": 0, "eval_every": 10},
        "checkpoint": {"every": 10, "keep": 3},
        "logging": {"run_dir": str(workdir / run_dir), **QUIET},
    }


def run_dpo(config: dict, directory: Path, *overrides: str) -> int:
    path = directory / f"dpo-{len(list(directory.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli.main(["dpo", "--config", str(path), *[a for o in overrides for a in ("--set", o)]])


def step_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if "loss/dpo" in r}


def eval_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics_jsonl(run_dir / "metrics.jsonl")
            if "eval/rewards/accuracies" in r}


@pytest.fixture(scope="module")
def learned(workdir):
    assert run_dpo(dpo_config(workdir, "learn"), workdir) == 0
    return workdir / "learn"


def test_dpo_learns_a_separable_preference_on_held_out_pairs(learned):
    """Policy = reference at step 0 (every implicit reward 0, margin 0); after training, pairs never seen
    are ranked by the implicit reward β·log π/π_ref with a clear margin."""
    evals = eval_records(learned)
    assert sorted(evals) == [10, 20, STEPS]
    first, last = evals[10], evals[STEPS]
    print({s: (round(e["eval/rewards/accuracies"], 3), round(e["eval/rewards/margins"], 3),
               round(e["eval/loss"], 4)) for s, e in evals.items()})
    assert last["eval/rewards/accuracies"] >= 0.9
    assert last["eval/rewards/margins"] >= 0.5
    assert last["eval/rewards/margins"] > first["eval/rewards/margins"] > 0.0
    assert last["eval/loss"] < 0.65 * np.log(2.0)  # log 2 at the reference
    assert last["eval/rewards/chosen"] > 0.0 > last["eval/rewards/rejected"]
    steps = step_records(learned)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps[1]["loss/dpo"] == pytest.approx(np.log(2.0), abs=1e-5)  # h = 0 before the first update
    for name in ("loss/dpo", *DPO_METRICS, "train/grad_norm", "lr", "timing/update", "timing/step_total",
                 "perf/tokens_per_s", "train/nonfinite_skips"):
        assert np.isfinite(steps[STEPS][name]), name
    assert "timing/reference" not in steps[STEPS]  # cached: no reference pass per step
    assert CheckpointManager(learned / "checkpoints").all_steps() == [10, 20, 30]
    assert_export_is_a_transformers_causal_lm(learned / "export")


def assert_export_is_a_transformers_causal_lm(export: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    model, params, _ = hf_io.load(export)
    tokens = np.array([[3, 4, 5, 6, 2]], np.int32)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got, _, _ = model.apply(params, tokens, np.arange(5, dtype=np.int32)[None], np.ones_like(tokens))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def assert_same_steps(got: dict[int, dict], want: dict[int, dict], steps, what: str) -> None:
    for s in steps:
        for name in ("loss/dpo", *DPO_METRICS, "train/grad_norm"):
            np.testing.assert_allclose(got[s][name], want[s][name], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{what}: step {s} {name}")


def test_on_the_fly_reference_gives_the_same_steps(workdir, learned):
    config = dpo_config(workdir, "on-the-fly", precompute_ref_logprobs=False)
    config["train"].update(steps=3, eval_every=1)
    config["data"]["eval_batch_size"] = 4  # eval's reference shapes are not the training reference's
    assert run_dpo(config, workdir) == 0
    got = step_records(workdir / "on-the-fly")
    assert_same_steps(got, step_records(learned), [1, 2, 3], "on the fly")
    assert got[3]["timing/reference"] > 0.0 and got[3]["perf/reference_tokens_per_s"] > 0.0
    assert "eval/rewards/accuracies" in eval_records(workdir / "on-the-fly")[3]
    assert "recompiled" not in (workdir / "on-the-fly" / "run.log").read_text()  # it was, at step 2


def test_resumed_run_recomputes_the_same_cache_and_continues_exactly(workdir, learned):
    config = dpo_config(workdir, "resumed")
    config["train"].update(steps=4, eval_every=0)
    config["data"]["eval_file"] = None
    assert run_dpo(config, workdir, "train.stop_at_step=2") == 0
    assert CheckpointManager(workdir / "resumed" / "checkpoints").all_steps() == [2]
    assert not (workdir / "resumed" / "export").exists()
    assert run_dpo(config, workdir) == 0
    got = step_records(workdir / "resumed")
    assert sorted(got) == [1, 2, 3, 4]
    assert_same_steps(got, step_records(learned), [1, 2, 3, 4], "resumed")


def test_identical_pairs_are_an_error_or_a_counted_drop(workdir, capsys):
    rows = separable_pairs(2, 14)
    rows[3]["rejected"] = rows[3]["chosen"]
    # differ only past max_response_length, so identical once cut (an identical pair in the implicit-prompt
    # form cannot even be split into prompt and responses: the data layer refuses it whatever the policy)
    rows[9] = {"prompt": "ab", "chosen": "abcdefga" + MARK, "rejected": "abcdefgab"}
    rows += [{"chosen": "ab c" + MARK, "rejected": "ab de"}, {"chosen": "fg a", "rejected": "fg b" + MARK}]
    path = write_jsonl(workdir / "with_ties.jsonl", rows)
    config = dpo_config(workdir, "ties")
    config["data"].update(train_file=path, eval_file=None)
    config["train"].update(steps=2, eval_every=0)
    assert run_dpo(config, workdir) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{path}:4: 'chosen' and 'rejected' are identical once tokenized" in err
    assert "2 of the 16 pairs" in err and "lines 4, 10" in err and "dpo.identical_pairs=drop" in err
    assert not (workdir / "ties").exists()  # nothing written before the inputs were valid

    assert run_dpo(config, workdir, "dpo.identical_pairs=drop", "dpo.eval_fraction=0.25") == 0
    log = (workdir / "ties" / "run.log").read_text()
    assert "dropped 2 of the 16 pairs" in log
    assert "eval: 4 pairs held out of" in log and "10 left to train" in log  # 16 − 2 dropped − 4
    assert np.isfinite(eval_records(workdir / "ties")[2]["eval/rewards/accuracies"])


def test_reward_model_training_refuses_identical_pairs_the_same_way(workdir, capsys):
    """The Bradley–Terry loss has a zero gradient on a pair of identical responses and its accuracy counts it
    as lost: `jaxrlhf reward` names it (or drops it with reward_model.identical_pairs=drop), as DPO does."""
    rows = separable_pairs(2, 14)
    rows[3]["rejected"] = rows[3]["chosen"]
    path = write_jsonl(workdir / "rm_ties.jsonl", rows)
    config = {k: v for k, v in dpo_config(workdir, "rm-ties").items() if k != "dpo"}
    config["data"].update(train_file=path, eval_file=None)
    config["train"].update(steps=1, eval_every=0)
    yaml_path = workdir / "rm-ties.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    assert cli.main(["reward", "--config", str(yaml_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{path}:4: 'chosen' and 'rejected' are identical once tokenized" in err
    assert "reward_model.identical_pairs=drop" in err and not (workdir / "rm-ties").exists()
    assert cli.main(["reward", "--config", str(yaml_path), "--set", "reward_model.identical_pairs=drop"]) == 0
    assert "dropped 1 of the" in (workdir / "rm-ties" / "run.log").read_text()


def test_rankings_with_a_repeated_response_are_refused_or_keep_its_first_place():
    """A ranking holding one response twice ties it with itself (zero gradient, a lost pair): an error
    naming file:line and the key, or with "drop" the repeat's lower places go and a ranking left with one
    response goes too."""
    from jaxrlhf.data import RankingExample
    from jaxrlhf.train.dpo_data import drop_repeated_responses

    a, b, c = (np.array(x, np.int32) for x in ([5, 6], [7], [5, 6, 8]))
    rankings = [RankingExample(np.array([3], np.int32), (a, b, c), "f.jsonl:1"),
                RankingExample(np.array([3], np.int32), (a, b, a.copy(), c), "f.jsonl:2"),
                RankingExample(np.array([4], np.int32), (b, b.copy()), "f.jsonl:3")]
    assert drop_repeated_responses(rankings[:1], "f.jsonl", "error") == rankings[:1]
    with pytest.raises(ValueError, match=r"^f\.jsonl:2: a response appears twice .* 2 of the 3 rankings in "
                                         r"f\.jsonl \(lines 2, 3\) .* reward_model\.identical_pairs=drop"):
        drop_repeated_responses(rankings, "f.jsonl", "error")
    kept = drop_repeated_responses(rankings, "f.jsonl", "drop")
    assert [e.source for e in kept] == ["f.jsonl:1", "f.jsonl:2"]
    assert [r.tolist() for r in kept[1].responses] == [[5, 6], [7], [5, 6, 8]]
    with pytest.raises(ValueError, match="no ranking has two different responses"):
        drop_repeated_responses(rankings[2:], "f.jsonl", "drop")


def test_bradley_terry_terms_are_refused_by_the_other_losses():
    from jaxrlhf.steps.reward_model import RewardModelConfig

    with pytest.raises(ValueError, match=r"RewardModelConfig\.center_coef: .* the ranking loss would ignore"):
        RewardModelConfig(loss="ranking", center_coef=0.01)
    with pytest.raises(ValueError, match=r"RewardModelConfig\.margin: .* the rating loss would ignore"):
        RewardModelConfig(loss="rating", margin=1.0)
    assert RewardModelConfig(loss="pairwise", margin=1.0, center_coef=0.01).margin == 1.0


def test_hold_out_is_a_deterministic_disjoint_split():
    items = list(range(20))
    train, held = hold_out(items, 0.25, seed=3, path="f")
    assert len(held) == 5 and sorted(train + held) == items and train == sorted(train)
    assert hold_out(items, 0.25, seed=3, path="f") == (train, held)
    assert hold_out(items, 0.25, seed=4, path="f")[1] != held
    with pytest.raises(ValueError, match="leaving none to train on"):
        hold_out(items[:1], 0.5, seed=0, path="f")


def test_reference_cache_maps_each_pair_to_its_own_logprobs():
    """A pass in batches of 3 over 7 pairs (the last batch padded) gives each pair the log-probs of the
    reference on that pair alone, and the collate batches them with the pairs."""
    model = LanguageModel(gpt2_config(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2,
                                      max_position_embeddings=32))
    params = model.init(jax.random.key(0))
    rng = np.random.RandomState(0)
    pairs = [PreferenceExample(rng.randint(3, 16, rng.randint(1, 5)).astype(np.int32),
                               rng.randint(3, 16, rng.randint(1, 7)).astype(np.int32),
                               rng.randint(3, 16, rng.randint(1, 7)).astype(np.int32), f"f:{i + 1}")
             for i in range(7)]
    collate = lambda rows, **kw: preference_batch(rows, buckets=LengthBuckets((4, 8), (8, 16)), pad_id=0,
                                                  **kw)
    reference = jax.jit(make_reference_logps(model))
    cached = precompute_reference_logps(lambda b: reference(params, b), pairs, 3, collate, "f")
    for pair, entry in zip(pairs, cached):
        alone = reference(params, collate([pair]))
        assert entry.source == pair.source and entry.chosen is pair.chosen
        assert entry.ref_chosen_logp == pytest.approx(float(alone["ref_chosen_logps"][0]), abs=1e-4)
        assert entry.ref_rejected_logp == pytest.approx(float(alone["ref_rejected_logps"][0]), abs=1e-4)
    batch = with_reference_logps(collate)(cached[2:5], batch_size=4, shape_rows=cached[2:5])
    np.testing.assert_array_equal(batch["ref_chosen_logps"],
                                  np.array([p.ref_chosen_logp for p in cached[2:5]] + [0.0], np.float32))
    assert batch["row_mask"].tolist() == [1, 1, 1, 0]


def test_lora_dpo_reference_is_the_frozen_base_and_checkpoints_hold_the_adapters(workdir):
    """lora.enabled: the policy trains adapters; the reference is the base with the adapters off (so the
    first step's loss is log 2, and the per-step reference gives the cached one's steps); checkpoints hold
    only the adapters; the export is the merged model and export_adapter/ PEFT's format."""
    lora = {"enabled": True, "rank": 2, "alpha": 4.0, "targets": ["q", "v", "o"]}
    runs = {}
    for name, precompute in (("lora-cached", True), ("lora-per-step", False)):
        config = {**dpo_config(workdir, name, precompute_ref_logprobs=precompute), "lora": lora}
        config["train"] = {"steps": 4, "seed": 0, "eval_every": 4}
        config["checkpoint"] = {"every": 2, "keep": 2}
        assert run_dpo(config, workdir) == 0
        runs[name] = step_records(workdir / name)
    cached, per_step = runs["lora-cached"], runs["lora-per-step"]
    assert sorted(cached) == [1, 2, 3, 4]
    assert cached[1]["loss/dpo"] == pytest.approx(np.log(2.0), abs=1e-5)  # adapters start as a no-op
    assert cached[4]["loss/dpo"] != cached[1]["loss/dpo"]  # the adapters moved the policy
    for step in cached:
        assert per_step[step]["loss/dpo"] == pytest.approx(cached[step]["loss/dpo"], abs=1e-5), step
    run_dir = workdir / "lora-per-step"
    manager = CheckpointManager(run_dir / "checkpoints")
    saved, _ = manager.restore(manager.latest_step())
    manager.close()
    lm = saved["train"]["params"]["lm"]
    assert set(lm) == {"layers"} and "kernel" not in lm["layers"]["attn"]["qkv"]
    assert saved["train"].get("frozen") is None
    assert (run_dir / "export_adapter" / "adapter_model.safetensors").exists()
    assert_export_is_a_transformers_causal_lm(run_dir / "export")

"""Reward-model steps: separable pairs are learned, ranking and rating losses fall, padded rows weigh
nothing, and the scorer (whole or micro-batched) reads the reward at the last real token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.heads import init_reward_head
from jaxrlhf.rl.reward_norm import RewardNormalization
from jaxrlhf.rollout.generate import Rollout
from jaxrlhf.rollout.scoring import sequence_scores
from jaxrlhf.steps.optim import OptimizerConfig, make_optimizer
from jaxrlhf.steps.params import RewardModelParams
from jaxrlhf.steps.reward_model import (
    RewardModelConfig,
    RewardModelScorer,
    make_reward_model_eval,
    make_reward_model_step,
    make_reward_scorer,
)
from jaxrlhf.steps.state import create_train_state

V, P, N, B = 16, 3, 5, 16
GOOD, BAD = 3, 4  # chosen responses contain GOOD, rejected ones BAD; other tokens are 5…15


def responses(rng, rows, marker_counts):
    """[rows, P+N] prompt+response tokens and mask; each response holds marker_counts[i] GOOD tokens at
    random places, is 4 or 5 tokens long (right-padded) and otherwise random."""
    tokens = rng.randint(5, V, (rows, P + N)).astype(np.int32)
    mask = np.ones((rows, P + N), np.int32)
    for i in range(rows):
        length = rng.randint(4, N + 1)
        places = rng.choice(length, size=abs(marker_counts[i]), replace=False)
        tokens[i, P + places] = GOOD if marker_counts[i] > 0 else BAD
        mask[i, P + length:] = 0
        tokens[i, P + length:] = 0
    return tokens, mask


def pair_batch(seed):
    rng = np.random.RandomState(seed)
    chosen, chosen_mask = responses(rng, B, [1] * B)
    rejected, rejected_mask = responses(rng, B, [-1] * B)
    rejected[:, :P] = chosen[:, :P]  # same prompt
    return {"chosen_tokens": chosen, "chosen_mask": chosen_mask, "rejected_tokens": rejected,
            "rejected_mask": rejected_mask, "row_mask": np.ones(B, np.int32)}


@pytest.fixture(scope="module")
def rm_params(tiny_params):
    return RewardModelParams(tiny_params, init_reward_head(jax.random.key(2), 32))


@pytest.fixture(scope="module")
def optimizer():
    return make_optimizer(OptimizerConfig(learning_rate=3e-3, schedule="constant"), 1000)


@pytest.fixture(scope="module")
def pairwise_eval(tiny_model):
    return jax.jit(make_reward_model_eval(tiny_model, RewardModelConfig()))


def test_separable_pairs_reach_high_heldout_accuracy(tiny_model, rm_params, optimizer, pairwise_eval):
    step = jax.jit(make_reward_model_step(tiny_model, optimizer, RewardModelConfig()))
    state = create_train_state(rm_params, optimizer)
    heldout = [pair_batch(1000 + i) for i in range(4)]  # 64 unseen pairs
    accuracy = lambda params: np.mean([float(pairwise_eval(params, b)["accuracy"]) for b in heldout])
    start = accuracy(state.params)
    losses = []
    for i in range(80):
        state, metrics = step(state, pair_batch(i), jax.random.key(0))
        losses.append(float(metrics["loss/reward"]))
        if i % 10 == 9 and accuracy(state.params) > 0.95:
            break
    assert accuracy(state.params) > 0.95 > start
    assert losses[-1] < losses[0] and float(metrics["train/margin"]) > 0
    assert float(metrics["train/skipped_updates"]) == 0
    assert set(metrics) == {"loss/reward", "train/accuracy", "train/margin", "train/reward_mean",
                            "train/reward_std", "train/grad_norm", "train/skipped_updates", "lr"}


def test_padded_rows_do_not_change_the_loss(tiny_model, rm_params, pairwise_eval):
    batch = pair_batch(7)
    real = 12
    batch["row_mask"][real:] = 0
    other = {k: v.copy() for k, v in batch.items()}
    rng = np.random.RandomState(3)
    for key in ("chosen_tokens", "rejected_tokens"):  # different garbage in the padded rows
        other[key][real:] = rng.randint(0, V, other[key][real:].shape)
    a, b = pairwise_eval(rm_params, batch), pairwise_eval(rm_params, other)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    unpadded = {k: v[:real] for k, v in batch.items()}
    c = pairwise_eval(rm_params, unpadded)
    for name in ("loss", "accuracy", "margin", "reward_mean", "reward_std"):
        np.testing.assert_allclose(a[name], c[name], rtol=1e-5, atol=1e-6)


def ranking_batch(seed, rows=4, k=3):
    """Items ranked best first by how many GOOD tokens they hold (2, 1, 0); row 1 has only two items."""
    rng = np.random.RandomState(seed)
    tokens, mask = responses(rng, rows * k, [2, 1, -1] * rows)
    item_mask = np.ones((rows, k), np.int32)
    item_mask[1, 2] = 0
    return {"tokens": tokens.reshape(rows, k, -1), "mask": mask.reshape(rows, k, -1), "item_mask": item_mask,
            "row_mask": np.ones(rows, np.int32)}


def rating_batch(seed, rows=8):
    rng = np.random.RandomState(seed)
    counts = rng.randint(0, 3, rows)
    tokens, mask = responses(rng, rows, [c if c else -1 for c in counts])
    return {"tokens": tokens, "mask": mask, "ratings": counts.astype(np.float32),
            "row_mask": np.ones(rows, np.int32)}


@pytest.mark.parametrize("loss, make_batch", [("ranking", ranking_batch), ("rating", rating_batch)])
def test_ranking_and_rating_losses_decrease(loss, make_batch, tiny_model, rm_params, optimizer):
    cfg = RewardModelConfig(loss=loss)
    step = jax.jit(make_reward_model_step(tiny_model, optimizer, cfg))
    state = create_train_state(rm_params, optimizer)
    losses = []
    for i in range(20):
        state, metrics = step(state, make_batch(i % 4), jax.random.key(0))
        losses.append(float(metrics["loss/reward"]))
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert float(metrics["train/accuracy"]) > 0.5 and float(metrics["train/skipped_updates"]) == 0


def test_scorer_reads_last_real_token_whole_or_in_chunks(tiny_model, rm_params):
    batch = rating_batch(5)
    tokens, mask = batch["tokens"], batch["mask"]
    whole = jax.jit(make_reward_scorer(tiny_model))(rm_params, tokens, mask)
    chunked = jax.jit(make_reward_scorer(tiny_model, micro_batch_size=4))(rm_params, tokens, mask)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    # Changing a token after the last real one (padding) leaves the score unchanged; a real one does not.
    last = mask.sum(1) - 1
    padded_row = int(np.argmin(mask[:, -1]))
    changed = tokens.copy()
    changed[padded_row, -1] = 7
    changed_real = tokens.copy()
    changed_real[0, last[0]] = (tokens[0, last[0]] + 1) % V
    score = jax.jit(lambda t: sequence_scores(tiny_model, rm_params.lm, rm_params.reward_head, t, mask))
    np.testing.assert_allclose(score(changed)[padded_row], whole[padded_row], rtol=1e-5)
    assert abs(float(score(changed_real)[0] - whole[0])) > 1e-4
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        make_reward_scorer(tiny_model, micro_batch_size=3)(rm_params, tokens, mask)


def test_missing_batch_key_is_named(tiny_model, rm_params):
    with pytest.raises(KeyError, match="item_mask"):
        make_reward_model_eval(tiny_model, RewardModelConfig(loss="ranking"))(rm_params, rating_batch(0))


def test_reward_model_scorer_of_a_rollout_normalises(tiny_model, rm_params):
    batch = rating_batch(5)
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    rollout = Rollout(tokens, mask, tokens[:, 4:], mask[:, 4:], jnp.zeros(tokens[:, 4:].shape),
                      jnp.ones(tokens.shape[0], bool))
    raw = jax.jit(make_reward_scorer(tiny_model))(rm_params, tokens, mask)
    scorer = RewardModelScorer(tiny_model, RewardNormalization(jnp.float32(2.0), jnp.float32(-1.0)))
    np.testing.assert_allclose(jax.jit(scorer)(rm_params, rollout), 2.0 * raw - 1.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(RewardModelScorer(tiny_model))(rm_params, rollout), raw, rtol=1e-6)


@pytest.mark.parametrize("loss, make_batch", [("pairwise", pair_batch), ("ranking", ranking_batch),
                                             ("rating", rating_batch)])
def test_gradient_accumulation_gives_the_whole_batch_metrics(loss, make_batch, tiny_model, rm_params,
                                                              optimizer):
    """reward_std merged exactly over micro-batches (it was the mean of their stds: 26% low at 4),
    pair metrics weighted by their pairs (a ranking row with two items holds one pair, not three), and a
    rating model's pairs formed across the whole batch (they were formed inside each micro-batch)."""
    batch = make_batch(0) if loss == "pairwise" else make_batch(0, rows=8)
    out = {}
    for accum in (1, 2, 4):
        cfg = RewardModelConfig(loss=loss, grad_accum_steps=accum)
        step = jax.jit(make_reward_model_step(tiny_model, optimizer, cfg))
        _, out[accum] = step(create_train_state(rm_params, optimizer), batch, jax.random.key(0))
    whole = make_reward_model_eval(tiny_model, RewardModelConfig(loss=loss))(rm_params, batch)
    for accum in (1, 2, 4):
        for k in ("reward_mean", "reward_std", "accuracy", "margin"):
            got, want = float(out[accum][f"train/{k}"]), float(whole[k])
            assert got == pytest.approx(want, rel=2e-5, abs=1e-6), (k, accum)
    if loss == "rating":  # every pair of rows with different ratings, by hand
        r = np.asarray(sequence_scores(tiny_model, rm_params.lm, rm_params.reward_head, batch["tokens"],
                                       batch["mask"]), np.float64)
        y = batch["ratings"]
        pairs = [(i, j) for i in range(8) for j in range(8) if y[i] > y[j]]
        assert float(whole["accuracy"]) == pytest.approx(np.mean([r[i] > r[j] for i, j in pairs]))
        assert float(whole["margin"]) == pytest.approx(np.mean([r[i] - r[j] for i, j in pairs]), rel=1e-5)
        return
    scores = sequence_scores(tiny_model, rm_params.lm, rm_params.reward_head, *(
        (jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]),
         jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])) if loss == "pairwise" else
        (batch["tokens"].reshape(-1, P + N)[batch["item_mask"].reshape(-1) > 0],
         batch["mask"].reshape(-1, P + N)[batch["item_mask"].reshape(-1) > 0])))
    assert float(whole["reward_std"]) == pytest.approx(float(np.std(np.asarray(scores))), rel=1e-5)


@pytest.mark.parametrize("loss, make_batch", [("pairwise", pair_batch), ("ranking", ranking_batch),
                                             ("rating", rating_batch)])
def test_held_out_metrics_do_not_depend_on_the_eval_batch_size(loss, make_batch, tiny_model, rm_params):
    """`jaxrlhf reward`'s eval/* over an eval set in batches of 2, 4 or all 8 rows are the same: each
    batch's metric weighted by its own weight (pairs for accuracy and margin; a ranking row with two items
    has one pair), and a rating model's pairs formed across batches (eval/accuracy moved 0.55 ↔ 0.63 with
    data.eval_batch_size before)."""
    from jaxrlhf.train.reward import evaluate_reward_model

    batch = make_batch(1) if loss == "pairwise" else make_batch(1, rows=8)
    if loss == "pairwise":
        batch = {k: v[:8] for k, v in batch.items()}
    evaluate = jax.jit(make_reward_model_eval(tiny_model, RewardModelConfig(loss=loss)))
    results = {}
    for size in (2, 4, 8):
        batches = [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, 8, size)]
        results[size] = evaluate_reward_model(evaluate, rm_params, batches)
    whole = {f"eval/{k}": float(v) for k, v in evaluate(rm_params, batch).items() if k in (
        "loss", "accuracy", "margin", "mae")}
    assert set(results[8]) == set(whole)
    for size in (2, 4):
        for k, want in whole.items():
            assert results[size][k] == pytest.approx(want, rel=1e-5, abs=1e-6), (size, k)

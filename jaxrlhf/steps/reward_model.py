"""Reward-model training from pairwise, ranked or rated feedback, its evaluation, and jittable scorers
(:func:`make_reward_scorer` of token arrays; :class:`RewardModelScorer` of a rollout, as the RL reward).

The reward is the reward head read at each sequence's last non-pad token. Batches (``jaxrlhf.data``):
- pairwise: ``chosen_tokens, chosen_mask, rejected_tokens, rejected_mask`` [B, L]; both sides go through one
  forward pass of [2B, L];
- ranking: ``tokens, mask`` [B, k, L] (best first) and ``item_mask`` [B, k]; one forward pass of [B·k, L];
- rating: ``tokens, mask`` [B, L] and ``ratings`` [B].
All may carry ``row_mask`` [B] (0 on padded rows, which then weigh nothing in the loss and metrics).
Params: :class:`~jaxrlhf.steps.params.RewardModelParams` (backbone and reward head).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.config import is_number
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl.masked import masked_mean, masked_var
from jaxrlhf.rl.preference import bradley_terry_loss, plackett_luce_loss, rating_regression_loss
from jaxrlhf.rl.reward_norm import RewardNormalization, normalize_rewards
from jaxrlhf.rollout.generate import Rollout
from jaxrlhf.rollout.scoring import sequence_scores
from jaxrlhf.steps.accumulate import accumulate_gradients, merge_microbatches, split_microbatches
from jaxrlhf.steps.guard import apply_gradients_if_finite
from jaxrlhf.steps.optim import current_learning_rate
from jaxrlhf.steps.params import RewardModelParams
from jaxrlhf.steps.state import TrainState, split_frozen, with_frozen

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
REWARD_MODEL_LOSSES = ("pairwise", "ranking", "rating")
_KEYS = {
    "pairwise": ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask"),
    "ranking": ("tokens", "mask", "item_mask"),
    "rating": ("tokens", "mask", "ratings"),
}


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """loss: the feedback kind. margin / center_coef: Bradley–Terry margin and centring coefficient
    (pairwise only: a ranking or rating loss refuses them). grad_accum_steps: micro-batches per update.
    identical_pairs: a preference pair whose chosen and rejected are the same tokens, or a ranking holding
    a response twice, carries no preference (zero gradient; accuracy counts it as lost): "error" names its
    file and line, "drop" leaves such pairs (a ranking's repeats) out with a warning."""

    loss: Literal["pairwise", "ranking", "rating"] = "pairwise"
    margin: float = 0.0
    center_coef: float = 0.0
    grad_accum_steps: int = 1
    identical_pairs: Literal["error", "drop"] = "error"

    def __post_init__(self) -> None:
        if self.loss not in REWARD_MODEL_LOSSES:
            raise ValueError(
                f"RewardModelConfig.loss: expected one of {REWARD_MODEL_LOSSES}, got {self.loss!r}"
            )
        if self.grad_accum_steps < 1:
            raise ValueError(f"RewardModelConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        for key in ("margin", "center_coef"):
            value = getattr(self, key)
            if self.loss != "pairwise" and is_number(value) and value != 0:  # traced: cannot be checked
                raise ValueError(f"RewardModelConfig.{key}: a Bradley–Terry term, used by the pairwise loss "
                                 f"only; the {self.loss} loss would ignore {key}={value} (set it to 0)")
        if self.identical_pairs not in ("error", "drop"):
            raise ValueError(f"RewardModelConfig.identical_pairs: expected 'error' or 'drop', got "
                             f"{self.identical_pairs!r}")


def _check_batch(batch: Batch, loss: str) -> None:
    missing = [k for k in _KEYS[loss] if k not in batch]
    if missing:
        raise KeyError(f"reward model ({loss} loss): batch has no {missing[0]!r}; keys are {sorted(batch)}")


def _row_weights(batch: Batch, like: jax.Array) -> jax.Array:
    if "row_mask" not in batch:
        return jnp.ones(like.shape[:1], jnp.float32)
    return batch["row_mask"].astype(jnp.float32)


def _ordered_pairs(rewards: jax.Array, better: jax.Array, pair_weights: jax.Array) -> Metrics:
    """Accuracy and margin over weighted pairs (i, j) where i should score higher: rewards [B, k],
    better / pair_weights [B, k, k]."""
    weights = pair_weights * better
    diff = rewards[:, :, None] - rewards[:, None, :]
    return {"accuracy": masked_mean(diff > 0, weights), "margin": masked_mean(diff, weights)}


def _reward_stats(rewards: jax.Array, weights: jax.Array) -> tuple[Metrics, Metrics]:
    """(reward_mean and the population reward_var over the scored sequences, their weight Σ weights): the
    variance, not the std, so that gradient accumulation can merge micro-batches exactly (Chan)."""
    rewards = jax.lax.stop_gradient(rewards)
    stats = {"reward_mean": masked_mean(rewards, weights), "reward_var": masked_var(rewards, weights,
                                                                                    unbiased=False)}
    total = jnp.sum(weights).astype(jnp.float32)
    return stats, {k: total for k in stats}


def _with_std(metrics: Metrics) -> Metrics:
    """reward_var → reward_std (the metric the trainers log)."""
    metrics = dict(metrics)
    metrics["reward_std"] = jnp.sqrt(jnp.maximum(metrics.pop("reward_var"), 0.0))
    return metrics


def rating_pair_metrics(rows: Batch) -> Metrics:
    """Accuracy and margin of a rating model over every ordered pair of rows (i, j) with rating_i >
    rating_j, each weighted by weight_i·weight_j; ``rows``: reward, rating, weight [B]. Pairs span the whole
    batch, so accumulation computes them from all its rows (:func:`accumulate_gradients`'s row_metrics)."""
    better = rows["rating"][:, None] > rows["rating"][None, :]
    pairs = rows["weight"][:, None] * rows["weight"][None, :]
    return _ordered_pairs(rows["reward"][None], better[None], pairs[None])


def reward_model_loss(
    model: LanguageModel, cfg: RewardModelConfig, params: RewardModelParams, batch: Batch
) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
    """(loss, (total row weight, metrics)) of one batch for ``cfg.loss`` (see :func:`_loss_parts`)."""
    loss, (w, metrics, *rest) = _loss_parts(model, cfg, params, batch)
    if len(rest) > 1:
        metrics = {**metrics, **rating_pair_metrics(rest[1])}
    return loss, (w, _with_std(metrics))


def _loss_parts(
    model: LanguageModel, cfg: RewardModelConfig, params: RewardModelParams, batch: Batch
) -> tuple[jax.Array, tuple[Any, ...]]:
    """(loss, (total row weight, metrics, each metric's weight[, rows])) of one batch for ``cfg.loss``.

    pairwise: −log σ(r_c − r_r − margin) + center_coef·(r_c + r_r)²; ranking: Plackett–Luce NLL over the
    valid items; rating: (r − rating)². Means weighted by row_mask. Metrics: accuracy and margin over the
    ordered pairs (chosen/rejected; items i above j), each weighted by its pairs; reward_mean, reward_var
    (population; over every scored sequence), and "mae" for ratings. A rating's pairs are rows with
    rating_i > rating_j anywhere in the batch: the loss returns its rows (reward, rating, weight) for
    :func:`rating_pair_metrics` instead.
    """
    _check_batch(batch, cfg.loss)
    lm, head = params.lm, params.reward_head
    if cfg.loss == "pairwise":
        b = batch["chosen_tokens"].shape[0]
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        rewards = sequence_scores(model, lm, head, tokens, mask)  # [2B]
        chosen, rejected = rewards[:b], rewards[b:]
        w = _row_weights(batch, chosen)
        loss, m = bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coef, w)
        metrics = {"accuracy": m["accuracy"], "margin": m["margin"]}
        weights = {"accuracy": jnp.sum(w), "margin": jnp.sum(w)}
        stats, stat_weights = _reward_stats(rewards, jnp.concatenate([w, w]))
        metrics, weights = metrics | stats, weights | stat_weights
    elif cfg.loss == "ranking":
        b, k, length = batch["tokens"].shape
        flat = lambda x: x.reshape(b * k, length)
        rewards = sequence_scores(model, lm, head, flat(batch["tokens"]), flat(batch["mask"])).reshape(b, k)
        items = batch["item_mask"].astype(jnp.float32)
        # A ranking needs two items; a row with fewer carries no information and weighs nothing.
        w = _row_weights(batch, rewards) * (jnp.sum(items, axis=1) >= 2)
        loss, _ = plackett_luce_loss(rewards, items, w)
        above = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]
        pairs = items[:, :, None] * items[:, None, :] * w[:, None, None]
        ordered = jnp.broadcast_to(above, pairs.shape)
        metrics = _ordered_pairs(jax.lax.stop_gradient(rewards), ordered, pairs)
        weights = {k: jnp.sum(pairs * ordered) for k in metrics}
        stats, stat_weights = _reward_stats(rewards, items * w[:, None])
        metrics, weights = metrics | stats, weights | stat_weights
    else:
        rewards = sequence_scores(model, lm, head, batch["tokens"], batch["mask"])
        ratings = batch["ratings"].astype(jnp.float32)
        w = _row_weights(batch, rewards)
        loss, m = rating_regression_loss(rewards, ratings, w)
        stats, stat_weights = _reward_stats(rewards, w)
        metrics, weights = stats | {"mae": m["mae"]}, stat_weights | {"mae": jnp.sum(w)}
        weights = {k: jnp.asarray(v, jnp.float32) for k, v in weights.items()}
        rows = {"reward": jax.lax.stop_gradient(rewards), "rating": ratings, "weight": w}
        return loss, (jnp.sum(w), metrics, weights, rows)
    weights = {k: jnp.asarray(v, jnp.float32) for k, v in weights.items()}
    return loss, (jnp.sum(w), metrics, weights)


def make_reward_model_step(
    model: LanguageModel, optimizer: optax.GradientTransformation, cfg: RewardModelConfig
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``step(state, batch, key) -> (state, metrics)``: one guarded update on :func:`reward_model_loss`.

    Metrics (their logged names): loss/reward, train/accuracy, train/margin, train/reward_mean,
    train/reward_std (train/mae for ratings), train/grad_norm, train/skipped_updates (1 when the update was
    not finite and skipped), lr.
    """
    loss_fn = lambda params, batch: _loss_parts(model, cfg, params, batch)

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, Metrics]:
        del key
        state, frozen = split_frozen(state)
        loss, grads, metrics = accumulate_gradients(
            with_frozen(loss_fn, frozen), state.params, batch, cfg.grad_accum_steps,
            {"reward_var": "reward_mean"}, rating_pair_metrics if cfg.loss == "rating" else None)
        metrics = _with_std(metrics)
        state, ok = apply_gradients_if_finite(state, optimizer, grads, loss)
        state = state._replace(frozen=frozen)
        metrics = {
            "loss/reward": loss,
            **{f"train/{k}": v for k, v in metrics.items()},
            "train/grad_norm": optax.tree.norm(grads),
            "train/skipped_updates": 1.0 - ok.astype(jnp.float32),
            "lr": current_learning_rate(state.opt_state),
        }
        return state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    return step


def make_reward_model_eval(
    model: LanguageModel, cfg: RewardModelConfig
) -> Callable[[RewardModelParams, Batch], Metrics]:
    """``eval(params, batch) -> metrics`` (loss, accuracy, margin, reward_mean, reward_std; mae for
    ratings): no update. To merge batches exactly, ``weight/<name>`` is each metric's weight (rows, or
    pairs for accuracy and margin), and a rating model's ``rows/reward``, ``rows/rating``, ``rows/weight``
    [B] give its pairs across batches (:func:`rating_pair_metrics` of all of them)."""

    def evaluate(params: RewardModelParams, batch: Batch) -> Metrics:
        loss, (w, metrics, weights, *rows) = _loss_parts(model, cfg, params, batch)
        out = {"loss": loss, "weight/loss": w}
        if rows:
            out |= rating_pair_metrics(rows[0]) | {f"rows/{k}": v for k, v in rows[0].items()}
            weights = weights | {k: jnp.sum(rows[0]["weight"]) for k in ("accuracy", "margin")}
        weights = {("reward_std" if k == "reward_var" else k): v for k, v in weights.items()}
        out |= _with_std(metrics) | {f"weight/{k}": v for k, v in weights.items()}
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)

    return evaluate


def make_reward_scorer(
    model: LanguageModel, micro_batch_size: int | None = None
) -> Callable[[RewardModelParams, jax.Array, jax.Array], jax.Array]:
    """``score(params, tokens, mask) -> [B]``: the reward of each sequence (jittable).

    With ``micro_batch_size`` the batch is scored in ``B / micro_batch_size`` sequential chunks
    (``lax.map``), bounding activation memory; B must then be a multiple of it.
    """

    def score_all(params: RewardModelParams, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return sequence_scores(model, params.lm, params.reward_head, tokens, mask)

    def score(params: RewardModelParams, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        b = tokens.shape[0]
        if micro_batch_size is None or micro_batch_size >= b:
            return score_all(params, tokens, mask)
        if b % micro_batch_size:
            raise ValueError(f"reward scorer: batch size {b} is not a multiple of micro_batch_size "
                             f"{micro_batch_size}")
        chunks = split_microbatches((tokens, mask), b // micro_batch_size)
        return merge_microbatches(jax.lax.map(lambda c: score_all(params, *c), chunks))

    return score


@dataclasses.dataclass(frozen=True, eq=False)
class RewardModelScorer:
    """``scorer(params, rollout) -> [B]``: gain·r + bias of the reward model's score of each full sequence.

    ``normalization`` None means gain 1, bias 0; ``micro_batch_size`` scores the batch in chunks (see
    :func:`make_reward_scorer`). Jittable.
    """

    model: LanguageModel
    normalization: RewardNormalization | None = None
    micro_batch_size: int | None = None

    def __call__(self, params: RewardModelParams, rollout: Rollout) -> jax.Array:
        score = make_reward_scorer(self.model, self.micro_batch_size)
        rewards = score(params, rollout.sequences, rollout.sequence_mask)
        return rewards if self.normalization is None else normalize_rewards(self.normalization, rewards)

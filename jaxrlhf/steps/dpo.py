"""Direct preference optimisation: the policy trained on preference pairs against a frozen reference, with
no reward model and no sampling (DPO, Rafailov et al. 2023; IPO, Azar et al. 2023; cDPO, label smoothing;
SLiC's hinge, Zhao et al. 2023). The losses are :func:`jaxrlhf.rl.preference.dpo_loss`.

Batch (``jaxrlhf.data.preference_batch`` plus the reference's log-probs):
``{chosen,rejected}_{tokens,mask,loss_mask}`` [B, P+N] (prompt left-padded, response right-padded),
``ref_chosen_logps, ref_rejected_logps`` [B] (float32) and optionally ``row_mask`` [B]. The reference
log-probs are an input, not a model the step runs: a trainer computes them once per example before training
and batches them with the examples (``dpo.precompute_ref_logprobs``), or each step with
:func:`make_reference_logps`; the step is the same either way, so it stays one pure function of
``(state, batch)`` that a pure ``make_train`` can call.

Log-probs are sums over each response's tokens (eos included):
``log π(y|x) = Σ_j loss_mask[b, j]·log softmax(logits[b, j−1])[tokens[b, j]]``.
State: a :class:`~jaxrlhf.steps.state.TrainState` over :class:`~jaxrlhf.steps.params.PolicyParams` (the
value head, if any, is not used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.transformer import LanguageModel, Params, positions_from_mask
from jaxrlhf.rl.masked import masked_mean, masked_sum
from jaxrlhf.rl.policy_losses import token_logprobs
from jaxrlhf.rl.preference import DPO_VARIANTS, dpo_loss
from jaxrlhf.steps.accumulate import accumulate_gradients
from jaxrlhf.steps.guard import apply_gradients_if_finite
from jaxrlhf.steps.optim import current_learning_rate
from jaxrlhf.steps.params import PolicyParams
from jaxrlhf.steps.sharding import shard_rows
from jaxrlhf.steps.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
PAIR_KEYS = ("chosen_tokens", "chosen_mask", "chosen_loss_mask",
             "rejected_tokens", "rejected_mask", "rejected_loss_mask")
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO's loss and where its reference log-probs come from (TRL's names where TRL has the key).

    loss: "sigmoid" (DPO: −log σ(β·h); with label_smoothing ε, conservative DPO), "ipo" ((h − 1/(2β))²,
    on summed log-probs; TRL's "ipo" averages them per token) or "hinge" (SLiC: relu(1 − β·h)); h is the
    policy's log-ratio margin over the reference (see :func:`jaxrlhf.rl.preference.dpo_loss`).
    The step reads loss, beta, label_smoothing and grad_accum_steps; the trainer reads the rest.
    """

    # sigmoid: DPO, −log σ(β·h) (conservative DPO with label_smoothing); ipo: (h − 1/(2β))²; hinge: SLiC,
    # relu(1 − β·h); h = (log π − log π_ref)(chosen) − (log π − log π_ref)(rejected).
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = 0.1  # β: the strength of the tie to the reference (the implicit reward is β·log π/π_ref)
    label_smoothing: float = 0.0  # ε of conservative DPO: the share of labels assumed flipped (sigmoid only)
    grad_accum_steps: int = 1  # micro-batches per update (the batch size must be divisible by it)
    # true: the reference's log-probs of every train and eval pair are computed in one pass before training
    # (recomputed at each start-up, never stored) and batched with the pairs; false: a reference forward
    # pass every step (the reference's weights stay in memory).
    precompute_ref_logprobs: bool = True
    # A pair whose chosen and rejected tokens are identical carries no preference (its gradient is 0):
    # "error" stops with the file and line; "drop" skips such pairs with a counted warning.
    identical_pairs: Literal["error", "drop"] = "error"
    # Without data.eval_file, hold out this fraction of the train file (drawn by train.seed, never trained
    # on) for the eval/* metrics; 0: no held-out evaluation.
    eval_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in DPO_VARIANTS:
            raise ValueError(f"DPOConfig.loss: expected one of {list(DPO_VARIANTS)}, got {self.loss!r}")
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"DPOConfig.label_smoothing: {self.label_smoothing} applies to the sigmoid loss "
                             f"(conservative DPO) only, not to {self.loss!r}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"DPOConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.identical_pairs not in ("error", "drop"):
            raise ValueError(
                f"DPOConfig.identical_pairs: expected 'error' or 'drop', got {self.identical_pairs!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"DPOConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")


def _check_batch(batch: Batch, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        hint = (" (compute them with make_reference_logps, or precompute them per example)"
                if missing[0] in REFERENCE_KEYS else "")
        raise KeyError(f"{what}: batch has no {missing[0]!r}{hint}; keys are {sorted(batch)}")


def response_logps(model: LanguageModel, lm: Params, tokens: jax.Array, mask: jax.Array,
                   loss_mask: jax.Array) -> jax.Array:
    """log π(response) = Σ_j loss_mask[b, j]·log softmax(logits[b, j−1])[tokens[b, j]]: [B, L] → [B]."""
    chex.assert_rank([tokens, mask, loss_mask], 2)
    chex.assert_equal_shape([tokens, mask, loss_mask])
    logits, _, _ = model.apply(lm, tokens, positions_from_mask(mask), mask)
    lp = token_logprobs(logits[:, :-1], tokens[:, 1:])
    return masked_sum(lp, loss_mask[:, 1:], axis=1)


def pair_logps(model: LanguageModel, lm: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(log π(y_c|x), log π(y_r|x)), each [B], from one forward pass over the 2B sequences.

    Chosen and rejected rows are interleaved (row 2b chosen, 2b + 1 rejected), so each device's rows of a
    data-parallel batch stay on it.
    """
    _check_batch(batch, PAIR_KEYS, "DPO")

    def both(name: str) -> jax.Array:
        pair = jnp.stack([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)  # [B, 2, L]
        return shard_rows(pair.reshape(-1, pair.shape[-1]))

    logps = response_logps(model, lm, both("tokens"), both("mask"), both("loss_mask")).reshape(-1, 2)
    return logps[:, 0], logps[:, 1]


def make_reference_logps(model: LanguageModel) -> Callable[[Params, Batch], Batch]:
    """``reference(ref_lm_params, batch) -> {"ref_chosen_logps", "ref_rejected_logps"}`` ([B] float32 each):
    the reference's sequence log-probs, as the step reads them (jittable; no gradient flows into them)."""

    def reference(lm: Params, batch: Batch) -> Batch:
        chosen, rejected = pair_logps(model, lm, batch)
        return dict(zip(REFERENCE_KEYS, jax.lax.stop_gradient((chosen, rejected))))

    return reference


def _row_weights(batch: Batch) -> jax.Array:
    if "row_mask" in batch:
        return batch["row_mask"].astype(jnp.float32)
    return jnp.ones(batch["chosen_tokens"].shape[:1], jnp.float32)


def dpo_batch_loss(
    model: LanguageModel, cfg: DPOConfig, params: PolicyParams, batch: Batch
) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
    """(loss, (real pairs, metrics)) of one batch: ``dpo_loss`` of the policy's and the batch's reference
    log-probs, weighted by row_mask.

    Metrics (TRL's names): rewards/chosen = mean β·(log π(y_c) − log π_ref(y_c)), rewards/rejected,
    rewards/accuracies (share with chosen > rejected; a tie counts as wrong), rewards/margins,
    logps/chosen, logps/rejected (mean log π of each side).
    """
    _check_batch(batch, REFERENCE_KEYS, "DPO")
    chosen, rejected = pair_logps(model, params.lm, batch)
    w = _row_weights(batch)
    loss, metrics = dpo_loss(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                             beta=cfg.beta, label_smoothing=cfg.label_smoothing, variant=cfg.loss, weights=w)
    metrics["logps/chosen"] = masked_mean(jax.lax.stop_gradient(chosen), w)
    metrics["logps/rejected"] = masked_mean(jax.lax.stop_gradient(rejected), w)
    return loss, (jnp.sum(w), metrics)


def make_dpo_step(
    model: LanguageModel, optimizer: optax.GradientTransformation, cfg: DPOConfig
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``step(state, batch, key) -> (state, metrics)``: one (guarded, optionally accumulated) update of the
    policy on ``cfg.loss``. Pure and jittable; the batch carries the reference's log-probs.

    Metrics (their logged names): loss/dpo, rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected, train/grad_norm (before clipping), train/skipped_updates
    (1 when the update was not finite and skipped), lr.
    """

    def loss_fn(params: PolicyParams, batch: Batch):
        return dpo_batch_loss(model, cfg, params, batch)

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, Metrics]:
        del key  # no randomness: dropout is off in every model
        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, batch, cfg.grad_accum_steps)
        state, ok = apply_gradients_if_finite(state, optimizer, grads, loss)
        metrics = {
            "loss/dpo": loss,
            **metrics,
            "train/grad_norm": optax.tree.norm(grads),
            "train/skipped_updates": 1.0 - ok.astype(jnp.float32),
            "lr": current_learning_rate(state.opt_state),
        }
        return state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    return step


def make_dpo_eval(model: LanguageModel, cfg: DPOConfig) -> Callable[[PolicyParams, Batch], Metrics]:
    """``eval(params, batch) -> metrics``: loss/dpo and the DPO metrics of :func:`dpo_batch_loss`, plus
    "pairs" (the real rows, to weigh batches); no update."""

    def evaluate(params: PolicyParams, batch: Batch) -> Metrics:
        loss, (pairs, metrics) = dpo_batch_loss(model, cfg, params, batch)
        out = {"loss/dpo": loss, **metrics, "pairs": pairs}
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)

    return evaluate

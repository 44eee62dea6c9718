"""From a rollout and its scores to the PPO/A2C training batch: log-probs, values, KL, token rewards, GAE.

Every response log-prob (old, new, reference) comes from :func:`response_logprobs_and_values`, the one
forward pass the update uses too, through ``rl.token_logprobs_and_entropy(logits, tokens, temperature)``
(``rl.token_logprobs``'s values, with a written-out backward).

Batch invariance. A matmul's rounding depends on its shapes (a CPU or GPU kernel blocks a [4096, d] product
differently from a [1024, d] one), which in bfloat16 moves a log-prob by ~1e-2. The old log-probs are
therefore computed in the update's micro-batch shapes (:func:`update_micro_batch_rows`, rows B /
num_minibatches / grad_accum_steps, one ``lax.map`` step each, :func:`in_micro_batches`): each row then goes
through the same program on the same shapes as in the update's first minibatch, and the first PPO ratio is
1 to the last bit, in bfloat16 too.

``cfg.logprobs_from == "rollout"`` skips that forward: the old log-probs are those generation sampled with
(equal to a recompute up to the rounding of a different program), and a shared critic's values come from a
backbone forward without the LM head. ``cfg.tis_cap`` (with "recompute") adds truncated importance weights
min(π_old/π_sampler, C) for the policy-gradient term (:func:`truncated_importance_weights`).

Column conventions follow ``jaxrlhf.rollout.scoring``: P = prompt length (static, ``sequences.shape[1] −
response_mask.shape[1]``), response token j sits at column P + j; values[:, j] is the value of the state
before response token j.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl.advantages import batched_gae_advantages
from jaxrlhf.rl.kl import kl_estimate, kl_penalized_rewards
from jaxrlhf.rl.kl_control import KLControllerState
from jaxrlhf.rl.masked import explained_variance, masked_whiten
from jaxrlhf.rl.policy_losses import token_logprobs_and_entropy
from jaxrlhf.rollout.generate import Rollout
from jaxrlhf.rollout.scoring import response_hidden, response_logits, response_values
from jaxrlhf.steps.accumulate import merge_microbatches, split_microbatches
from jaxrlhf.steps.choice import choose
from jaxrlhf.steps.params import CriticParams, PolicyParams
from jaxrlhf.steps.rl_config import ActorCriticConfig, RLConfig

if TYPE_CHECKING:
    from jaxrlhf.steps.rl_iteration import ExperienceFn

Metrics = dict[str, jax.Array]


class Experience(NamedTuple):
    """One RL training batch. B rows, P prompt and N response columns."""

    sequences: jax.Array  # [B, P+N] int32
    sequence_mask: jax.Array  # [B, P+N]
    response_mask: jax.Array  # [B, N] float32
    old_logprobs: jax.Array  # [B, N] float32, 0 on padding
    ref_logprobs: jax.Array  # [B, N]
    old_values: jax.Array  # [B, N]
    advantages: jax.Array  # [B, N] (whitened when configured)
    returns: jax.Array  # [B, N]
    scores: jax.Array  # [B] as given (before the missing-EOS penalty)
    tis_weights: jax.Array | None = None  # [B, N] min(π_old/π_sampler, C) with cfg.tis_cap, else None

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]


class ResponseOutputs(NamedTuple):
    logprobs: jax.Array  # [B, N] log softmax(logits/T)[token], 0 on padding
    entropy: jax.Array  # [B, N] entropy of softmax(logits/T)
    values: jax.Array | None  # [B, N] when a value head was given
    bootstrap_values: jax.Array | None  # [B] value of the final state


def response_logprobs_and_values(
    model: LanguageModel,
    params: PolicyParams,
    sequences: jax.Array,
    sequence_mask: jax.Array,
    prompt_length: int,
    temperature: float,
) -> ResponseOutputs:
    """The one forward pass behind every response log-prob, entropy and (shared-critic) value.

    log π(y_j) = token_logprobs(logits_j, y_j, T), 0 where masked; H_j = entropy of softmax(logits_j / T)
    (both from :func:`~jaxrlhf.rl.token_logprobs_and_entropy`, one backward pass over the vocabulary);
    values from ``params.value_head`` when the policy has one (else ``None``).
    """
    hidden = response_hidden(model, params.lm, sequences, sequence_mask, prompt_length)
    logits = response_logits(model, params.lm, hidden)
    tokens = sequences[:, prompt_length:]
    real = sequence_mask[:, prompt_length:] > 0
    logprobs, entropy = token_logprobs_and_entropy(logits, tokens, temperature)
    logprobs = jnp.where(real, logprobs, 0.0)
    values = bootstrap = None
    if params.value_head is not None:
        values, bootstrap = response_values(params.value_head, hidden)
    return ResponseOutputs(logprobs, entropy, values, bootstrap)


def update_micro_batch_rows(cfg: RLConfig, rows: int) -> int:
    """Rows of one micro-batch of the update's loss for a batch of ``rows``: rows / num_minibatches /
    grad_accum_steps (A2C, one step over the batch: rows / grad_accum_steps). ValueError when they do not
    divide."""
    parts = getattr(cfg, "num_minibatches", 1) * cfg.grad_accum_steps
    if rows % parts:
        raise ValueError(f"experience: batch size {rows} does not split into num_minibatches × "
                         f"grad_accum_steps = {parts} equal micro-batches")
    return rows // parts


def in_micro_batches(fn, rows_per_micro: int, *arrays: jax.Array):
    """``fn(*arrays)`` computed on chunks of ``rows_per_micro`` rows, one ``lax.map`` step each, and merged
    back into [B, ...] outputs (``None`` outputs stay ``None``).

    The chunks are the strided ones of :func:`jaxrlhf.steps.accumulate.split_microbatches`. ``fn`` must be
    row-wise (row i of the output depends on row i of the inputs only); what the chunking buys is that every
    matmul has the shapes of the update's micro-batches, hence the same rounding.
    """
    rows = arrays[0].shape[0]
    if rows_per_micro >= rows:
        return fn(*arrays)
    chunks = split_microbatches(arrays, rows // rows_per_micro)
    out = jax.lax.map(lambda chunk: fn(*chunk), chunks)
    return jax.tree.map(merge_microbatches, out)


def truncated_importance_weights(
    old_logprobs: jax.Array, sampler_logprobs: jax.Array, mask: jax.Array, cap: float
) -> jax.Array:
    """Truncated importance sampling (TIS) weights w_t = min(π_old(y_t)/π_sampler(y_t), C), 0 where masked.

    π_old: the trainer's log-probs of the sampled tokens before the update; π_sampler: those the sampler
    drew them with (a different program, precision or engine). The policy-gradient term of token t is
    multiplied by w_t, correcting the expectation over the sampler's tokens towards π_old, truncated at C to
    bound the variance. [B, N] → [B, N], a constant (no gradient).
    """
    chex.assert_equal_shape([old_logprobs, sampler_logprobs, mask])
    ratio = jnp.exp(jnp.asarray(old_logprobs, jnp.float32) - jnp.asarray(sampler_logprobs, jnp.float32))
    return jax.lax.stop_gradient(jnp.where(mask > 0, jnp.minimum(ratio, cap), 0.0))


def policy_gradient_advantages(batch) -> jax.Array:
    """The advantages the policy-gradient term uses: A_t, times the TIS weight w_t when the batch has them
    (w ≥ 0 scales both sides of PPO's clipped min, so w·ℓ_clip(r, A) = ℓ_clip(r, w·A))."""
    if batch.tis_weights is None:
        return batch.advantages
    return batch.advantages * batch.tis_weights


def critic_values(
    model: LanguageModel, params: CriticParams, sequences: jax.Array, sequence_mask: jax.Array,
    prompt_length: int
) -> tuple[jax.Array, jax.Array]:
    """A separate critic's values [B, N] and final-state values [B]."""
    hidden = response_hidden(model, params.lm, sequences, sequence_mask, prompt_length)
    return response_values(params.value_head, hidden)


def sequence_kl(
    logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, estimator: str = "k1"
) -> jax.Array:
    """Per-sequence KL estimate Σ_t m_t·k(log π_t, log π_ref_t) over sampled tokens y ~ π: [B].

    With k1 (log π − log π_ref) its mean over sequences sampled from π is an unbiased estimate of
    KL(π ‖ π_ref) over whole responses. Jittable; NumPy inputs give a jax array.
    """
    return jnp.sum(kl_estimate(jnp.asarray(logprobs), jnp.asarray(ref_logprobs), estimator)
                   * jnp.asarray(mask, jnp.float32), axis=-1)


def tis_metrics(weights: jax.Array, mask: jax.Array, cap: float) -> Metrics:
    """tis/weight_mean (token mean of w) and tis/capped_frac (share of tokens whose weight hit the cap)."""
    m = jnp.asarray(mask, jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)
    return {"tis/weight_mean": jnp.sum(weights * m) / count,
            "tis/capped_frac": jnp.sum((weights >= cap) * m) / count}


def make_experience_fn(
    policy_model: LanguageModel, ref_model: LanguageModel, critic_model: LanguageModel | None,
    cfg: ActorCriticConfig,
) -> ExperienceFn:
    """``experience(policy_params, ref_params, critic_params, rollout, scores, kl_state) -> (Experience,
    metrics)``; pure and jittable.

    policy_params: the policy (with its value head when the critic is shared); ref_params: the reference
    policy (no value head needed); critic_params: the separate critic, or None. scores [B]; kl_state: the
    KL controller's state, whose β = ``kl_state.kl_coef`` weighs the KL.
    Token rewards r_t = −β·KL_t (KL in the reward only) + 1[t = last]·(score − penalty·1[no EOS]);
    advantages and returns by GAE(γ, λ); advantages whitened over the batch when configured
    (``cfg.whiten_advantages`` / ``whiten_rewards`` may be traced 0./1.: :func:`jaxrlhf.steps.choice.choose`).
    Metrics: objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward,
    objective/scores, val/num_eos_tokens, val/var_explained, objective/kl_coef (the β used); with
    ``cfg.tis_cap`` also tis/weight_mean and tis/capped_frac (:func:`tis_metrics`).
    """
    shared = critic_model is None
    if shared != (cfg.critic == "shared"):
        raise ValueError(f"make_experience_fn: cfg.critic={cfg.critic!r} but critic_model is "
                         f"{'None' if shared else 'given'}")
    estimator = cfg.effective_kl_estimator

    def experience(
        policy_params: PolicyParams,
        ref_params: PolicyParams,
        critic_params: CriticParams | None,
        rollout: Rollout,
        scores: jax.Array,
        kl_state: KLControllerState,
    ) -> tuple[Experience, Metrics]:
        sequences, sequence_mask = rollout.sequences, rollout.sequence_mask
        n = rollout.response_mask.shape[1]
        p = sequences.shape[1] - n
        mask = rollout.response_mask.astype(jnp.float32)
        scores = jnp.asarray(scores, jnp.float32)
        chex.assert_shape(scores, (sequences.shape[0],))
        kl_coef = jnp.asarray(kl_state.kl_coef, jnp.float32)
        if shared and policy_params.value_head is None:
            raise ValueError("experience: a shared critic needs policy_params.value_head")

        # SCORE: policy, reference and critic passes over the finished sequences. The policy's in the
        # update's micro-batch shapes (module docstring), or none: the sampled log-probs.
        micro = update_micro_batch_rows(cfg, sequences.shape[0])
        if cfg.logprobs_from == "rollout":
            old_logprobs = jnp.where(mask > 0, rollout.logprobs, 0.0)
            if shared and rollout.values is not None:  # read off the decode steps (generate's value_head)
                values, bootstrap = rollout.values, rollout.bootstrap_values
            elif shared:  # the value head on a backbone forward: no vocabulary logits
                values, bootstrap = in_micro_batches(
                    lambda s, m: critic_values(policy_model, CriticParams(policy_params.lm,
                                                                          policy_params.value_head), s, m, p),
                    micro, sequences, sequence_mask)
        else:
            policy = in_micro_batches(
                lambda s, m: response_logprobs_and_values(policy_model, policy_params, s, m, p,
                                                          cfg.temperature),
                micro, sequences, sequence_mask)
            old_logprobs, values, bootstrap = policy.logprobs, policy.values, policy.bootstrap_values
        if not shared:
            values, bootstrap = critic_values(critic_model, critic_params, sequences, sequence_mask, p)
        ref_logprobs = response_logprobs_and_values(
            ref_model, ref_params._replace(value_head=None), sequences, sequence_mask, p,
            cfg.temperature).logprobs
        values = jnp.where(mask > 0, values, 0.0)
        tis = None
        if cfg.tis_cap is not None:
            tis = truncated_importance_weights(old_logprobs, rollout.logprobs, mask, cfg.tis_cap)

        # REWARDS: score at the last response token, KL penalty per token (classic) or none (KL in loss).
        kl = kl_estimate(old_logprobs, ref_logprobs, estimator) * mask
        eos = rollout.stopped.astype(bool)
        beta = kl_coef if cfg.kl_in_reward else jnp.zeros((), jnp.float32)
        rewards, non_score = kl_penalized_rewards(scores, kl, mask, beta, eos, cfg.missing_eos_penalty)
        rewards = choose(cfg.whiten_rewards, lambda: masked_whiten(rewards, mask, shift_mean=False),
                         lambda: rewards)

        # ADVANTAGES: GAE; a finished response ends in a terminal state, a truncated one may bootstrap.
        bootstrap = jnp.where(eos | (not cfg.bootstrap_truncated), 0.0, bootstrap)
        advantages, returns = batched_gae_advantages(rewards, values, mask, bootstrap, cfg.gamma, cfg.lam)
        advantages = choose(cfg.whiten_advantages, lambda: masked_whiten(advantages, mask),
                            lambda: advantages)

        batch = Experience(sequences, sequence_mask, mask, old_logprobs, ref_logprobs, values,
                           advantages, returns, scores, tis)
        batch = jax.tree.map(jax.lax.stop_gradient, batch)
        penalised = scores - jnp.where(eos, 0.0, cfg.missing_eos_penalty)
        non_score_sum = jnp.sum(non_score, axis=1)
        metrics = {
            "objective/kl": jnp.mean(jnp.sum(kl, axis=1)),
            "objective/entropy": jnp.mean(jnp.sum(-old_logprobs * mask, axis=1)),
            "objective/non_score_reward": jnp.mean(non_score_sum),
            "objective/rlhf_reward": jnp.mean(penalised + non_score_sum),
            "objective/scores": jnp.mean(penalised),
            "val/num_eos_tokens": jnp.sum(eos.astype(jnp.float32)),
            "val/var_explained": explained_variance(values, returns, mask),
            "objective/kl_coef": kl_coef,
        }
        if tis is not None:
            metrics |= tis_metrics(tis, mask, cfg.tis_cap)
        return batch, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    return experience

"""From a rollout of G samples per prompt and their scores to the critic-free training batch: log-probs
(old and reference, the same forward pass as PPO's experience), shaped scores, group advantages, and DAPO's
dynamic-sampling weights.

Rows are prompt-major (``jaxrlhf.rl.group_advantages``): the G samples of prompt 0, then of prompt 1, …
With ReMax (``advantage: remax``) the rollout carries one greedy response per prompt after the P·G samples
(rows P·G … P·G + P − 1, in prompt order), generated and scored in the same phases as the samples; they set
the baseline and are not trained on.

Scores are shaped before any estimator sees them: s = score − missing_eos_penalty·1[no eos] +
overlong_penalty·R_overlong(length) (DAPO's soft over-long penalty, ``jaxrlhf.rl.reward_shaping``; off when
``overlong_buffer`` is 0). With the KL in the reward a sequence estimator (GRPO, Dr. GRPO, RLOO, ReMax) sees
r = s − β·Σ_t k_t (the greedy baseline of ReMax: its shaped score), REINFORCE++ the per-token penalty
−β·k_t; with the KL in the loss, r = s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl import group_advantages as ga
from jaxrlhf.rl.kl import kl_estimate
from jaxrlhf.rl.kl_control import KLControllerState
from jaxrlhf.rl.reward_shaping import soft_overlong_penalty
from jaxrlhf.rollout.generate import Rollout
from jaxrlhf.steps.experience import (
    in_micro_batches,
    response_logprobs_and_values,
    tis_metrics,
    truncated_importance_weights,
    update_micro_batch_rows,
)
from jaxrlhf.steps.params import CriticParams, PolicyParams
from jaxrlhf.steps.rl_config import PGConfig

if TYPE_CHECKING:
    from jaxrlhf.steps.rl_iteration import ExperienceFn

Metrics = dict[str, jax.Array]


class GroupExperience(NamedTuple):
    """One critic-free training batch: B = P·G sampled rows (prompt-major), P prompt and N response
    columns."""

    sequences: jax.Array  # [B, P+N] int32
    sequence_mask: jax.Array  # [B, P+N]
    response_mask: jax.Array  # [B, N] float32; 0 on padding and on the rows of dropped groups
    old_logprobs: jax.Array  # [B, N] float32, 0 on padding
    ref_logprobs: jax.Array  # [B, N]
    advantages: jax.Array  # [B, N] token advantages, 0 where the mask is 0
    scores: jax.Array  # [B] shaped scores (missing-EOS and over-long penalties applied)
    tis_weights: jax.Array | None = None  # [B, N] min(π_old/π_sampler, C) with cfg.tis_cap, else None

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]


def sample_rows(rows: int, cfg: PGConfig) -> int:
    """How many of a rollout's ``rows`` are samples (the rest, with ReMax, are the P greedy responses);
    ValueError naming ``group_size`` when the rows do not form whole groups."""
    per_prompt = cfg.group_size + (1 if cfg.greedy_baseline else 0)
    if rows % per_prompt:
        extra = " + 1 greedy response (ReMax)" if cfg.greedy_baseline else ""
        raise ValueError(f"group_size: a batch of {rows} rows is not divisible into groups of "
                         f"{cfg.group_size}{extra} per prompt")
    return rows // per_prompt * cfg.group_size


def shape_scores(scores: jax.Array, stopped: jax.Array, lengths: jax.Array, max_new_tokens: int,
                 cfg: PGConfig) -> jax.Array:
    """s = score − missing_eos_penalty·1[no eos] + overlong_penalty·R_overlong(length): [B] → [B]."""
    shaped = scores - jnp.where(stopped, 0.0, cfg.missing_eos_penalty)
    if cfg.overlong_buffer > 0:
        buffer = min(cfg.overlong_buffer, max_new_tokens)
        shaped = shaped + cfg.overlong_penalty * soft_overlong_penalty(lengths, max_new_tokens, buffer)
    return shaped


def group_advantages(
    cfg: PGConfig,
    scores: jax.Array,
    kl: jax.Array,
    mask: jax.Array,
    beta: jax.Array,
    greedy_scores: jax.Array | None = None,
) -> jax.Array:
    """Token advantages [B, N] of ``cfg.advantage`` from shaped scores [B] (prompt-major groups of
    ``cfg.group_size``), per-token KL estimates ``kl`` [B, N], the training ``mask`` [B, N] (rows of dropped
    groups all 0: they get advantage 0 and no weight in REINFORCE++'s whitening) and β (0 when the KL is in
    the loss). ``greedy_scores`` [P]: ReMax's baseline.
    """
    chex.assert_rank([scores, kl, mask], [1, 2, 2])
    n = cfg.group_size
    if cfg.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        if cfg.advantage == "reinforce_pp":
            token = ga.reinforce_pp_advantages(scores, kl, mask, beta)
        else:
            token = ga.reinforce_pp_baseline_advantages(ga.split_groups(scores, n), kl, mask, beta)
        return jnp.where(mask > 0, token, 0.0)
    rewards = ga.split_groups(scores - beta * jnp.sum(kl * mask, axis=1), n)  # [P, n]
    if cfg.advantage == "grpo":
        advantages = ga.grpo_advantages(rewards)
    elif cfg.advantage == "dr_grpo":
        advantages = ga.dr_grpo_advantages(rewards)
    elif cfg.advantage == "rloo":
        advantages = ga.rloo_advantages(rewards)
    elif cfg.advantage == "remax":
        if greedy_scores is None:
            raise ValueError("group_advantages: advantage 'remax' needs greedy_scores")
        advantages = ga.remax_advantages(rewards, greedy_scores)
    else:
        raise ValueError(f"group_advantages: unknown advantage estimator {cfg.advantage!r}")
    return ga.sequence_to_token_advantages(jnp.reshape(advantages, (-1,)), mask)


def make_group_experience_fn(
    policy_model: LanguageModel, ref_model: LanguageModel, cfg: PGConfig
) -> ExperienceFn:
    """``experience(policy_params, ref_params, critic_params, rollout, scores, kl_state) -> (GroupExperience,
    metrics)``; pure and jittable. ``critic_params`` must be None (there is no critic); β = kl_state.kl_coef.

    Metrics (TRL's names where TRL has one): reward (mean shaped score, = objective/scores); when
    group_size > 1, reward_std (mean over groups of the score's std within the group) and
    frac_reward_zero_std (share of groups whose scores are all equal); groups/dropped (groups given zero
    weight by dynamic_sampling); completions/mean_length, completions/min_length, completions/max_length,
    completions/clipped_ratio (share of responses cut at the length limit, without eos),
    completions/mean_terminated_length, …/min_…, …/max_… (over the responses that ended with eos; 0 when
    none did); objective/kl (mean
    sequence KL, the configured estimator), objective/entropy, objective/non_score_reward,
    objective/rlhf_reward, objective/scores, objective/kl_coef, val/num_eos_tokens; with ReMax
    remax/greedy_reward (the baseline's mean); with ``cfg.tis_cap`` tis/weight_mean and tis/capped_frac.
    Old log-probs: ``cfg.logprobs_from`` (see ``jaxrlhf.steps.experience``).
    """
    estimator = cfg.effective_kl_estimator
    n = cfg.group_size

    def experience(
        policy_params: PolicyParams,
        ref_params: PolicyParams,
        critic_params: CriticParams | None,
        rollout: Rollout,
        scores: jax.Array,
        kl_state: KLControllerState,
    ) -> tuple[GroupExperience, Metrics]:
        if critic_params is not None:
            raise ValueError("group experience: critic-free methods take no critic_params")
        rows = rollout.sequences.shape[0]
        scores = jnp.asarray(scores, jnp.float32)
        chex.assert_shape(scores, (rows,))
        b = sample_rows(rows, cfg)
        num_new = rollout.response_mask.shape[1]
        lengths = jnp.sum(rollout.response_mask, axis=1)
        shaped_all = shape_scores(scores, rollout.stopped.astype(bool), lengths, num_new, cfg)
        greedy = shaped_all[b:] if cfg.greedy_baseline else None
        rollout = jax.tree.map(lambda x: x[:b], rollout)  # the samples
        shaped, lengths = shaped_all[:b], lengths[:b]
        sequences, sequence_mask = rollout.sequences, rollout.sequence_mask
        p = sequences.shape[1] - num_new
        mask = rollout.response_mask.astype(jnp.float32)
        kl_coef = jnp.asarray(kl_state.kl_coef, jnp.float32)
        beta = kl_coef if cfg.kl_in_reward else jnp.zeros((), jnp.float32)

        # SCORE: policy and reference passes over the finished sequences (no value head); the policy's in
        # the update's micro-batch shapes (batch invariance, ``jaxrlhf.steps.experience``), or the sampled
        # log-probs with logprobs_from: rollout.
        if cfg.logprobs_from == "rollout":
            old_logprobs = jnp.where(mask > 0, rollout.logprobs, 0.0)
        else:
            old_logprobs = in_micro_batches(
                lambda s, m: response_logprobs_and_values(
                    policy_model, policy_params._replace(value_head=None), s, m, p, cfg.temperature).logprobs,
                update_micro_batch_rows(cfg, b), sequences, sequence_mask)
        ref_logprobs = response_logprobs_and_values(
            ref_model, ref_params._replace(value_head=None), sequences, sequence_mask, p,
            cfg.temperature).logprobs
        kl = kl_estimate(old_logprobs, ref_logprobs, estimator) * mask

        # GROUPS: the spread of each group's shaped scores; DAPO's filter zeroes the flat groups' rows.
        groups = ga.split_groups(shaped, n)  # [P, n]
        keep, flat = ga.dynamic_sampling_filter(groups)
        dropped = flat if cfg.dynamic_sampling else jnp.zeros((), jnp.int32)
        weight = jnp.repeat(keep, n) if cfg.dynamic_sampling else jnp.ones((b,), bool)
        train_mask = mask * weight[:, None]

        # ADVANTAGES
        advantages = group_advantages(cfg, shaped, kl, train_mask, beta, greedy)
        tis = None
        if cfg.tis_cap is not None:
            tis = truncated_importance_weights(old_logprobs, rollout.logprobs, mask, cfg.tis_cap)
        batch = GroupExperience(sequences, sequence_mask, train_mask, old_logprobs, ref_logprobs, advantages,
                                shaped, tis)
        batch = jax.tree.map(jax.lax.stop_gradient, batch)

        eos = rollout.stopped[:b].astype(bool)  # the samples' (ReMax's greedy rows are not trained on)
        ended = jnp.sum(eos.astype(jnp.float32))
        lengths_f = lengths.astype(jnp.float32)
        # TRL's: over the responses that ended with eos; 0 when none did
        some = ended > 0
        ended_lengths = lambda fill: jnp.where(eos, lengths_f, fill)
        terminated = {
            "completions/mean_terminated_length": jnp.sum(ended_lengths(0.0)) / jnp.maximum(ended, 1),
            "completions/min_terminated_length": jnp.where(some, jnp.min(ended_lengths(jnp.inf)), 0.0),
            "completions/max_terminated_length": jnp.where(some, jnp.max(ended_lengths(-jnp.inf)), 0.0),
        }
        sequence_kl = jnp.sum(kl, axis=1)
        non_score = -beta * sequence_kl
        metrics = {
            "reward": jnp.mean(shaped),
            "groups/dropped": dropped,
            "completions/mean_length": jnp.mean(lengths),
            "completions/min_length": jnp.min(lengths),
            "completions/max_length": jnp.max(lengths),
            "completions/clipped_ratio": jnp.mean((~eos).astype(jnp.float32)),
            **terminated,
            "objective/kl": jnp.mean(sequence_kl),
            "objective/entropy": jnp.mean(jnp.sum(-old_logprobs * mask, axis=1)),
            "objective/non_score_reward": jnp.mean(non_score),
            "objective/rlhf_reward": jnp.mean(shaped + non_score),
            "objective/scores": jnp.mean(shaped),
            "objective/kl_coef": kl_coef,
            "val/num_eos_tokens": jnp.sum(eos.astype(jnp.float32)),
        }
        if n > 1:  # a group of one has no spread to report
            metrics["reward_std"] = jnp.mean(jnp.std(groups, axis=1, ddof=1))
            metrics["frac_reward_zero_std"] = flat / groups.shape[0]
        if greedy is not None:
            metrics["remax/greedy_reward"] = jnp.mean(greedy)
        if tis is not None:
            metrics |= tis_metrics(tis, mask, cfg.tis_cap)
        return batch, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    return experience

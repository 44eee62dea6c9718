"""One RL iteration, written once: generate → score → experience → update.

    phases = make_rl_phases(policy_model, ref_model, critic_model, cfg, generation, score, optimizer)
    iteration = make_rl_iteration(phases, ref_params)
    state, out = iteration(state, {"tokens": prompt_tokens, "mask": prompt_mask}, key)
    # out.metrics: the experience's and the update's metrics; out.rollout, out.scores

The iteration is a pure composition of its four phases: when every phase is jittable (a jittable reward),
``jax.jit(iteration)`` compiles the whole of it, which is how a vmapped ``make_train`` uses it. A trainer
instead jits each phase on its own (a host reward runs between them) and passes ``around``, which times each
phase, the iteration blocking on the phase's outputs inside it. The trainers and ``benchmarks/`` build the
phases with the same function, so a benchmark times the program a user runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.transformer import LanguageModel, Params
from jaxrlhf.rl.kl_control import KLControllerState
from jaxrlhf.rollout.generate import GenerationConfig, Rollout, generate
from jaxrlhf.steps.a2c import make_a2c_update
from jaxrlhf.steps.experience import Experience, make_experience_fn
from jaxrlhf.steps.group_experience import GroupExperience, make_group_experience_fn
from jaxrlhf.steps.params import CriticParams, PolicyParams
from jaxrlhf.steps.policy_gradient import make_pg_update
from jaxrlhf.steps.ppo import make_ppo_update
from jaxrlhf.steps.rl_config import A2CConfig, PGConfig, PPOConfig, RLConfig
from jaxrlhf.steps.state import RLState, model_params

Metrics = dict[str, jax.Array]


class GenerateFn(Protocol):
    """Sample responses of the policy: built by :func:`make_rl_phases` around ``rollout.generate``."""

    def __call__(
        self, policy_params: PolicyParams, prompt_tokens: jax.Array, prompt_mask: jax.Array, key: jax.Array
    ) -> Rollout: ...


class ScoreFn(Protocol):
    """One scalar per sequence, ``[B]``: a reward model (``jaxrlhf.steps.reward_model.RewardModelScorer``),
    or a reward function / oracle (``jaxrlhf.oracle``)."""

    def __call__(self, rollout: Rollout) -> jax.Array: ...


class ExperienceFn(Protocol):
    """The training batch from a rollout and its scores: log-probs, values, KL-penalised rewards and GAE
    (:func:`jaxrlhf.steps.experience.make_experience_fn`), or log-probs and group advantages
    (:func:`jaxrlhf.steps.group_experience.make_group_experience_fn`, a :class:`GroupExperience`)."""

    def __call__(
        self,
        policy_params: PolicyParams,
        ref_params: PolicyParams,
        critic_params: CriticParams | None,
        rollout: Rollout,
        scores: jax.Array,
        kl_state: KLControllerState,
    ) -> tuple[Experience | GroupExperience, Metrics]: ...


class UpdateFn(Protocol):
    """The policy (and critic) update and the KL controller's step: built by
    :func:`jaxrlhf.steps.ppo.make_ppo_update`, :func:`jaxrlhf.steps.a2c.make_a2c_update` or
    :func:`jaxrlhf.steps.policy_gradient.make_pg_update`."""

    def __call__(
        self, state: RLState, batch: Experience | GroupExperience, key: jax.Array
    ) -> tuple[RLState, Metrics]: ...


class RLPhases(NamedTuple):
    """The four phases of an RL iteration."""

    generate: GenerateFn
    score: ScoreFn
    experience: ExperienceFn
    update: UpdateFn


class IterationOutput(NamedTuple):
    """What an iteration leaves besides the state: metrics (final names), the rollout and its scores."""

    metrics: Metrics
    rollout: Rollout
    scores: jax.Array


# An iteration times its phases under these names (the run layer logs them as timing/<name>).
PHASE_TIMERS = ("generation", "score", "update")


def make_rl_iteration(
    phases: RLPhases,
    ref_params: PolicyParams,
    around: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> Callable[[RLState, Mapping[str, jax.Array], jax.Array], tuple[RLState, IterationOutput]]:
    """``iteration(state, prompts, key) -> (state, IterationOutput)``: one RL iteration over a prompt batch.

    ``prompts`` holds left-padded ``tokens`` and ``mask`` [B, P]; ``key`` is split into the generation and
    the update keys. ``ref_params`` is the frozen reference policy. Metrics are the experience's and the
    update's (the experience's ``objective/kl_coef``, the β its rewards used, wins over the update's).
    Generation and experience run on :func:`~jaxrlhf.steps.state.model_params` (LoRA: base + adapters);
    with LoRA, ``ref_params`` is ``state.policy.frozen`` itself — the base with the adapters off.

    ``around(name)``, if given, is a context manager entered around each phase, named by
    :data:`PHASE_TIMERS` ("score" covers the reward and the experience); the iteration then waits for each
    phase's outputs inside it, so a timer measures the phase. Without it nothing blocks and the iteration
    is pure (jittable when every phase is).
    """
    timed = around is not None
    enter = around if timed else (lambda name: contextlib.nullcontext())
    block = jax.block_until_ready if timed else (lambda x: x)

    def iteration(
        state: RLState, prompts: Mapping[str, jax.Array], key: jax.Array
    ) -> tuple[RLState, IterationOutput]:
        generate_key, update_key = jax.random.split(key)
        # GENERATE
        with enter("generation"):
            rollout = block(phases.generate(model_params(state.policy), prompts["tokens"], prompts["mask"],
                                            generate_key))
        # SCORE: the reward, then log-probs, values, KL-penalised rewards and advantages.
        with enter("score"):
            scores = phases.score(rollout)
            critic_params = None if state.critic is None else model_params(state.critic)
            batch, experience_metrics = block(
                phases.experience(model_params(state.policy), ref_params, critic_params, rollout, scores,
                                  state.kl))
        # UPDATE: policy (and critic), then the KL controller.
        with enter("update"):
            state, update_metrics = block(phases.update(state, batch, update_key))
        return state, IterationOutput({**update_metrics, **experience_metrics}, rollout, scores)

    return iteration


def generate_groups(
    model: LanguageModel,
    params: Params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    generation: GenerationConfig,
    group_size: int,
    greedy_baseline: bool = False,
) -> Rollout:
    """``group_size`` sampled responses per prompt, prompt-major (the G samples of prompt 0, then of prompt 1,
    …), and with ``greedy_baseline`` one greedy response per prompt after them (ReMax's baseline): rows
    [P·G samples; P greedy].

    Each prompt is prefilled once and its cache copied to its G rows (``GenerationConfig.group_size``); the
    samples of a group are independent: every row draws its own tokens from the one key.
    """
    rollout = generate(model, params, prompt_tokens, prompt_mask, key,
                       dataclasses.replace(generation, group_size=group_size))
    if not greedy_baseline:
        return rollout
    greedy_config = dataclasses.replace(generation, greedy=True)
    greedy = generate(model, params, prompt_tokens, prompt_mask, key, greedy_config)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), rollout, greedy)


def make_rl_phases(
    policy_model: LanguageModel,
    ref_model: LanguageModel,
    critic_model: LanguageModel | None,
    cfg: RLConfig,
    generation: GenerationConfig,
    score: ScoreFn,
    optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation | None = None,
) -> RLPhases:
    """The pure phases of ``cfg``'s algorithm (PPO, A2C or a critic-free :class:`PGConfig`, by the config's
    type), not yet jitted.

    ``generation.temperature`` must be ``cfg.temperature``: sampling and every log-prob use the same one.
    A critic-free method samples ``cfg.group_size`` responses per prompt (:func:`generate_groups`): its
    rollout, scores and metrics have P·G rows (plus P greedy ones with ReMax) for P prompts.
    """
    if generation.temperature != cfg.temperature:
        raise ValueError(f"make_rl_phases: generation temperature {generation.temperature} differs from the "
                         f"algorithm's {cfg.temperature} (the first ratio would not be 1)")
    if cfg.logprobs_from == "rollout" and generation.filtered:
        raise ValueError("make_rl_phases: logprobs_from 'rollout' uses the sampled log-probs as the update's"
                         " old log-probs, but filtered sampling (top-k, top-p, min_new_tokens) draws from a "
                         "distribution the update does not compute; use logprobs_from: recompute")
    if isinstance(cfg, PGConfig):
        if critic_model is not None or critic_optimizer is not None:
            raise ValueError(f"make_rl_phases: {type(cfg).__name__} is critic-free; pass no critic model or "
                             "optimiser")

        def sample_groups(policy_params: PolicyParams, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                          key: jax.Array) -> Rollout:
            return generate_groups(policy_model, policy_params.lm, prompt_tokens, prompt_mask, key,
                                   generation, cfg.group_size, cfg.greedy_baseline)

        return RLPhases(sample_groups, score, make_group_experience_fn(policy_model, ref_model, cfg),
                        make_pg_update(policy_model, cfg, optimizer))
    if isinstance(cfg, PPOConfig):
        update = make_ppo_update(policy_model, critic_model, cfg, optimizer, critic_optimizer)
    elif isinstance(cfg, A2CConfig):
        update = make_a2c_update(policy_model, critic_model, cfg, optimizer, critic_optimizer)
    else:
        raise TypeError(f"make_rl_phases: no update for {type(cfg).__name__}")

    # Sampled log-probs as the old ones and a shared critic: the values come from the decode steps too, and
    # the experience phase runs no policy forward at all.
    values_from_rollout = cfg.logprobs_from == "rollout" and critic_model is None

    def sample(policy_params: PolicyParams, prompt_tokens: jax.Array, prompt_mask: jax.Array,
               key: jax.Array) -> Rollout:
        value_head = policy_params.value_head if values_from_rollout else None
        return generate(policy_model, policy_params.lm, prompt_tokens, prompt_mask, key, generation,
                        value_head=value_head)

    return RLPhases(sample, score, make_experience_fn(policy_model, ref_model, critic_model, cfg), update)

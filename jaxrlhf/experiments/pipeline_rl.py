"""The RL stage of the pure pipeline, keyed by a method: a method is built from an :class:`RLContext` into an
:class:`RLMethod` (``init(key) -> state``, ``step(state, key) -> (state, metrics)``, ``policy(state) -> LM
params``), and :func:`run_rl` scans its steps with evaluations in between.

    method = build_rl_method(ctx)            # the method named by config.rl.method
    output = run_rl(method, evaluate, iterations=100, points=5, key=key)

PPO and A2C are built from the trainer's own phases (``steps.rl_iteration.make_rl_phases`` and
``make_rl_iteration``) with the reward model as a jittable scorer. Another method (GRPO, RLOO, DPO, ILQL …)
plugs in with :func:`register_rl_method`: it gets the same context (the SFT policy, the proxy reward as a
function of a rollout, the feedback data for offline methods, the RL prompt pool and the traced
hyper-parameters) and returns the three functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.experiments.pipeline_config import PipelineConfig, RLHParams, with_hparams
from jaxrlhf.experiments.pipeline_stages import EvalPoint, FeedbackData
from jaxrlhf.models.heads import init_value_head
from jaxrlhf.models.transformer import LanguageModel, Params
from jaxrlhf.rollout.generate import GenerationConfig, Rollout
from jaxrlhf.steps import (
    CriticParams,
    PolicyParams,
    PPOConfig,
    create_rl_state,
    kl_controller,
    make_optimizer,
    make_rl_iteration,
    make_rl_phases,
)

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class RLContext:
    """What an RL method is built from (inside the traced ``train``: arrays may be tracers).

    score(rollout) -> [B]: the proxy reward (normalised and combined as configured); prompts: the rl-split
    pool (tokens, mask) [R, P]; feedback: the labelled data the reward model was trained on (for offline
    methods such as DPO); hparams: the RL hyper-parameters (Python values or traced scalars).
    """

    config: PipelineConfig
    model: LanguageModel
    sft_params: Params
    score: Callable[[Rollout], jax.Array]
    prompts: tuple[jax.Array, jax.Array]
    feedback: FeedbackData
    generation: GenerationConfig
    hparams: RLHParams


class RLMethod(NamedTuple):
    """An RL method as three pure functions; ``step`` draws its own prompts (or data) from its key."""

    init: Callable[[jax.Array], Any]
    step: Callable[[Any, jax.Array], tuple[Any, Metrics]]
    policy: Callable[[Any], Params]


RLMethodBuilder = Callable[[RLContext], RLMethod]
_METHODS: dict[str, RLMethodBuilder] = {}


def register_rl_method(name: str, builder: RLMethodBuilder) -> None:
    """Make ``builder`` the method ``name`` (``rl.method`` in the config; its hyper-parameters live in the
    section ``rl.<name>``)."""
    _METHODS[name] = builder


def build_rl_method(ctx: RLContext) -> RLMethod:
    """The method ``ctx.config.rl.method`` built from ``ctx``."""
    name = ctx.config.rl.method
    if name not in _METHODS:
        raise ValueError(f"rl.method: no RL method {name!r} in the pipeline; known: {sorted(_METHODS)}")
    return _METHODS[name](ctx)


def sample_prompt_batch(key: jax.Array, prompts: tuple[jax.Array, jax.Array], batch_size: int) -> dict:
    """``batch_size`` distinct prompts of the pool, drawn by ``key``: {"tokens", "mask"} [B, P]."""
    index = jax.random.choice(key, prompts[0].shape[0], (batch_size,), replace=False)
    return {"tokens": prompts[0][index], "mask": prompts[1][index]}


def actor_critic_method(ctx: RLContext) -> RLMethod:
    """PPO or A2C (by ``rl.method``) with the trainer's phases: generate → score → experience → update.

    The policy starts from the SFT LM (with a zero value head for a shared critic; a separate critic is
    the SFT backbone with a zero value head and its own optimiser) and is KL-tied to the SFT policy.
    """
    rl = ctx.config.rl
    cfg = with_hparams(rl.algorithm, ctx.hparams)
    updates = rl.iterations * (cfg.epochs * cfg.num_minibatches if isinstance(cfg, PPOConfig) else 1)
    optimizer = make_optimizer(rl.optimizer, updates, ctx.hparams.learning_rate)
    separate = cfg.critic == "separate"
    critic_optimizer = make_optimizer(rl.optimizer, updates, ctx.hparams.learning_rate) if separate else None
    phases = make_rl_phases(ctx.model, ctx.model, ctx.model if separate else None, cfg, ctx.generation,
                            ctx.score, optimizer, critic_optimizer)
    iteration = make_rl_iteration(phases, PolicyParams(ctx.sft_params))
    head = init_value_head(ctx.model.config.hidden_size)

    def init(key: jax.Array):
        del key  # deterministic: the SFT policy and zero value heads
        policy = PolicyParams(ctx.sft_params, None if separate else head)
        critic = CriticParams(ctx.sft_params, head) if separate else None
        return create_rl_state(policy, optimizer, kl_controller(cfg).init(), critic, critic_optimizer)

    def step(state, key: jax.Array):
        prompt_key, iteration_key = jax.random.split(key)
        state, out = iteration(state, sample_prompt_batch(prompt_key, ctx.prompts, rl.batch_size),
                               iteration_key)
        return state, out.metrics

    return RLMethod(init, step, lambda state: state.policy.params.lm)


register_rl_method("ppo", actor_critic_method)
register_rl_method("a2c", actor_critic_method)


class RLOutput(NamedTuple):
    """The final policy's LM, per-iteration metrics [T] and the evaluation curve: an :class:`EvalPoint`
    whose fields are [points + 1, M] (the SFT policy first, then after every T / points iterations)."""

    policy: Params
    metrics: Metrics
    curve: EvalPoint


def run_rl(method: RLMethod, evaluate: Callable[[Params], EvalPoint], iterations: int, points: int,
           key: jax.Array) -> RLOutput:
    """``iterations`` steps of ``method`` in ``points`` segments, the policy evaluated before the first and
    after every segment.

    One ``lax.scan`` over points + 1 segments, each evaluating the policy and then (but for the last) running
    its ``lax.scan`` of steps: the evaluation and the step are each traced once, which keeps the program (and
    its compile time) small.
    """
    if iterations % points:
        raise ValueError(f"run_rl: {iterations} iterations do not split into {points} evaluation segments")
    init_key, steps_key = jax.random.split(key)
    state = method.init(init_key)
    length = iterations // points
    keys = jax.random.split(steps_key, (points, length))  # a raw uint32 key too (PRNGKey)
    keys = jnp.concatenate([keys, keys[:1]])  # the last segment only evaluates

    def segment(state, xs):
        index, segment_keys = xs
        point = evaluate(method.policy(state))
        run = lambda state: jax.lax.scan(method.step, state, segment_keys)
        shapes = jax.eval_shape(run, state)[1]
        skip = lambda state: (state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
        state, metrics = jax.lax.cond(index < points, run, skip, state)
        return state, (metrics, point)

    state, (metrics, curve) = jax.lax.scan(segment, state, (jnp.arange(points + 1), keys))
    metrics = jax.tree.map(lambda x: x[:points].reshape(iterations, *x.shape[2:]), metrics)
    return RLOutput(method.policy(state), metrics, curve)

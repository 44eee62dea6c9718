"""Value-based RL for the oracle comparison: ILQL trained offline on a policy's own samples scored by a
reward, then value-guided decoding at several β.

    result = train_value_based(model, sft_params, reward_fn, prompt_tokens, prompt_mask, key, generation,
                               ValueBasedBudget(samples_per_prompt=4, steps=200))
    sample = result.sampler(beta)               # (prompt_tokens, prompt_mask, key) -> Rollout
    rollout = sample(eval_tokens, eval_mask, key)
    rollout.kl                                  # [R] Σ_t KL(π_β ‖ π_SFT) along each response (exact per step)

The backbone is frozen (``ILQLConfig.freeze_backbone``, the default here), so the guided policy's base is the
given policy itself and ``rollout.kl`` is the KL to it; β = 0 samples that policy. Feedback budget: the
reward is called once per sample, ``len(prompts) · samples_per_prompt`` calls in all.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.models.transformer import LanguageModel, Params
from jaxrlhf.rollout.generate import GenerationConfig, Rollout, generate
from jaxrlhf.rollout.guidance import ValueGuidance, value_guidance
from jaxrlhf.steps.ilql import ILQLConfig, create_ilql_state, init_ilql_params, make_ilql_step
from jaxrlhf.steps.params import ILQLParams

log = logging.getLogger("jaxrlhf")

RewardFn = Callable[[Rollout], Any]  # rollout -> [R] rewards (host or device array), one per row
# (prompt_tokens [B, P], prompt_mask [B, P], key) -> Rollout
Sampler = Callable[[Any, Any, jax.Array], Rollout]


@dataclasses.dataclass(frozen=True)
class ValueBasedBudget:
    """How much data and training ILQL gets. ``samples_per_prompt`` responses of the policy per prompt are
    scored once each (the feedback budget); ``steps`` updates on minibatches of ``batch_size`` rows drawn
    with replacement across steps (without within a step)."""

    samples_per_prompt: int = 4
    steps: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    prompts_per_call: int = 256  # prompts per generate call while collecting samples
    ilql: ILQLConfig = dataclasses.field(default_factory=lambda: ILQLConfig(freeze_backbone=True))

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "steps", "batch_size", "prompts_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"ValueBasedBudget.{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"ValueBasedBudget.learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass
class ValueBasedResult:
    """ILQL's learned heads on the policy and what evaluating value-guided decoding needs."""

    model: LanguageModel
    params: Params  # the policy's LM params (the base of guided decoding)
    ilql: ILQLParams  # the learned heads (and the backbone, unchanged when frozen)
    generation: GenerationConfig  # sampling settings of the samplers (group_size 1)
    history: list[dict[str, float]]  # the step metrics (loss/ilql, q/mean, v/mean, td/error, …), one per step
    data_reward: float  # mean reward of the policy's scored samples (the offline data)
    samples: int  # rewards used (the feedback budget spent)

    def guidance(self, beta: float) -> ValueGuidance:
        """The decode-time guidance at strength β (the target Q heads, as ILQL decodes)."""
        return value_guidance(self.ilql.target_q_heads, beta)

    def sampler(self, beta: float, generation: GenerationConfig | None = None) -> Sampler:
        """``sample(prompt_tokens, prompt_mask, key) -> Rollout`` of π_β ∝ π·exp(β·(Q − V)); the rollout's
        ``logprobs`` are log π_β and its ``kl`` [R] the KL to the base along each response: the policy when
        the backbone is frozen, else ILQL's trained backbone. One compiled program for every β."""
        config = generation or self.generation
        guidance = self.guidance(beta)
        # The heads read the hidden states of the backbone they were trained on (the policy's when frozen).
        lm = self.ilql.lm

        def sample(prompt_tokens: Any, prompt_mask: Any, key: jax.Array) -> Rollout:
            return generate(self.model, lm, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), key, config,
                            guidance)

        return sample


def collect(model: LanguageModel, params: Params, reward_fn: RewardFn, prompt_tokens: np.ndarray,
            prompt_mask: np.ndarray, key: jax.Array, generation: GenerationConfig,
            budget: ValueBasedBudget) -> dict[str, np.ndarray]:
    """The policy's ``samples_per_prompt`` samples per prompt as a rating batch (``tokens, mask, loss_mask``
    [R, P+N], ``ratings`` [R]), each scored once by ``reward_fn``."""
    config = dataclasses.replace(generation, group_size=budget.samples_per_prompt)
    parts: list[dict[str, np.ndarray]] = []
    for i, start in enumerate(range(0, len(prompt_tokens), budget.prompts_per_call)):
        rows = slice(start, start + budget.prompts_per_call)
        rollout = generate(model, params, jnp.asarray(prompt_tokens[rows]), jnp.asarray(prompt_mask[rows]),
                           jax.random.fold_in(key, i), config)
        rewards = np.asarray(reward_fn(rollout), np.float32).reshape(-1)
        if rewards.shape != (rollout.sequences.shape[0],):
            raise ValueError(f"train_value_based: reward_fn returned {rewards.shape[0]} rewards for "
                             f"{rollout.sequences.shape[0]} rollout rows")
        if not np.all(np.isfinite(rewards)):
            raise ValueError(f"train_value_based: reward_fn returned non-finite rewards (rows "
                             f"{np.flatnonzero(~np.isfinite(rewards))[:5].tolist()} of call {i})")
        response_mask = np.asarray(rollout.response_mask, np.int32)
        prompt_part = np.zeros((response_mask.shape[0], prompt_tokens.shape[1]), np.int32)
        parts.append({"tokens": np.asarray(rollout.sequences, np.int32),
                      "mask": np.asarray(rollout.sequence_mask, np.int32),
                      "loss_mask": np.concatenate([prompt_part, response_mask], axis=1),
                      "ratings": rewards})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def train_value_based(
    model: LanguageModel,
    params: Params,
    reward_fn: RewardFn,
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    key: jax.Array,
    generation: GenerationConfig,
    budget: ValueBasedBudget = ValueBasedBudget(),
) -> ValueBasedResult:
    """Train ILQL offline on the policy's samples scored by ``reward_fn`` and return the guided samplers.

    model, params: the (SFT) policy. reward_fn(rollout) -> [R] rewards of a :class:`Rollout`'s rows.
    prompt_tokens, prompt_mask: [B, P] left-padded prompts. generation: lengths, stop/pad tokens and
    temperature of both the data collection and the samplers (its ``group_size`` is ignored).
    """
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(f"train_value_based: prompt_tokens {prompt_tokens.shape} and prompt_mask "
                         f"{prompt_mask.shape} must be equal [B, P] shapes")
    sample_key, init_key, order_key = jax.random.split(key, 3)
    data = collect(model, params, reward_fn, prompt_tokens, prompt_mask, sample_key, generation, budget)
    rows = len(data["ratings"])
    batch_size = min(budget.batch_size, rows)
    cfg = budget.ilql
    optimizer = optax.adam(budget.learning_rate)
    state = create_ilql_state(init_ilql_params(init_key, model, params, cfg), optimizer, cfg)
    step = jax.jit(make_ilql_step(model, optimizer, cfg))
    rng = np.random.default_rng(np.asarray(jax.random.key_data(order_key)).ravel().tolist())
    history = []
    for _ in range(budget.steps):
        chosen = rng.choice(rows, batch_size, replace=False)
        state, metrics = step(state, {k: v[chosen] for k, v in data.items()}, jax.random.key(0))
        history.append(metrics)
    history = [{k: float(v) for k, v in m.items()} for m in jax.device_get(history)]
    last = history[-1]
    log.info("value-based: ILQL on %d scored samples (mean reward %.4g), %d steps: loss/ilql %.4g, "
             "td/error %.4g", rows, float(np.mean(data["ratings"])), budget.steps, last["loss/ilql"],
             last["td/error"])
    ilql = state.params
    if cfg.freeze_backbone:
        ilql = ilql._replace(lm=params)  # the same arrays: the sampler's base is exactly the policy
    return ValueBasedResult(model, params, ilql, dataclasses.replace(generation, group_size=1), history,
                            float(np.mean(data["ratings"])), rows)

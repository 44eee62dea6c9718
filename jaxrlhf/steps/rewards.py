"""Where a rollout's score comes from: a reward model, or a registered function of (prompt, response).

- :class:`RewardModelScorer` — a reward model's (optionally normalised) score; jittable.
- reward functions — ``fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]``. A
  *jittable* one works on jnp arrays inside the jitted RL step; a *host* one gets numpy arrays and returns
  numpy [B], called once per batch (never per token) outside jit.

``get_reward_fn`` resolves a registered name (``"length"``), a parametrised built-in
(``"token_count:7"``), or an import path (``"package.module:function"`` / ``"package.module.function"``;
the function is a host function unless it has an attribute ``jittable = True``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.config import import_object
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl.reward_norm import RewardNormalization, normalize_rewards
from jaxrlhf.rollout.generate import Rollout
from jaxrlhf.steps.reward_model import make_reward_scorer

RewardFnType = Callable[[Any, Any, Any, Any], Any]


@dataclasses.dataclass(frozen=True, eq=False)
class RewardModelScorer:
    """``scorer(params, rollout) -> [B]``: gain·r + bias of the reward model's score of each full sequence.

    ``params`` are the reward model's ``{"lm": …, "reward_head": …}``; ``normalization`` None means gain 1,
    bias 0; ``micro_batch_size`` scores the batch in chunks (see ``make_reward_scorer``). Jittable.
    """

    model: LanguageModel
    normalization: RewardNormalization | None = None
    micro_batch_size: int | None = None

    def __call__(self, params: Any, rollout: Rollout) -> jax.Array:
        score = make_reward_scorer(self.model, self.micro_batch_size)
        rewards = score(params, rollout.sequences, rollout.sequence_mask)
        return rewards if self.normalization is None else normalize_rewards(self.normalization, rewards)


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """A programmatic reward: ``fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]``."""

    name: str
    fn: RewardFnType
    jittable: bool

    def __call__(self, prompt_tokens: Any, prompt_mask: Any, response_tokens: Any, response_mask: Any) -> Any:
        return self.fn(prompt_tokens, prompt_mask, response_tokens, response_mask)

    def score_rollout(self, rollout: Rollout) -> Any:
        """[B] float32 scores of a rollout: jnp (traceable) for a jittable fn; numpy for a host fn, whose
        inputs are fetched to the host here (so call that outside jit, once per batch)."""
        inputs = rollout_reward_inputs(rollout)
        batch = rollout.sequences.shape[0]
        if self.jittable:
            scores = jnp.asarray(self.fn(*inputs), jnp.float32)
        else:
            scores = np.asarray(self.fn(*(np.asarray(x) for x in inputs)), np.float32)
        if scores.shape != (batch,):
            raise ValueError(
                f"reward function {self.name!r} returned shape {scores.shape}, expected ({batch},)"
            )
        return scores


def rollout_reward_inputs(rollout: Rollout) -> tuple[Any, Any, Any, Any]:
    """(prompt_tokens, prompt_mask [B, P], response_tokens, response_mask [B, N]) of a rollout."""
    p = rollout.sequences.shape[1] - rollout.response_mask.shape[1]
    return (rollout.sequences[:, :p], rollout.sequence_mask[:, :p], rollout.response_tokens,
            rollout.response_mask)


_REGISTRY: dict[str, RewardFunction] = {}
# Built-ins taking one argument after a colon ("token_count:7"): name -> (factory(arg), jittable).
_FACTORIES: dict[str, tuple[Callable[[str], RewardFnType], bool]] = {}


def register_reward_fn(name: str, fn: RewardFnType, jittable: bool, overwrite: bool = False) -> None:
    """Register ``fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]`` as ``name``."""
    if not name or ":" in name:
        raise ValueError(f"reward function name {name!r} must be non-empty and contain no ':'")
    if (name in _REGISTRY or name in _FACTORIES) and not overwrite:
        raise ValueError(f"a reward function named {name!r} is already registered (pass overwrite=True)")
    if not callable(fn):
        raise TypeError(f"register_reward_fn({name!r}): expected a callable, got {fn!r}")
    _REGISTRY[name] = RewardFunction(name, fn, bool(jittable))


def registered_reward_fns() -> list[str]:
    """Registered names, with ``name:<arg>`` for the parametrised built-ins."""
    return sorted([*_REGISTRY, *(f"{n}:<arg>" for n in _FACTORIES)])


def get_reward_fn(name_or_path: str) -> RewardFunction:
    """A :class:`RewardFunction` by registered name, ``builtin:<arg>``, or import path."""
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    prefix, _, arg = name_or_path.partition(":")
    if prefix in _FACTORIES:
        factory, jittable = _FACTORIES[prefix]
        return RewardFunction(name_or_path, factory(arg), jittable)
    if "." in name_or_path:
        fn = import_object(name_or_path, "reward function")
        if isinstance(fn, RewardFunction):
            return fn
        if not callable(fn):
            raise ValueError(f"reward function {name_or_path!r} resolved to {fn!r}, which is not callable")
        return RewardFunction(name_or_path, fn, bool(getattr(fn, "jittable", False)))
    raise ValueError(
        f"unknown reward function {name_or_path!r}; registered: {registered_reward_fns()}; "
        "or give an import path 'package.module:function'"
    )


# ------------------------------------------------------------------------------------------- built-ins


def _token_id(name: str, arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise ValueError(f"reward function {name}:{arg!r}: expected an integer token id") from None


def token_count_reward(token_id: int) -> RewardFnType:
    """r = Σ_t m_t·[y_t = token_id] / Σ_t m_t: the share of response tokens equal to ``token_id`` (0 for
    an empty response). Jittable."""

    def reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
        del prompt_tokens, prompt_mask
        m = jnp.asarray(response_mask).astype(jnp.float32)
        hits = jnp.sum((jnp.asarray(response_tokens) == token_id) * m, axis=1)
        return hits / jnp.maximum(jnp.sum(m, axis=1), 1.0)

    return reward


def length_reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
    """r = Σ_t m_t / N: the share of the maximum response length used. Jittable."""
    del prompt_tokens, prompt_mask, response_tokens
    m = jnp.asarray(response_mask).astype(jnp.float32)
    return jnp.sum(m, axis=1) / m.shape[1]


_FACTORIES["token_count"] = (lambda arg: token_count_reward(_token_id("token_count", arg)), True)
register_reward_fn("length", length_reward, jittable=True)

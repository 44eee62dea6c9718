"""One typed layout for each model's parameters (NamedTuple pytrees: they jit, shard and checkpoint as is).

- :class:`PolicyParams` — a policy: its language model and, with a shared critic, the value head on the same
  backbone (``None`` otherwise). A KL reference policy is a ``PolicyParams`` without a value head.
- :class:`CriticParams` — a separate critic: its own backbone and value head.
- :class:`RewardModelParams` — a reward model: backbone and scalar reward head.
- :class:`ILQLParams` — ILQL's learner: backbone, Q heads over the vocabulary, V head, target Q heads.

An SFT model is its bare LM params (``jaxrlhf.models.transformer.Params``): there is nothing beside the LM.
Checkpoints store a NamedTuple by its field names, so an RL checkpoint holds the policy's LM at
``rl/policy/params/lm``. A later field (e.g. LoRA adapters) goes at the end with a default, so that the
existing constructors keep working.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jaxrlhf.models.transformer import Params

HeadParams = Any  # a head's params: {"proj": {"kernel", "bias"}} (jaxrlhf.models.heads)


class PolicyParams(NamedTuple):
    """A policy: the LM, and the value head of a shared critic (``None``: no value head)."""

    lm: Params
    value_head: HeadParams | None = None


class CriticParams(NamedTuple):
    """A separate critic: its own backbone and the value head read at every response position."""

    lm: Params
    value_head: HeadParams


class RewardModelParams(NamedTuple):
    """A reward model: backbone and the scalar head read at each sequence's last real token."""

    lm: Params
    reward_head: HeadParams


class ILQLParams(NamedTuple):
    """ILQL's Q/V learner on an LM backbone (``jaxrlhf.steps.ilql``): the backbone, the online Q heads over
    the vocabulary (usually two), the scalar V head, and the Polyak-averaged target Q heads (never trained by
    the gradient: the step moves them towards the online heads)."""

    lm: Params
    q_heads: tuple[HeadParams, ...]
    v_head: HeadParams
    target_q_heads: tuple[HeadParams, ...]

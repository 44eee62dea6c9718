"""Hyper-parameters of the actor-critic RL methods: :class:`RLConfig` (shared) and what PPO / A2C add.

Defaults follow RLHF_REFERENCE.md. Each field is defined once; where an algorithm has its own default (λ, the
value-loss coefficient), the shared field defaults to ``None``, meaning "the algorithm's default", and holds
that number after construction (so a saved config shows the value used).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Advantages, rewards, the KL tie to the reference, and the critic, shared by PPO and A2C.

    gamma, lam: GAE's discount and λ (λ = 1: Monte-Carlo / n-step returns; ``None``: the algorithm's
    default, PPO 0.95, A2C 1.0). whiten_advantages / whiten_rewards: masked whitening over the batch.

    KL: kl_in_reward True puts −β·k(π, π_ref) per token in the reward (classic); False adds β·masked_mean(k)
    to the loss (GRPO style; the reward is then the score alone). kl_estimator k is "k1" (log π − log π_ref),
    "k2" (½(log r)²) or "k3" ((r − 1) − log r), r = π_ref/π; ``None`` picks k1 in the reward and k2 in the
    loss. In the loss, on samples of π, k1's expected gradient is 0 (the tie would silently vanish), so that
    combination is refused; k2's expected gradient is ∇KL(π‖π_ref) and k3's is ∇KL(π_ref‖π). The logged KL
    (``objective/kl``) and the adaptive controller use the same estimator. kl_coef: β (the initial β when
    adaptive_kl, which steers the KL towards kl_target over kl_horizon episodes).

    missing_eos_penalty: subtracted from the score of a response without eos. temperature: of sampling and
    of every log-prob (policy, reference, KL). vf_coef (``None``: PPO 0.1, A2C 0.5) and entropy_coef weigh
    the value loss and the entropy bonus. grad_accum_steps: micro-batches per gradient. critic: "shared"
    (a value head on the policy's backbone) or "separate" (its own model and optimiser).
    bootstrap_truncated: a response cut at the length limit bootstraps from the critic's value of its final
    state; off by default, since the score at its last token already rates the whole (truncated) response
    and the final state's value is never trained.

    Traced values: inside a jitted function (the vmapped sweeps of ``jaxrlhf.experiments.pipeline``) the
    numeric fields kl_coef, missing_eos_penalty, vf_coef, entropy_coef, kl_target (and PPO's clip_eps and
    vf_clip_eps) may hold traced scalars, and so may the choices whiten_advantages, whiten_rewards and
    adaptive_kl as 0./1. (:func:`jaxrlhf.steps.choice.choose`); the other fields shape the program.
    """

    #: The algorithm's defaults for the fields left ``None``.
    ALGORITHM_DEFAULTS: ClassVar[dict[str, float]] = {"lam": 0.95, "vf_coef": 0.1}

    gamma: float = 1.0
    lam: float | None = None
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    kl_in_reward: bool = True
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    missing_eos_penalty: float = 1.0
    temperature: float = 1.0
    vf_coef: float | None = None
    entropy_coef: float = 0.0
    grad_accum_steps: int = 1
    critic: Literal["shared", "separate"] = "shared"
    bootstrap_truncated: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key, value in self.ALGORITHM_DEFAULTS.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.kl_estimator is not None and self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"{name}.kl_estimator: expected k1, k2, k3 or null, got {self.kl_estimator!r}")
        if not self.kl_in_reward and self.kl_estimator == "k1":
            raise ValueError(
                f"{name}.kl_estimator: k1 cannot be the KL in the loss (kl_in_reward: false): on samples "
                "of π its expected gradient is 0, so the tie to the reference would vanish; use k2 (gradient "
                "of KL(π‖π_ref)), k3 (of KL(π_ref‖π)) or null (k2), or put the KL in the reward"
            )
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"{name}.critic: expected 'shared' or 'separate', got {self.critic!r}")
        if self.temperature <= 0:
            raise ValueError(f"{name}.temperature must be > 0, got {self.temperature}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"{name}.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")

    @property
    def effective_kl_estimator(self) -> Literal["k1", "k2", "k3"]:
        """``kl_estimator``, or its default: k1 when the KL is in the reward, k2 when it is in the loss."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.kl_in_reward else "k2"


@dataclasses.dataclass(frozen=True)
class PPOConfig(RLConfig):
    """PPO on top of :class:`RLConfig`: epochs × minibatches of the clipped losses.

    clip_eps: the ratio clip ε. dual_clip: c > 1 bounds the loss of negative advantages (None: off).
    vf_clip_eps: value-loss clip (None: unclipped). target_kl_early_stop: stop updating once a minibatch's
    approx-KL exceeds 1.5 × this value (None: never).
    """

    epochs: int = 4
    num_minibatches: int = 1
    clip_eps: float = 0.2
    dual_clip: float | None = None
    vf_clip_eps: float | None = 0.2
    target_kl_early_stop: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError(f"PPOConfig: epochs ({self.epochs}) and num_minibatches "
                             f"({self.num_minibatches}) must be >= 1")


@dataclasses.dataclass(frozen=True)
class A2CConfig(RLConfig):
    """A2C (RL4LMs style): one gradient step per batch, no ratio, no clipping; λ = 1 and vf_coef 0.5 by
    default."""

    ALGORITHM_DEFAULTS: ClassVar[dict[str, float]] = {"lam": 1.0, "vf_coef": 0.5}

"""Hyper-parameters of the RL methods, each field defined once:

- :class:`RLConfig` — what every on-policy method shares: the KL tie to the reference, the temperature, the
  missing-EOS penalty, the entropy bonus, gradient accumulation;
- :class:`ActorCriticConfig` — what a learned critic adds (GAE, whitening, the value loss, the critic's
  placement); :class:`ClippedEpochsConfig` — epochs × minibatches of a clipped-ratio update;
- :class:`PPOConfig` (actor-critic + clipped epochs), :class:`A2CConfig` (actor-critic, one step), and the
  critic-free :class:`PGConfig` (clipped epochs + a group of samples per prompt) with its two commands'
  defaults, :class:`GRPOConfig` and :class:`RLOOConfig`.

Defaults follow RLHF_REFERENCE.md. Where an algorithm has its own default (λ, the value-loss coefficient,
the KL's placement, the epochs, the advantage estimator, the loss aggregation), the field defaults to
``None``, meaning "the algorithm's default" (``ALGORITHM_DEFAULTS``), and holds that value after
construction (so a saved config shows the value used).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

from jaxrlhf.config import is_number, is_whole_number
from jaxrlhf.rollout.sampling import check_temperature

KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
# Estimators whose baseline comes from the other samples of the same prompt.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum_norm")
RATIOS = ("token", "sequence", "none")
LOGPROBS_FROM = ("recompute", "rollout")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The KL tie to the reference and what every on-policy RL method shares.

    KL: kl_in_reward True puts −β·k(π, π_ref) per token in the reward (classic); False adds β·k to the loss
    (GRPO style; the reward is then the score alone). ``None``: the algorithm's default (in the reward for
    PPO, A2C and RLOO; in the loss for GRPO). kl_estimator k is "k1" (log π − log π_ref), "k2" (½(log r)²) or
    "k3" ((r − 1) − log r), r = π_ref/π; ``None`` picks k1 in the reward and k2 in the loss. In the loss, on
    samples of π, k1's expected gradient is 0 (the tie would silently vanish), so that combination is
    refused; k2's expected gradient is ∇KL(π‖π_ref) and k3's is ∇KL(π_ref‖π). The logged KL
    (``objective/kl``) and the adaptive controller use the same estimator. kl_coef: β (the initial β when
    adaptive_kl, which steers the KL towards kl_target over kl_horizon episodes).

    missing_eos_penalty: subtracted from the score of a response without eos. temperature: of sampling and
    of every log-prob (policy, reference, KL). entropy_coef weighs the entropy bonus. grad_accum_steps:
    micro-batches per gradient.

    logprobs_from: where the behaviour (old) log-probs come from. "recompute" (default): a forward pass of
    the policy over the finished sequences in the experience phase, in the update's micro-batch shapes, so
    that the first minibatch's PPO ratio is 1 to the last bit, also in bfloat16
    (``jaxrlhf.steps.experience``). "rollout": the log-probs generation sampled with, and a shared critic's
    values read off the same decode steps (no policy forward in the experience phase); equal to a recompute
    only up to the rounding of a different program (~1e-7 in float32, ~1e-2 in bfloat16), and refused with
    filtered sampling. tis_cap: truncated importance sampling — with "recompute", weigh each token's
    policy-gradient term by min(π_old/π_sampler, tis_cap), π_sampler the rollout's log-prob (for samplers
    that differ from the trainer by design); ``None``: off.

    Traced values: inside a jitted function (the vmapped sweeps of ``jaxrlhf.experiments.pipeline``) the
    numeric fields kl_coef, missing_eos_penalty, vf_coef, entropy_coef, kl_target (and PPO's clip_eps and
    vf_clip_eps) may hold traced scalars, and so may the choices whiten_advantages, whiten_rewards and
    adaptive_kl as 0./1. (:func:`jaxrlhf.steps.choice.choose`); the other fields shape the program.
    """

    #: The algorithm's defaults for the fields left ``None``.
    ALGORITHM_DEFAULTS: ClassVar[dict[str, Any]] = {"kl_in_reward": True}

    # −β·KL per token in the reward, else β·KL in the loss (null: the method's default)
    kl_in_reward: bool | None = None
    kl_estimator: Literal["k1", "k2", "k3"] | None = None  # null: k1 in the reward, k2 in the loss
    kl_coef: float = 0.05  # β (the initial β with adaptive_kl)
    adaptive_kl: bool = False  # steer β towards kl_target over kl_horizon episodes
    kl_target: float = 6.0
    kl_horizon: int = 10000
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response without eos
    temperature: float = 1.0  # of sampling and of every log-prob
    entropy_coef: float = 0.0
    grad_accum_steps: int = 1  # micro-batches per gradient
    logprobs_from: Literal["recompute", "rollout"] = "recompute"  # old log-probs: a forward, or sampling's
    tis_cap: float | None = None  # truncated importance sampling cap C on π_old/π_sampler (null: off)

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
        check_temperature(f"{name}.temperature", self.temperature)
        _check_range(name, "kl_coef", self.kl_coef, 0.0, None)
        _check_range(name, "kl_target", self.kl_target, 0.0, None, low_open=True)
        if not self.kl_horizon >= 1:  # NaN fails too
            raise ValueError(f"{name}.kl_horizon must be >= 1, got {self.kl_horizon}")
        for key in ("missing_eos_penalty", "entropy_coef"):  # either sign has a meaning; NaN and ±inf none
            _check_finite(name, key, getattr(self, key))
        if self.grad_accum_steps < 1:
            raise ValueError(f"{name}.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.logprobs_from not in LOGPROBS_FROM:
            raise ValueError(f"{name}.logprobs_from: expected one of {', '.join(LOGPROBS_FROM)}, "
                             f"got {self.logprobs_from!r}")
        if self.tis_cap is not None:
            if not self.tis_cap > 0:
                raise ValueError(f"{name}.tis_cap must be > 0 (null: off), got {self.tis_cap}")
            if self.logprobs_from == "rollout":
                raise ValueError(f"{name}.tis_cap: truncated importance sampling weighs π_old/π_sampler, "
                                 "which is 1 when the old log-probs are the sampler's; set logprobs_from: "
                                 "recompute or tis_cap: null")

    @property
    def effective_kl_estimator(self) -> Literal["k1", "k2", "k3"]:
        """``kl_estimator``, or its default: k1 when the KL is in the reward, k2 when it is in the loss."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.kl_in_reward else "k2"


@dataclasses.dataclass(frozen=True)
class ActorCriticConfig(RLConfig):
    """A learned critic: GAE advantages and a value loss (PPO and A2C).

    gamma, lam: GAE's discount and λ (λ = 1: Monte-Carlo / n-step returns; ``None``: the algorithm's
    default, PPO 0.95, A2C 1.0). whiten_advantages / whiten_rewards: masked whitening over the batch.
    vf_coef (``None``: PPO 0.1, A2C 0.5) weighs the value loss. critic: "shared" (a value head on the
    policy's backbone) or "separate" (its own model and optimiser). bootstrap_truncated: a response cut at
    the length limit bootstraps from the critic's value of its final state; off by default, since the score
    at its last token already rates the whole (truncated) response and the final state's value is never
    trained.
    """

    gamma: float = 1.0  # GAE discount
    lam: float | None = None  # GAE λ (null: PPO 0.95, A2C 1.0)
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    vf_coef: float | None = None  # value-loss weight (null: PPO 0.1, A2C 0.5)
    critic: Literal["shared", "separate"] = "shared"  # a value head on the policy, or its own model
    bootstrap_truncated: bool = False  # a response cut at the length limit bootstraps from its final value

    def __post_init__(self) -> None:
        super().__post_init__()  # lam and vf_coef hold the algorithm's defaults from here on
        name = type(self).__name__
        _check_range(name, "gamma", self.gamma, 0.0, 1.0)
        _check_range(name, "lam", self.lam, 0.0, 1.0)
        _check_range(name, "vf_coef", self.vf_coef, 0.0, None)
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"{type(self).__name__}.critic: expected 'shared' or 'separate', "
                             f"got {self.critic!r}")


@dataclasses.dataclass(frozen=True)
class ClippedEpochsConfig(RLConfig):
    """Epochs × minibatches of a clipped-ratio update (PPO and the critic-free methods).

    epochs (``None``: PPO 4, critic-free 1, GRPO's μ): passes over each batch; num_minibatches: minibatches
    per epoch. clip_eps: the ratio clip ε (ε_low); clip_eps_high: ε_high of an asymmetric clip (DAPO's
    "clip-higher", e.g. 0.28 with ε_low 0.2; ``None``: symmetric). dual_clip: c > 1 bounds the loss of
    negative advantages (None: off). target_kl_early_stop: stop updating once a minibatch's approx-KL exceeds
    1.5 × this value (None: never).
    """

    epochs: int | None = None  # passes over each batch (null: PPO 4, critic-free 1)
    num_minibatches: int = 1  # per epoch
    clip_eps: float = 0.2  # ratio clip ε (ε_low)
    clip_eps_high: float | None = None  # ε_high > ε_low: DAPO's clip-higher (null: symmetric)
    dual_clip: float | None = None  # c > 1 bounds the loss of negative advantages
    target_kl_early_stop: float | None = None  # stop once a minibatch's approx-KL > 1.5 × this

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.epochs < 1 or self.num_minibatches < 1:
            key = "epochs" if self.epochs < 1 else "num_minibatches"
            raise ValueError(f"{name}.{key}: epochs ({self.epochs}) and num_minibatches "
                             f"({self.num_minibatches}) must be >= 1")
        # clip_eps may be a traced scalar in a vmapped sweep: only a Python number is checked here.
        _check_range(name, "clip_eps", self.clip_eps, 0.0, None, low_open=True)
        _check_range(name, "clip_eps_high", self.clip_eps_high, 0.0, None, low_open=True)
        if is_number(self.clip_eps_high) and is_number(self.clip_eps) and self.clip_eps_high < self.clip_eps:
            raise ValueError(f"{name}.clip_eps_high must be >= clip_eps ({self.clip_eps}): it widens the "
                             f"clip above 1 (DAPO's clip-higher), got {self.clip_eps_high}")
        _check_range(name, "dual_clip", self.dual_clip, 1.0, None, low_open=True)
        _check_range(name, "target_kl_early_stop", self.target_kl_early_stop, 0.0, None, low_open=True)


def _check_finite(name: str, key: str, value: Any) -> None:
    """ValueError naming ``name.key`` when the Python number ``value`` is NaN or infinite."""
    if is_number(value) and not math.isfinite(value):
        raise ValueError(f"{name}.{key} must be a finite number, got {value}")


def _check_range(name: str, key: str, value: Any, low: float, high: float | None = None,
                 low_open: bool = False) -> None:
    """ValueError naming ``name.key`` unless the Python number ``value`` is finite, at least ``low`` (above
    it with ``low_open``) and at most ``high``. Written as ``not (...)``, so that NaN fails."""
    if not is_number(value):
        return
    above = value > low if low_open else value >= low
    if not (above and value <= (math.inf if high is None else high) and math.isfinite(value)):
        bound = f"{'>' if low_open else '>='} {low:g}"
        rule = f"in [{low:g}, {high:g}]" if high is not None else f"a finite number {bound}"
        raise ValueError(f"{name}.{key} must be {rule}, got {value}")


@dataclasses.dataclass(frozen=True)
class PPOConfig(ActorCriticConfig, ClippedEpochsConfig):
    """PPO: epochs × minibatches of the clipped policy loss, the (clipped) value loss and the entropy bonus.

    vf_clip_eps: value-loss clip (None: unclipped).
    """

    ALGORITHM_DEFAULTS: ClassVar[dict[str, Any]] = {"kl_in_reward": True, "lam": 0.95, "vf_coef": 0.1,
                                                    "epochs": 4}

    vf_clip_eps: float | None = 0.2  # value-loss clip (null: unclipped)

    def __post_init__(self) -> None:
        super().__post_init__()
        if is_number(self.vf_clip_eps) and not self.vf_clip_eps > 0:  # NaN fails too; inf: unclipped
            raise ValueError(f"{type(self).__name__}.vf_clip_eps must be > 0 (null: unclipped), "
                             f"got {self.vf_clip_eps}")


@dataclasses.dataclass(frozen=True)
class A2CConfig(ActorCriticConfig):
    """A2C (RL4LMs style): one gradient step per batch, no ratio, no clipping; λ = 1 and vf_coef 0.5 by
    default."""

    ALGORITHM_DEFAULTS: ClassVar[dict[str, Any]] = {"kl_in_reward": True, "lam": 1.0, "vf_coef": 0.5}


@dataclasses.dataclass(frozen=True)
class PGConfig(ClippedEpochsConfig):
    """Critic-free policy gradients: a group of ``group_size`` samples per prompt gives the baseline.

    advantage: the estimator (``jaxrlhf.rl.group_advantages``) — "grpo" ((r − mean)/(std + ε) in the group),
    "dr_grpo" (r − mean), "rloo" (r − mean of the others), "reinforce_pp" (KL-penalised token returns
    whitened over the batch), "reinforce_pp_baseline" (group mean subtracted first), "remax" (r − the reward
    of a greedy response to the same prompt, generated alongside). With the KL in the reward, a sequence
    estimator sees r = score − β·Σ_t k_t, REINFORCE++ the per-token penalty.
    ratio: "token" (PPO-clip per token, ε_low/ε_high), "sequence" (GSPO: exp of the mean token log-ratio,
    clipped per sequence; set clip_eps ≈ 3e-4, clip_eps_high ≈ 4e-4) or "none" (plain REINFORCE,
    −A·log π: one epoch of one minibatch only). loss_agg: how token losses become one number
    ("token_mean" DAPO, "sequence_mean" GRPO, "token_sum_norm" Dr. GRPO: Σ / (rows × max response length));
    the KL and entropy terms use the same.
    dynamic_sampling: DAPO's filter, groups whose scores are all equal get zero weight (they carry no
    signal; counted as ``groups/dropped``). overlong_buffer: DAPO's soft over-long penalty, from 0 at
    max_new_tokens − buffer down to −overlong_penalty at max_new_tokens, added to the score (0: off).
    """

    ALGORITHM_DEFAULTS: ClassVar[dict[str, Any]] = {"kl_in_reward": False, "epochs": 1, "advantage": "grpo",
                                                    "loss_agg": "sequence_mean"}

    group_size: int = 4  # samples per prompt (sequences per iteration: data.batch_size × this)
    # the estimator (null: grpo for `jaxrlhf grpo`, rloo for `jaxrlhf rloo`)
    advantage: (Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"]
                | None) = None
    ratio: Literal["token", "sequence", "none"] = "token"  # PPO-clip per token | GSPO | none: REINFORCE
    # null: sequence_mean (GRPO), token_sum_norm (RLOO); token_mean is DAPO's
    loss_agg: Literal["token_mean", "sequence_mean", "token_sum_norm"] | None = None
    dynamic_sampling: bool = False  # DAPO: zero weight for groups whose scores are all equal
    overlong_buffer: int = 0  # DAPO's soft over-long penalty over the last this-many tokens (0: off)
    overlong_penalty: float = 1.0  # the penalty at max_new_tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for key, value, allowed in (("advantage", self.advantage, ADVANTAGE_ESTIMATORS),
                                    ("ratio", self.ratio, RATIOS),
                                    ("loss_agg", self.loss_agg, LOSS_AGGREGATIONS)):
            if value not in allowed:
                raise ValueError(f"{name}.{key}: expected one of {', '.join(allowed)}, got {value!r}")
        needs_group = self.advantage in GROUP_ESTIMATORS or self.dynamic_sampling
        if not is_whole_number(self.group_size) or self.group_size < 1:
            raise ValueError(f"{name}.group_size must be a whole number >= 1, got {self.group_size!r}")
        if self.group_size < 2 and needs_group:
            why = (f"the {self.advantage!r} baseline comes from the other samples of the prompt"
                   if self.advantage in GROUP_ESTIMATORS else "dynamic_sampling compares a group's scores")
            raise ValueError(f"{name}.group_size: {self.group_size} is below 2, but {why}")
        if self.ratio == "none" and self.epochs * self.num_minibatches > 1:
            raise ValueError(
                f"{name}.ratio: 'none' (plain REINFORCE) is on-policy for the first minibatch only; set "
                f"epochs and num_minibatches to 1 (got {self.epochs} × {self.num_minibatches}) or use a ratio"
            )
        if self.ratio == "sequence" and self.tis_cap is not None:
            raise ValueError(f"{name}.tis_cap: truncated importance sampling weighs token terms; GSPO's "
                             "sequence ratio (ratio: sequence) has none, set tis_cap: null")
        if self.ratio == "sequence" and self.loss_agg != "sequence_mean":
            raise ValueError(f"{name}.loss_agg: GSPO's sequence ratio (ratio: sequence) averages over "
                             f"sequences; set loss_agg: sequence_mean, got {self.loss_agg!r}")
        if self.overlong_buffer < 0:
            raise ValueError(f"{name}.overlong_buffer must be >= 0 (0: off), got {self.overlong_buffer}")
        _check_range(name, "overlong_penalty", self.overlong_penalty, 0.0, None)
        ignored = [(key, why) for key, why, on in (
            ("dual_clip", "GSPO's sequence ratio (ratio: sequence) has no dual clip",
             self.dual_clip is not None and self.ratio == "sequence"),
            ("clip_eps_high", "ratio: none (REINFORCE) clips nothing",
             self.clip_eps_high is not None and self.ratio == "none"),
            ("dual_clip", "ratio: none (REINFORCE) clips nothing",
             self.dual_clip is not None and self.ratio == "none"),
        ) if on]
        if ignored:
            key, why = ignored[0]
            raise ValueError(f"{name}.{key}: {why}; set {key}: null")

    @property
    def greedy_baseline(self) -> bool:
        """Whether each prompt also gets a greedy response (ReMax's baseline)."""
        return self.advantage == "remax"


@dataclasses.dataclass(frozen=True)
class GRPOConfig(PGConfig):
    """``jaxrlhf grpo``: GRPO's defaults — group-normalised advantages, per-sequence token means, the KL
    (k2) in the loss, one epoch."""


@dataclasses.dataclass(frozen=True)
class RLOOConfig(PGConfig):
    """``jaxrlhf rloo``: RLOO's defaults — leave-one-out advantages, the KL (k1) in the reward, the token sum
    over a constant (the REINFORCE gradient of the whole response's log-prob), one epoch."""

    ALGORITHM_DEFAULTS: ClassVar[dict[str, Any]] = {"kl_in_reward": True, "epochs": 1, "advantage": "rloo",
                                                    "loss_agg": "token_sum_norm"}

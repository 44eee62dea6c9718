"""The optimiser of every step: AdamW after global-norm clipping, with a warm-up + decay schedule.

The learning rate is injected as a hyper-parameter (``optax.inject_hyperparams``), so the value used by the
last update is part of the optimiser state and a step can report it (:func:`current_learning_rate`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.config import is_number


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters and the learning-rate schedule.

    schedule: "linear" (decay to ``end_lr_factor``·lr at ``total_steps``), "cosine" (cosine decay to the
    same end value) or "constant"; all three start with ``warmup_steps`` of linear warm-up from 0.
    max_grad_norm: global-norm clipping threshold (``None`` or ≤ 0 turns clipping off).
    """

    learning_rate: float = 1e-5
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    warmup_steps: int = 0
    end_lr_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "constant", "cosine"):
            raise ValueError(
                f"OptimizerConfig.schedule: expected linear, constant or cosine, got {self.schedule!r}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        # Written as `not (finite and in range)`, so that NaN fails every range.
        ranges = {
            "learning_rate": (lambda x: x >= 0.0, ">= 0"),
            # the end of the decay as a fraction of learning_rate: below 0 the rate would turn negative, above
            # 1 the "decay" would raise it (an absolute end rate written here, most likely)
            "end_lr_factor": (lambda x: 0.0 <= x <= 1.0, "in [0, 1]"),
            "b1": (lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
            "b2": (lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
            "eps": (lambda x: x > 0.0, "> 0"),
            "weight_decay": (lambda x: x >= 0.0, ">= 0"),
        }
        for name, (valid, rule) in ranges.items():
            value = getattr(self, name)
            if is_number(value) and not (math.isfinite(value) and valid(value)):
                raise ValueError(f"OptimizerConfig.{name} must be a finite number {rule}, got {value}")
        if is_number(self.max_grad_norm) and math.isnan(self.max_grad_norm):
            raise ValueError(f"OptimizerConfig.max_grad_norm must be a number (null or <= 0: no clipping), "
                             f"got {self.max_grad_norm}")


def learning_rate_at(cfg: OptimizerConfig, total_steps: int, step: Any, peak: Any = None) -> jax.Array:
    """The learning rate of update number ``step`` (0-based; a traced or concrete integer) as float32.

    warm-up (step < W): lr·step/W;  then with p = clip((step − W)/(total_steps − W), 0, 1):
    linear lr·(1 − (1 − f)·p), cosine lr·(f + (1 − f)·½(1 + cos πp)), constant lr;  f = end_lr_factor.
    lr = ``peak`` when given (it may be traced: a learning-rate sweep), else ``cfg.learning_rate``.
    """
    step = jnp.asarray(step, jnp.float32)
    peak = cfg.learning_rate if peak is None else peak
    end = cfg.end_lr_factor
    warmup = float(cfg.warmup_steps)
    progress = jnp.clip((step - warmup) / max(float(total_steps) - warmup, 1.0), 0.0, 1.0)
    if cfg.schedule == "linear":
        decayed = peak * (1.0 - (1.0 - end) * progress)
    elif cfg.schedule == "cosine":
        decayed = peak * (end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    else:
        decayed = jnp.full_like(progress, peak)
    if cfg.warmup_steps > 0:
        decayed = jnp.where(step < warmup, peak * step / warmup, decayed)
    return decayed.astype(jnp.float32)


# What a peak learning rate must be (the experiment pipeline checks its swept ones by the same rule).
LEARNING_RATE_RULE: tuple[Callable[[float], bool], str] = (
    lambda x: 0 <= x < math.inf, "a finite number >= 0")


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, learning_rate: Any = None
) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_grad_norm)`` then AdamW with the scheduled learning rate.

    ``total_steps`` is the number of optimiser updates of the whole run (for PPO: iterations × epochs ×
    minibatches), over which the schedule decays. ``learning_rate``, when given, replaces
    ``cfg.learning_rate`` as the schedule's peak; it may be a traced scalar (a vmapped learning-rate sweep
    builds the optimiser inside the traced function).
    """
    if total_steps < 1:
        raise ValueError(f"make_optimizer: total_steps must be >= 1, got {total_steps}")
    valid, rule = LEARNING_RATE_RULE
    if is_number(learning_rate) and not valid(learning_rate):  # a traced one cannot be checked
        raise ValueError(f"make_optimizer: learning_rate must be {rule}, got {learning_rate}")

    def adamw(learning_rate):
        return optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

    schedule = lambda count: learning_rate_at(cfg, total_steps, count, learning_rate)
    scheduled = optax.inject_hyperparams(adamw)(learning_rate=schedule)
    if cfg.max_grad_norm is None or cfg.max_grad_norm <= 0:
        return scheduled
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), scheduled)


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of the last update, read from an optimiser state built by :func:`make_optimizer`
    (before any update: the rate the first update will use). NaN for an optimiser without an injected
    ``learning_rate`` hyper-parameter."""
    found = [
        s.hyperparams["learning_rate"]
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
        if hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams
    ]
    return jnp.asarray(found[0], jnp.float32) if found else jnp.full((), jnp.nan, jnp.float32)

"""Value guidance for the decode loop: each next-token distribution tilted by learned Q values,
π_β(a|s) ∝ π_base(a|s)·exp(β·(Q(s, a) − V(s))) (ILQL's decoding, Snell et al. 2022).

:func:`jaxrlhf.rollout.generate.generate` takes a :class:`ValueGuidance` and applies
:func:`guided_step` at every step inside its jitted loop. π_base is the distribution the unguided sampler
would draw from (the tempered, top-k/top-p-filtered logits); Q is the minimum over the given Q heads, read
from the backbone's hidden state of the same step, so guidance costs one [d, V] matmul per head and step.
V(s) is constant over a and cancels in the normalisation, so it is not needed.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.q_heads import HeadParams, min_q_values
from jaxrlhf.rl.value_guidance import categorical_kl, value_guided_logits


class ValueGuidance(NamedTuple):
    """Q heads (min over them; e.g. ILQL's target heads) and the strength β ≥ 0 (an array: a new β reuses
    the compiled program). β = 0 samples from π_base."""

    q_heads: tuple[HeadParams, ...]
    beta: jax.Array


def value_guidance(q_heads, beta: float | jax.Array) -> ValueGuidance:
    """A :class:`ValueGuidance` with β as a float32 scalar array (a sequence of heads becomes a tuple); a
    Python β must be a finite number ≥ 0 (a negative one would steer towards low values)."""
    if not isinstance(beta, jax.core.Tracer):  # a concrete β (Python, NumPy or JAX) is checked here
        value = np.asarray(beta)
        if value.dtype.kind not in "iuf" or not np.all((value >= 0) & np.isfinite(value)):
            raise ValueError(f"value_guidance: beta must be a finite number >= 0, got {beta!r}")
    return ValueGuidance(tuple(q_heads), jnp.asarray(beta, jnp.float32))


def guided_step(base_logits: chex.Array, hidden: chex.Array,
                guidance: ValueGuidance) -> tuple[chex.Array, chex.Array]:
    """(log π_β [R, V], KL(π_β ‖ π_base) [R]) for one step: ``base_logits`` [R, V] the logits tokens would
    be drawn from without guidance (−inf for filtered tokens), ``hidden`` [R, d] the state's hidden state.

    log π_β(a|s) = log π_base(a|s) + β·Q(s, a) − log Σ_a' π_base(a'|s)·exp(β·Q(s, a')), Q = min_h Q_h; the
    KL is exact (a sum over the vocabulary), 0 at β = 0.
    """
    q = min_q_values(guidance.q_heads, hidden)
    guided = value_guided_logits(base_logits, q, guidance.beta)
    return guided, categorical_kl(guided, base_logits)

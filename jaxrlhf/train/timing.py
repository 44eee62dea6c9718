"""Phase timers, throughput, model FLOPs and MFU, and a recompilation watch.

JAX dispatches asynchronously: a phase's wall time only means something if the phase waits for its
results, so call ``t.block(outputs)`` (``jax.block_until_ready``) before the ``with`` block ends::

    timers = Timers()
    with timers("generation") as t:
        rollout = t.block(generate(params, prompts, key))
    logger.log(step, timers.summary())      # {"timing/generation": seconds, ...}
    timers.reset()
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


class PhaseTimer:
    """Context manager measuring one wall-clock interval; ``seconds`` holds it after exit."""

    def __init__(
        self,
        name: str = "",
        on_exit: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.name = name
        self.seconds = 0.0
        self._on_exit = on_exit
        self._clock = clock
        self._start = 0.0

    @staticmethod
    def block(x: Any) -> Any:
        """Wait until every JAX array in ``x`` is computed; returns ``x``."""
        return jax.block_until_ready(x)

    def __enter__(self) -> PhaseTimer:
        self._start = self._clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self._clock() - self._start
        if self._on_exit is not None:
            self._on_exit(self.name, self.seconds)


class Timers:
    """Wall time accumulated per named phase (a phase entered twice adds up) until :meth:`reset`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str) -> PhaseTimer:
        return PhaseTimer(name, on_exit=self._record, clock=self._clock)

    def _record(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    block = staticmethod(PhaseTimer.block)

    def summary(self, prefix: str = "timing/") -> dict[str, float]:
        """``{prefix + phase: total seconds}`` in the order phases were first timed."""
        return {f"{prefix}{name}": seconds for name, seconds in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


def throughput(tokens: float, seconds: float) -> float:
    """Tokens per second, ``tokens / seconds``; NaN when ``seconds <= 0``."""
    return tokens / seconds if seconds > 0 else math.nan


def transformer_flops_per_token(
    n_params: int, n_layers: int, d_model: int, seq_len: int, training: bool
) -> float:
    """Model FLOPs per token of a decoder-only transformer (the PaLM / Chinchilla count).

    forward  = 2·N + 4·L·d·T     (2·N for the weight matmuls; 2·L·d·T each for QKᵀ and attention·V)
    training = 3·forward = 6·N + 12·L·d·T   (backward costs twice the forward)

    N = ``n_params`` (count the parameters used in matmuls: all but the input-embedding lookup; a tied LM
    head counts once), L = ``n_layers``, d = ``d_model``, T = ``seq_len``, the number of positions each
    token attends to. The full T×T attention is counted (no halving for the causal mask), as PaLM does.
    """
    forward = 2.0 * n_params + 4.0 * n_layers * d_model * seq_len
    return 3.0 * forward if training else forward


def causal_attention_flops(num_layers: int, width: int, start: int, end: int) -> float:
    """Attention FLOPs of one sequence's tokens at positions start + 1 … end, each attending to itself and
    every position before it: 4·L·width per attended position (QKᵀ and the value product; width = H·hd),
    4·L·width · Σ_{p=start+1}^{end} p."""
    return 4.0 * num_layers * width * (end * (end + 1) - start * (start + 1)) / 2


def default_probe_chain() -> int:
    """Dependent matmuls per jitted call of :func:`matmul_peak_flops` by default: 1 on a CPU, 8 on an
    accelerator (where dispatch and synchronisation rival one matmul)."""
    return 1 if jax.default_backend() == "cpu" else 8


def mfu(flops_per_token: float, tokens: float, seconds: float, peak_flops: float) -> float:
    """Model-FLOPs utilisation = flops_per_token · tokens / seconds / peak_flops; NaN if undefined."""
    if seconds <= 0 or peak_flops <= 0:
        return math.nan
    return flops_per_token * tokens / seconds / peak_flops


def matmul_peak_flops(
    n: int = 2048, dtype: Any = jnp.float32, repeats: int = 5, chain: int | None = None
) -> float:
    """Achieved FLOP/s of n×n @ n×n matmuls (2·n³ FLOPs each) on the default device, best of ``repeats``.

    One jitted call runs ``chain`` dependent matmuls (a ``fori_loop``; default 8 on accelerators, 1 on a CPU),
    so that dispatch and synchronisation, which rival one matmul on an accelerator, are amortised. The
    "peak" against which MFU is measured; measure it in the same run as the workload (n ≥ 8192 on a GPU).
    """
    if chain is None:
        chain = default_probe_chain()
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), dtype)
    # Scaled by 1/√n so that the chained products stay O(1) instead of overflowing.
    y = (jax.random.normal(ky, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)

    @jax.jit
    def chained(x, y):
        return jax.lax.fori_loop(0, chain, lambda _, acc: acc @ y, x)

    jax.block_until_ready(chained(x, y))  # compile and warm up outside the timed runs
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        jax.block_until_ready(chained(x, y))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 * chain / best


class CompileWatcher:
    """Warn when a jitted function compiles again after warm-up (usually a batch shape changed).

    Call :meth:`check` after each call of ``fn``; the first ``warmup_calls`` checks only record the
    compilation-cache size. Relies on ``jax.jit``'s ``_cache_size()``.
    """

    def __init__(self, fn: Any, name: str, warmup_calls: int = 1):
        if not hasattr(fn, "_cache_size"):
            raise TypeError(f"CompileWatcher({name!r}): expected a jax.jit-compiled function, got {type(fn)}")
        self.fn = fn
        self.name = name
        self.warmup_calls = warmup_calls
        self.recompiles = 0
        self._calls = 0
        self._cache_size = fn._cache_size()

    def check(self, step: int | None = None) -> bool:
        """True (and a logged warning) if ``fn`` compiled since the last check, after warm-up."""
        self._calls += 1
        size = self.fn._cache_size()
        grew, self._cache_size = size > self._cache_size, size
        if not grew or self._calls <= self.warmup_calls:
            return False
        self.recompiles += 1
        at = "" if step is None else f" at step {step}"
        log.warning(
            "%s recompiled after warm-up%s (shape changed?); %d compilations so far", self.name, at, size
        )
        return True

"""Tests for phase timers, throughput, FLOP and MFU formulas and the recompilation watch."""

import logging
import math

import jax
import jax.numpy as jnp
import pytest

from jaxrlhf.train.timing import (
    CompileWatcher,
    PhaseTimer,
    Timers,
    matmul_peak_flops,
    mfu,
    throughput,
    transformer_flops_per_token,
)


class FakeClock:
    """A clock that returns the given readings in turn."""

    def __init__(self, *readings: float):
        self.readings = list(readings)

    def __call__(self) -> float:
        return self.readings.pop(0)


def test_timers_accumulate_per_phase_and_summarise_with_prefix():
    timers = Timers(clock=FakeClock(0.0, 1.5, 2.0, 2.25, 3.0, 3.5))
    with timers("generation") as t:
        x = t.block(jnp.arange(3))
    with timers("score"):
        pass
    with timers("generation"):
        pass
    assert x.tolist() == [0, 1, 2]
    assert timers.summary() == {"timing/generation": 2.0, "timing/score": 0.25}
    assert timers.summary(prefix="") == {"generation": 2.0, "score": 0.25}
    assert timers.counts == {"generation": 2, "score": 1}
    assert t.seconds == 1.5
    timers.reset()
    assert timers.summary() == {}


def test_phase_timer_alone_and_block():
    with PhaseTimer(clock=FakeClock(10.0, 10.75)) as t:
        pass
    assert t.seconds == 0.75
    tree = {"a": jnp.ones(2)}
    assert Timers.block(tree) is tree


def test_throughput_and_mfu_hand_values():
    assert throughput(1000, 4.0) == 250.0
    assert math.isnan(throughput(10, 0.0))
    # 100 FLOPs/token · 50 tokens / 2 s / 1e4 FLOP/s = 0.25
    assert mfu(100.0, 50, 2.0, 1e4) == pytest.approx(0.25)
    assert math.isnan(mfu(100.0, 50, 0.0, 1e4))


def test_transformer_flops_per_token_hand_values():
    # N = 1000, L = 2, d = 8, T = 16: attention 4·2·8·16 = 1024 per forward token.
    assert transformer_flops_per_token(1000, 2, 8, 16, training=False) == 2000 + 1024
    # training = 6·N + 12·L·d·T = 6000 + 3072
    assert transformer_flops_per_token(1000, 2, 8, 16, training=True) == 6000 + 3072


def test_matmul_peak_flops_is_positive_and_finite():
    flops = matmul_peak_flops(n=64, repeats=2)
    assert math.isfinite(flops) and flops > 0
    chained = matmul_peak_flops(n=64, dtype=jnp.bfloat16, repeats=2, chain=4)  # the accelerator form
    assert math.isfinite(chained) and chained > 0


def test_compile_watcher_warns_on_recompile_after_warmup(caplog):
    double = jax.jit(lambda x: 2 * x)
    watcher = CompileWatcher(double, "double_step")
    double(jnp.zeros(2))
    assert watcher.check(0) is False  # warm-up compile
    double(jnp.ones(2))
    assert watcher.check(1) is False  # same shape: cached
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.train.timing"):
        double(jnp.zeros(3))
        assert watcher.check(2) is True
    assert watcher.recompiles == 1
    assert "double_step recompiled after warm-up at step 2 (shape changed?)" in caplog.text


def test_compile_watcher_needs_a_jitted_function():
    with pytest.raises(TypeError, match=r"jax\.jit"):
        CompileWatcher(lambda x: x, "plain")


def test_causal_attention_flops_by_hand():
    from jaxrlhf.train.timing import causal_attention_flops

    # positions 3, 4, 5 attend to 3, 4 and 5 positions: 4·L·width·12
    assert causal_attention_flops(2, 8, 2, 5) == 4 * 2 * 8 * (3 + 4 + 5)
    assert causal_attention_flops(2, 8, 0, 4) == 4 * 2 * 8 * 10

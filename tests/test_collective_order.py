"""jaxrlhf.collective_order: fenced loops change no value, and the HLO check finds unordered collectives.

The hazard itself needs several processes (tests/parallel/test_multihost.py runs 2 and checks their compiled
programs); tests/steps/test_ppo.py runs the real PPO update fenced."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.collective_order import (
    SEQUENCE_ENV,
    maybe_sequence_loops,
    needs_sequencing,
    sequence_loops,
    unordered_collectives,
)


def program(params, batch, key, steps):
    """Loops of every kind (scan, while, cond, a map, a gradient through a scan), an integer and a boolean
    output, a key, a -inf and a NaN in the inputs (a fence must carry them through unchanged)."""
    w, b = params["w"], params["b"]
    x = batch["x"]
    mapped = jax.lax.map(lambda row: jnp.tanh(row @ w), x)
    other = jnp.sum(x @ w) + b

    def body(c, _):
        return jnp.tanh(c @ w) + b, jnp.sum(c)

    carry, trace = jax.lax.scan(body, x, None, length=steps)
    count = jax.lax.while_loop(lambda i: i < steps + 2, lambda i: i + 1, jnp.int32(0))
    branch = jax.lax.cond(other > 0, lambda v: v * 2.0, lambda v: v - 1.0, mapped)
    grads = jax.grad(lambda w: jnp.sum(jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None,
                                                    length=2)[0]))(w)
    noise = jax.random.normal(key, x.shape)
    masked = jnp.where(batch["mask"], batch["logits"], -jnp.inf)
    return {"mapped": mapped, "other": other, "carry": carry, "trace": trace, "count": count,
            "branch": branch, "grads": grads, "noise": noise, "masked": jax.nn.logsumexp(masked, axis=-1),
            "nan": batch["nan"] * 2.0, "flag": other > 0}


def inputs():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 8)) / 3, jnp.float32), "b": jnp.float32(0.25)}
    batch = {"x": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
             "mask": jnp.asarray(rng.random((4, 8)) > 0.3), "logits": jnp.asarray(rng.normal(size=(4, 8))),
             "nan": jnp.array([1.0, jnp.nan, jnp.inf], jnp.float32)}
    return params, batch, jax.random.key(3)


@pytest.mark.parametrize("jit", [False, True])
def test_fenced_program_gives_the_same_values_bitwise(jit):
    params, batch, key = inputs()
    expected = jax.jit(program, static_argnums=3)(params, batch, key, 3)
    fenced = sequence_loops(program)
    got = jax.jit(fenced, static_argnums=3)(params, batch, key, 3) if jit else fenced(params, batch, key, 3)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for k in expected:
        a, b = np.asarray(got[k]), np.asarray(expected[k])
        assert a.dtype == b.dtype and a.shape == b.shape, k
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_fenced_gradients_and_vmap_agree():
    params, batch, key = inputs()
    loss = lambda p: jnp.sum(program(p, batch, key, 2)["carry"])
    fenced = lambda p: jnp.sum(sequence_loops(program)(p, batch, key, 2)["carry"])
    g1, g2 = jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(fenced))(params)
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    xs = jnp.stack([batch["x"], batch["x"] * 0.5])
    f = lambda x: program(params, {**batch, "x": x}, key, 2)["carry"]
    np.testing.assert_array_equal(jax.vmap(sequence_loops(f))(xs), jax.vmap(f)(xs))


def test_sequencing_is_on_only_where_needed(monkeypatch):
    monkeypatch.delenv(SEQUENCE_ENV, raising=False)
    assert not needs_sequencing()  # one CPU process
    assert maybe_sequence_loops(program) is program
    monkeypatch.setenv(SEQUENCE_ENV, "1")
    assert needs_sequencing() and maybe_sequence_loops(program) is not program
    monkeypatch.setenv(SEQUENCE_ENV, "0")
    assert not needs_sequencing()


# A hand-written optimised module: a loop that all-gathers inside its body, beside an all-reduce that
# neither feeds it nor reads it (the hazard), and a second all-reduce that reads the loop (ordered).
HAZARD_HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8] get-tuple-element(%p), index=1
  %g = f32[8] all-gather(%x), dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %g)
}

%cond (p.1: (s32[], f32[8])) -> pred[] {
  %p.1 = (s32[], f32[8]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x.0: f32[8], y.0: f32[4]) -> (f32[8], f32[4], f32[8]) {
  %x.0 = f32[8] parameter(0)
  %y.0 = f32[4] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]) tuple(%zero, %x.0)
  %while.1 = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %out = f32[8] get-tuple-element(%while.1), index=1
  %all-reduce.1 = f32[4] all-reduce(%y.0), to_apply=%add
  %all-reduce.2 = f32[8] all-reduce(%out), to_apply=%add
  ROOT %r = (f32[8], f32[4], f32[8]) tuple(%out, %all-reduce.1, %all-reduce.2)
}
"""


def test_the_check_finds_an_unordered_loop_and_only_it():
    found = unordered_collectives(HAZARD_HLO)
    assert [(p.computation, p.loop, p.other) for p in found] == [("main", "while.1", "all-reduce.1")]
    ordered = HAZARD_HLO.replace("all-reduce(%y.0)", "all-reduce(%y.1)").replace(
        "  %all-reduce.1 =", "  %y.1 = f32[4] slice(%out), slice={[0:4]}\n  %all-reduce.1 =")
    assert unordered_collectives(ordered) == []
    without = HAZARD_HLO.replace("%g = f32[8] all-gather(%x), dimensions={0}", "%g = f32[8] negate(%x)")
    assert unordered_collectives(without) == []  # a loop without collectives is no hazard


@pytest.mark.parametrize("extreme", ["min", "max"])
def test_a_fence_survives_values_whose_sum_overflows(extreme):
    """Two values live across a loop whose first elements are float32's extreme (an attention mask's
    additive minimum, kept for a backward pass): the fence's token must not overflow to inf, whose
    product with 0 is NaN and would turn every value tied to it into NaN."""
    big = getattr(jnp.finfo(jnp.float32), extreme)

    def f(x, a, b):
        a, b = a * 1.0, b - 0.0  # computed before the loop, so its fence reads them
        y = jax.lax.fori_loop(0, 3, lambda i, c: c * 1.5, x)
        return y, a + y[0], b

    args = (jnp.array([1.0, -0.0]), jnp.full((3,), big), jnp.full((3,), big))
    expected = jax.jit(f)(*args)
    for got in (jax.jit(sequence_loops(f))(*args), sequence_loops(f)(*args)):
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert np.array_equal(np.signbit(a), np.signbit(b))  # −0 stays −0

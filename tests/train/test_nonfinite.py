"""Tests for the non-finite guard: all_finite, select_if_finite (with and without jit), NonFiniteTracker."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.train.nonfinite import NonFiniteError, NonFiniteTracker, all_finite, select_if_finite

WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


@WITH_AND_WITHOUT_JIT
def test_all_finite_looks_only_at_floating_leaves(transform):
    check = transform(all_finite)
    tree = {"w": jnp.ones((2, 3)), "count": jnp.array(7, jnp.int32), "key": jax.random.key(0), "x": 1.5}
    assert bool(check(tree)) is True
    assert bool(check({**tree, "w": jnp.ones((2, 3)).at[1, 2].set(jnp.nan)})) is False
    assert bool(check({**tree, "x": jnp.float32(-jnp.inf)})) is False
    assert bool(check({"b": jnp.array([1, 2]), "e": ()})) is True  # no floating leaf at all


def _sgd_step(state, x):
    """One guarded SGD step on loss = sum(x * w²) that also advances the key; returns (state, ok)."""
    loss, grads = jax.value_and_grad(lambda w: jnp.sum(x * w**2))(state["w"])
    new = {"w": state["w"] - 0.5 * grads, "key": jax.random.split(state["key"])[0]}
    ok = all_finite((loss, grads))
    return select_if_finite(ok, new, state), ok


@WITH_AND_WITHOUT_JIT
def test_select_if_finite_applies_finite_step_and_keeps_old_state_on_nan(transform):
    step = transform(_sgd_step)
    params = {"w": jnp.array([1.0, 2.0]), "key": jax.random.key(3)}
    # grad = 2·x·w = [2, 8]; w - 0.5·grad = [0, -2]
    new, ok = step(params, jnp.array([1.0, 2.0]))
    assert bool(ok)
    np.testing.assert_allclose(new["w"], [0.0, -2.0])
    want_key = jax.random.key_data(jax.random.split(params["key"])[0])
    np.testing.assert_array_equal(jax.random.key_data(new["key"]), want_key)
    bad, ok = step(params, jnp.array([1.0, jnp.nan]))
    assert not bool(ok)
    np.testing.assert_array_equal(bad["w"], params["w"])
    np.testing.assert_array_equal(jax.random.key_data(bad["key"]), jax.random.key_data(params["key"]))


@WITH_AND_WITHOUT_JIT
def test_select_if_finite_selects_typed_keys(transform):
    select = transform(select_if_finite)
    old, new = jax.random.key(0), jax.random.key(1)
    for ok, want in ((True, new), (False, old)):
        got = select(jnp.array(ok), {"k": new}, {"k": old})["k"]
        assert got.dtype == old.dtype
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))


def test_select_if_finite_rejects_mismatched_leaves():
    with pytest.raises(ValueError, match=r"\['a'\].*float32\[3\].*float32\[2\]"):
        select_if_finite(True, {"a": jnp.zeros(3)}, {"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="scalar"):
        select_if_finite(jnp.array([True, False]), {"a": jnp.zeros(2)}, {"a": jnp.zeros(2)})


def test_tracker_counts_logs_and_raises_after_max_consecutive(caplog):
    tracker = NonFiniteTracker(max_consecutive=3)
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.train.nonfinite"):
        tracker.update(1, False)
        tracker.update(2, jnp.array(False))
        tracker.update(3, True)  # a finite step resets the run of skips
        assert (tracker.total_skips, tracker.consecutive_skips) == (2, 0)
        tracker.update(4, False)
        tracker.update(5, False)
        assert tracker.metrics() == {"train/nonfinite_skips": 4}
        with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps \(last at step 6\)"):
            tracker.update(6, np.bool_(False))
    assert tracker.total_skips == 5
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5
    assert messages[0] == "step 1: non-finite loss or gradient, update skipped (1 in a row, 1 in total)"


def test_tracker_rejects_nonpositive_limit():
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteTracker(0)

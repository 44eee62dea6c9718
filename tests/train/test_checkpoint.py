"""Tests for the orbax checkpoint path: round-trips, keep-last-N, atomicity, refusals and clear errors."""

import json
import os
import re
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.train.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointWriteError,
    NonFiniteCheckpointError,
    pack_rng,
    save_json_atomic,
    unpack_rng,
)


class KLState(NamedTuple):
    beta: jax.Array


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    kl: KLState
    rng: jax.Array
    step: jax.Array


def make_state(seed: int = 0) -> TrainState:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "embed": jax.random.normal(k1, (5, 4)),
        "layers": {0: {"w": jax.random.normal(k2, (4, 4))}, 1: {"w": jax.random.normal(k3, (4, 4))}},
    }
    optimiser = optax.adamw(1e-2)
    opt_state = optimiser.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = optimiser.update(grads, opt_state, params)  # non-zero mu, nu and count
    params = optax.apply_updates(params, updates)
    return TrainState(params, opt_state, KLState(jnp.float32(0.2)), jax.random.key(seed + 100), jnp.int32(7))


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)

    def check(path, a, b):
        where = jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            assert a.dtype == b.dtype, where
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.asarray(a).dtype == np.asarray(b).dtype, where
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)

    jax.tree_util.tree_map_with_path(check, got, want)


def abstract(tree, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@pytest.fixture(scope="module")
def state():
    return jax.jit(make_state, static_argnums=0)(0)  # one compilation instead of many eager ops


def test_round_trip_with_optax_state_int_keys_typed_rng_and_shardings(tmp_path, state):
    metadata = {"loader": {"epoch": 1, "position": 12}, "config": {"lr": 1e-5, "sizes": [1, 2]}}
    mesh = jax.make_mesh((1,), ("data",))
    replicated = NamedSharding(mesh, P())
    with CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() is None
        assert manager.save(7, state, metadata)
        # restore waits for the asynchronous save
        restored, restored_metadata = manager.restore(target=abstract(state, replicated))
        assert manager.latest_step() == 7
    assert restored_metadata == metadata
    assert isinstance(restored, TrainState) and isinstance(restored.kl, KLState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert set(restored.params["layers"]) == {0, 1}
    assert_trees_equal(restored, state)
    assert restored.params["embed"].sharding == replicated
    assert restored.rng.sharding == replicated

    # A concrete target and a shardless abstract one give the same values, as jax arrays.
    with CheckpointManager(tmp_path / "ckpt") as manager:
        for target in (state, abstract(state)):
            again, _ = manager.restore(7, target=target)
            assert_trees_equal(again, state)
            assert isinstance(again.params["embed"], jax.Array)


def test_restore_without_target_gives_saved_layout(tmp_path, state):
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, {"layers": {0: jnp.ones(2)}, "rng": state.rng}, {})
        raw, metadata = manager.restore()
    assert metadata == {}
    assert isinstance(raw["layers"]["0"], np.ndarray)
    np.testing.assert_array_equal(raw["layers"]["0"], np.ones(2))  # int keys come back as strings
    np.testing.assert_array_equal(raw["rng"], jax.random.key_data(state.rng))


def test_keeps_last_n_and_respects_save_interval(tmp_path):
    tree = {"w": jnp.zeros(3)}
    with CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=2) as manager:
        saved = [
            manager.save(step, jax.tree.map(lambda x, s=step: x + s, tree), {"s": step}) for step in range(6)
        ]
        assert saved == [True, False, True, False, True, False]
        assert manager.save(5, tree, {"s": 5}, force=True)
        manager.wait()
        assert manager.all_steps() == [4, 5]
        assert manager.latest_step() == 5
        four, metadata = manager.restore(4, target=tree)
    np.testing.assert_array_equal(four["w"], [4.0, 4.0, 4.0])
    assert metadata == {"s": 4}
    assert sorted(n for n in os.listdir(tmp_path) if n.isdigit()) == ["4", "5"]


def test_refuses_to_save_non_finite_state_and_writes_nothing(tmp_path, state):
    bad_params = {
        **state.params,
        "layers": {0: state.params["layers"][0], 1: {"w": jnp.full((4, 4), jnp.nan)}},
    }
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(NonFiniteCheckpointError, match=r"leaf \.params\['layers'\]\[1\]\['w'\]"):
            manager.save(3, state.replace(params=bad_params), {})
        with pytest.raises(NonFiniteCheckpointError, match=r"\['x'\]"):
            manager.save(3, {"n": np.arange(2), "x": np.array([1.0, np.inf])}, {})
        with pytest.raises(NonFiniteCheckpointError, match=r"\['f'\]"):
            manager.save(3, {"f": float("nan")}, {})
        # the first bad leaf in tree order, whether it lives on the device or the host
        with pytest.raises(NonFiniteCheckpointError, match=r"leaf \['a'\]"):
            manager.save(3, {"a": jnp.array([jnp.inf]), "b": np.array([np.nan])}, {})
        manager.wait()
        assert manager.all_steps() == []
    assert not [n for n in os.listdir(tmp_path) if n.startswith("3")]


def test_latest_step_ignores_incomplete_steps(tmp_path):
    tree = {"w": jnp.arange(3.0)}
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, tree, {"ok": True})
    # An interrupted save: orbax's temporary directory, and a step folder that never got its commit marker.
    for partial in ("5.orbax-checkpoint-tmp-1700000000", "7"):
        os.makedirs(tmp_path / partial / "state")
        (tmp_path / partial / "state" / "half_written").write_text("x")
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [1]
        assert manager.latest_step() == 1
        restored, metadata = manager.restore(target=tree)
    assert metadata == {"ok": True}
    np.testing.assert_array_equal(restored["w"], [0.0, 1.0, 2.0])


def test_restore_errors_name_directory_and_leaves(tmp_path):
    empty = tmp_path / "empty"
    with CheckpointManager(empty) as manager:
        with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
            manager.restore(target={"w": jnp.zeros(3)})
        assert not empty.exists()
        manager.save(2, {"w": jnp.zeros(3), "b": {0: jnp.zeros(2)}}, {})
        with pytest.raises(FileNotFoundError, match=r"step 9 not found.*steps: \[2\]"):
            manager.restore(9)
        with pytest.raises(
            CheckpointMismatchError,
            match=r"leaf \['w'\] has shape \(3,\) in the checkpoint, \(4,\) in the target",
        ):
            manager.restore(target={"w": jnp.zeros(4), "b": {0: jnp.zeros(2)}})
        with pytest.raises(CheckpointMismatchError, match=r"no leaf for target path\(s\) \['extra'\]"):
            manager.restore(target={"w": jnp.zeros(3), "b": {0: jnp.zeros(2)}, "extra": jnp.zeros(1)})
        with pytest.raises(CheckpointMismatchError, match=r"leaves the target lacks: b\.0"):
            manager.restore(target={"w": jnp.zeros(3)})


def test_metadata_must_be_json(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(TypeError, match="step 1: metadata is not JSON-serialisable"):
            manager.save(1, {"w": jnp.zeros(1)}, {"array": np.zeros(2)})


def test_pack_and_unpack_rng():
    key = jax.random.key(42)
    data = pack_rng(key)
    assert data.dtype == jnp.uint32 and data.shape == (2,)
    np.testing.assert_array_equal(jax.random.key_data(unpack_rng(data)), jax.random.key_data(key))
    legacy = jax.random.PRNGKey(42)
    assert pack_rng(legacy) is legacy


def test_save_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "progress.json"
    save_json_atomic(path, {"step": 1})
    save_json_atomic(path, {"step": 2, "items": [1, 2]})
    assert json.loads(path.read_text()) == {"step": 2, "items": [1, 2]}
    with pytest.raises(TypeError):
        save_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"step": 2, "items": [1, 2]}
    assert os.listdir(tmp_path) == ["progress.json"]


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_save_that_cannot_be_written_is_one_error_and_keeps_the_earlier_steps(tmp_path, disk_full_at,
                                                                                async_save):
    """The disk fills up at the third save: one CheckpointWriteError naming the directory and the cause (at
    that save, or at the next call when it failed in the background), steps 1 and 2 intact, no temporary
    directory left, and the directory usable again."""
    disk_full_at(3)
    tree = {"w": jnp.arange(3.0)}
    manager = CheckpointManager(tmp_path, max_to_keep=5, async_save=async_save)
    with pytest.raises(CheckpointWriteError) as info:
        for step in (1, 2, 3, 4):
            manager.save(step, jax.tree.map(lambda x, s=step: x + s, tree), {"step": step})
        manager.wait()
    manager.close()
    message = str(info.value)
    assert message == (f"cannot write a checkpoint to {tmp_path}: [Errno 28] No space left on device: "
                       f"{message.split('device: ')[1].split(' (')[0]} (the checkpoints there, steps [1, 2], "
                       "are intact; a rerun resumes from the last one)")
    assert "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    with CheckpointManager(tmp_path, max_to_keep=5) as again:
        restored, metadata = again.restore(target=tree)
        assert metadata == {"step": 2}
        np.testing.assert_array_equal(restored["w"], [2.0, 3.0, 4.0])
        again.save(3, tree, {"step": 3})
    assert CheckpointManager(tmp_path).all_steps() == [1, 2, 3]


def test_closed_event_loop_callbacks_of_a_failing_save_stay_off_the_terminal(tmp_path, monkeypatch):
    """tensorstore's callbacks for writes still in flight when one fails raise "Event loop is closed" as
    unraisable errors (~20 bare tracebacks per failed save); only those are taken off the terminal."""
    import sys
    import types

    from jaxrlhf.train.checkpoint import CheckpointManager

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with CheckpointManager(tmp_path / "ckpt"):
        pass
    with CheckpointManager(tmp_path / "ckpt2"):  # installed once, not wrapped twice
        pass
    assert sys.unraisablehook is not seen.append

    def args(error):
        return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                     err_msg=None, object=None)

    sys.unraisablehook(args(RuntimeError("Event loop is closed")))
    assert seen == []
    other = args(RuntimeError("something else"))
    sys.unraisablehook(other)
    sys.unraisablehook(args(ValueError("Event loop is closed")))
    assert seen[0].exc_value is other.exc_value and len(seen) == 2

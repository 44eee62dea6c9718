"""The project's one checkpoint path: a training-state pytree plus a JSON metadata dict per step (orbax).

A checkpoint step ``<directory>/<step>/`` holds two orbax items: ``state`` (the pytree: parameters,
optimiser state, KL-controller state, RNG key data, step counter) and ``metadata`` (a small JSON dict:
data-loader position, config, anything JSON-able). Orbax writes each step into a temporary directory and
commits it by writing ``commit_success.txt`` and renaming; :meth:`CheckpointManager.latest_step` only
reports steps that hold that marker, so an interrupted save is never resumed from.

A save that fails (disk full, permission denied — synchronously or in orbax's background threads) raises
one :class:`CheckpointWriteError` naming the directory and the cause; the step's temporary directory is
removed and every committed step stays, so a rerun resumes from the last good one.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key data and rebuilt on restore
when the target holds a typed key there; legacy ``uint32`` keys are stored as they are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrlhf.files import write_text_atomic

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax writes step s into "<s>.orbax-checkpoint-tmp…" first


class NonFiniteCheckpointError(ValueError):
    """The state to save holds a NaN or an infinity."""


class CheckpointMismatchError(ValueError):
    """The restore target's structure or shapes differ from the saved state's."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the earlier ones are intact."""


def pack_rng(key: jax.Array) -> jax.Array:
    """A typed PRNG key as its raw ``uint32`` key data (a legacy ``uint32`` key is returned as is)."""
    return jax.random.key_data(key) if _is_typed_key(key) else key


def unpack_rng(data: jax.Array, impl: str = "threefry2x32") -> jax.Array:
    """Rebuild a typed PRNG key from raw key data (inverse of :func:`pack_rng`)."""
    return jax.random.wrap_key_data(data, impl=impl)


def save_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see the old file or the new one, never half of one.

    Writes a temporary file in the same directory, fsyncs it, then ``os.replace``s it over ``path``.
    """
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Replace typed-key leaves (concrete or ``ShapeDtypeStruct``) by their ``uint32`` key data."""

    def to_data(x):
        if not _is_typed_key(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            data = jax.eval_shape(jax.random.key_data, x)
            # Key data has one trailing dimension more; a NamedSharding leaves trailing dims replicated.
            sharding = (
                x.sharding
                if isinstance(x.sharding, jax.sharding.NamedSharding | jax.sharding.SingleDeviceSharding)
                else None
            )
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        return jax.random.key_data(x)

    return jax.tree.map(to_data, tree)


def _data_to_keys(restored: Any, target: Any) -> Any:
    return jax.tree.map(
        lambda r, t: jax.random.wrap_key_data(r, dtype=t.dtype) if _is_typed_key(t) else r, restored, target
    )


def _with_default_sharding(tree: Any) -> Any:
    """Give shardless ``ShapeDtypeStruct`` leaves the first local device, so they restore as jax arrays."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
            if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None
            else x
        ),
        tree,
    )


@jax.jit
def _leaf_finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _device_finite_flags(leaves: list[jax.Array]) -> list[bool]:
    try:
        # One jitted reduction and one small host transfer, whatever the number of leaves.
        return np.asarray(_leaf_finite_flags(leaves)).tolist()
    except ValueError:  # leaves committed to different devices cannot meet in one computation
        return [bool(jnp.all(jnp.isfinite(x))) for x in leaves]


def first_nonfinite_leaf(tree: Any) -> str | None:
    """Path (``jax.tree_util.keystr``) of the first floating leaf holding a NaN or ±inf, else ``None``."""
    floating = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.float64(x) if isinstance(x, float) else x
        dtype = getattr(x, "dtype", None)
        if dtype is not None and not _is_typed_key(x) and jnp.issubdtype(dtype, jnp.inexact):
            floating.append((path, x))
    on_device = [x for _, x in floating if isinstance(x, jax.Array)]
    device_flags = iter(_device_finite_flags(on_device) if on_device else [])
    for path, x in floating:
        finite = next(device_flags) if isinstance(x, jax.Array) else bool(np.all(np.isfinite(x)))
        if not finite:
            return jax.tree_util.keystr(path)
    return None


class CheckpointManager:
    """Keep-last-N checkpoints of ``(state pytree, JSON metadata)`` in ``directory``, one folder per step.

    ``directory`` is on a local or shared POSIX file system; it is created by the first save.

    Saving may be asynchronous (the arrays are copied to host before :meth:`save` returns, so the caller
    may donate them); :meth:`restore`, :meth:`wait` and :meth:`close` wait for pending saves.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            create=False,  # made by the first save, so restoring from a mistyped path creates nothing
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # what an interrupted or failed save left behind
        )
        # Naming the item handlers lets a fresh manager read metadata of steps it did not write.
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._failure: CheckpointWriteError | None = None
        _route_closed_loop_errors()

    def save(
        self, step: int, state: Any, metadata: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Save ``state`` and ``metadata`` as ``step`` if the save interval (or ``force``) says so.

        Returns whether a save was started. Raises :class:`NonFiniteCheckpointError` before writing
        anything if a floating leaf of ``state`` is not finite, and ``TypeError`` if ``metadata`` is not
        JSON-serialisable (JSON turns int dict keys into strings and tuples into lists).
        """
        step = int(step)
        if not force and not self._manager.should_save(step):
            return False
        bad = first_nonfinite_leaf(state)
        if bad is not None:
            raise NonFiniteCheckpointError(
                f"refusing to save checkpoint step {step} to {self.directory}: state leaf {bad} "
                "holds a NaN or infinite value"
            )
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint step {step}: metadata is not JSON-serialisable: {e}") from e
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(_keys_to_data(state)), metadata=ocp.args.JsonSave(metadata)
        )
        try:
            os.makedirs(self.directory, exist_ok=True)
            saved = self._manager.save(step, args=args, force=force)  # also raises a pending save's failure
        except Exception as e:
            self._failed(e)
        if saved:
            log.info("checkpoint step %d: saving to %s", step, self.directory)
        return saved

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending; a save still in flight is not listed until it commits."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(
            int(name)
            for name in os.listdir(self.directory)
            if name.isdigit() and os.path.exists(os.path.join(self.directory, name, COMMIT_MARKER))
        )

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None`` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict[str, Any]]:
        """Load ``(state, metadata)`` of ``step`` (default: the latest committed step).

        ``target`` gives the structure (NamedTuples, dataclasses, int dict keys), dtypes and shardings to
        restore into: concrete arrays or ``jax.ShapeDtypeStruct`` leaves whose ``.sharding`` says where each
        array goes, so a state saved on N devices restores on M. A ``ShapeDtypeStruct`` without a sharding
        goes to the first local device. Typed-key leaves in ``target`` come back as typed keys. Without a
        target the saved layout comes back as nested dicts/lists with string keys and NumPy leaves (RNG
        keys as raw key data).
        """
        self.wait()
        self._manager.reload()  # safe now that no save is in flight; picks up steps written elsewhere
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} not found in {self.directory}; steps: {steps}")
        if target is None:
            # Host NumPy arrays: the saved shardings may name devices this run does not have.
            saved_tree = self._manager.item_metadata(step)["state"].tree
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_tree)
            state_args = ocp.args.PyTreeRestore(restore_args=as_numpy)
        else:
            stored = _with_default_sharding(_keys_to_data(target))
            self._check_target(step, stored)
            state_args = ocp.args.PyTreeRestore(
                item=stored, restore_args=ocp.checkpoint_utils.construct_restore_args(stored)
            )
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=state_args, metadata=ocp.args.JsonRestore())
        )
        state = out["state"] if target is None else _data_to_keys(out["state"], target)
        log.info("checkpoint step %d: restored from %s", step, self.directory)
        return state, dict(out["metadata"] or {})

    def _check_target(self, step: int, stored_target: Any) -> None:
        saved_tree = self._manager.item_metadata(step)["state"].tree
        saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(saved_tree)}
        wanted = {}
        for path, x in jax.tree_util.tree_flatten_with_path(stored_target)[0]:
            wanted[".".join(ocp.tree.str_keypath(path))] = (jax.tree_util.keystr(path), tuple(np.shape(x)))
        where = f"checkpoint step {step} in {self.directory}"
        missing = [p for name, (p, _) in wanted.items() if name not in saved]
        if missing:
            raise CheckpointMismatchError(f"{where} has no leaf for target path(s) {', '.join(missing[:5])}")
        extra = sorted(set(saved) - set(wanted))
        if extra:
            raise CheckpointMismatchError(f"{where} has leaves the target lacks: {', '.join(extra[:5])}")
        for name, (path, shape) in wanted.items():
            if saved[name] != shape:
                raise CheckpointMismatchError(
                    f"{where}: leaf {path} has shape {saved[name]} in the checkpoint, {shape} in the target"
                )

    def wait(self) -> None:
        """Block until pending asynchronous saves have committed (raises :class:`CheckpointWriteError` if one
        failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._failed(e)

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources (a failed save raises, once)."""
        try:
            if self._failure is None:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # a failure already reported by wait(); nothing is left to release
                log.debug("closing the checkpoint manager of %s", self.directory, exc_info=True)

    def _failed(self, error: Exception) -> NoReturn:
        """Let orbax's background writes of the failed save end, remove what they left, and raise one
        :class:`CheckpointWriteError` (their own late errors go to the log file, not the terminal)."""
        if isinstance(error, CheckpointWriteError):
            raise error
        if self._failure is not None:
            raise self._failure from error
        _quiet_background_errors()
        # Nothing to wait for when the save never made its temporary directory (a read-only place): orbax's
        # signalling threads would sit out their 300 s barrier timeout, and nothing else writes.
        started = os.path.isdir(self.directory) and any(TMP_MARKER in n for n in os.listdir(self.directory))
        _settle_orbax_threads(30.0 if started else 1.0)
        try:
            self._manager.close()
        except Exception:
            log.debug("closing the checkpoint manager of %s after a failed save", self.directory,
                      exc_info=True)
        self.remove_incomplete()
        cause = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, OSError):
            cause = f"{type(error).__name__}: {cause}"
        kept = self.all_steps()
        self._failure = CheckpointWriteError(
            f"cannot write a checkpoint to {self.directory}: {cause} (the checkpoints there, steps "
            f"{kept or 'none'}, are intact; a rerun resumes from the last one)"
        )
        raise self._failure from error

    def remove_incomplete(self) -> None:
        """Delete the temporary directories of saves that never committed (the main process only)."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if TMP_MARKER in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_orbax_thread(thread: threading.Thread) -> bool:
    """A thread orbax runs a save in: its own thread classes, and its event loops' executor threads."""
    return type(thread).__module__.startswith("orbax") or thread.name.startswith("asyncio_")


def _settle_orbax_threads(timeout: float = 30.0) -> None:
    """Wait (up to ``timeout`` seconds) until the background threads of a failed save have ended, so
    that nothing writes into its temporary directory after it is removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_is_orbax_thread(t) for t in threading.enumerate()
                                              if t is not threading.current_thread()):
        time.sleep(0.02)


def _is_closed_loop_error(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _route_closed_loop_errors() -> None:
    """When one write of an asynchronous save fails, tensorstore's callbacks for the writes still in flight
    find their event loop closed, before the failure reaches :meth:`CheckpointManager.wait`; each was a
    bare traceback on the terminal (~20 per failed save). Those alone go to the log file; every other
    unraisable error still reaches the hook that was installed before."""
    if getattr(sys.unraisablehook, "_jaxrlhf_closed_loop", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if not _is_closed_loop_error(unraisable.exc_value):
            previous(unraisable)
            return
        from jaxrlhf.train.metrics import FILE_ONLY

        log.debug("a checkpoint write's callback after its event loop closed: %s", unraisable.exc_value,
                  extra={FILE_ONLY: True})

    hook._jaxrlhf_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _quiet_background_errors() -> None:
    """After a failed save, the writes still in flight fail too, in threads and closed event loops: their
    reports go to the log file (``run.log``), one line each on the terminal is already one too many."""
    from jaxrlhf.train.metrics import FILE_ONLY

    def to_log_file(unraisable: sys.UnraisableHookArgs) -> None:
        log.warning("after the failed checkpoint save: %s", unraisable.exc_value, extra={FILE_ONLY: True},
                    exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))

    def thread_to_log_file(args: threading.ExceptHookArgs) -> None:  # e.g. "Event loop is closed"
        log.warning("after the failed checkpoint save, in thread %s: %s", getattr(args.thread, "name", "?"),
                    args.exc_value, extra={FILE_ONLY: True},
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.unraisablehook = to_log_file
    threading.excepthook = thread_to_log_file
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    logging.getLogger("asyncio").addFilter(_file_only_records)


def _file_only_records(record: logging.LogRecord) -> bool:
    from jaxrlhf.train.metrics import FILE_ONLY

    setattr(record, FILE_ONLY, True)
    return True

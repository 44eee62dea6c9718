"""A training run's host side: the device mesh, and the three services a trainer composes — the run
directory (:mod:`~jaxrlhf.train.run_dir`), checkpoints (:mod:`~jaxrlhf.train.checkpointing`) and reporting
(:mod:`~jaxrlhf.train.reporting`) — plus the one jit helper and the step-count rule.

A trainer builds its pure step, compiles it with :func:`compile_step` and hands it to the training loop
(:func:`jaxrlhf.train.loop.training_loop`), which resumes, opens the run directory and drives the step. The
constructor writes nothing: a run that fails while loading its inputs leaves its directory untouched.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.collective_order import maybe_sequence_loops
from jaxrlhf.config import ConfigError
from jaxrlhf.steps.state import FrozenApart, detach_frozen
from jaxrlhf.train.checkpointing import Checkpointing
from jaxrlhf.train.reporting import Reporting
from jaxrlhf.train.run_config import CheckpointSection, LoggingSection, TrainSection
from jaxrlhf.train.run_dir import RunDirectory

log = logging.getLogger("jaxrlhf")


def compile_step(
    fn: Callable[..., Any],
    donate: bool = True,
    static_argnums: tuple[int, ...] = (),
    state_shardings: Any = None,
) -> Any:
    """``jax.jit`` of a step, donating its first argument (the state) when ``donate``.

    The one place steps are compiled. On several CPU processes the step's loops are fenced
    (:mod:`jaxrlhf.collective_order`), so that gloo sees every device's collectives in one order.
    Input shardings follow the (placed) arguments; for a
    ``step(state, ...) -> (state, metrics)``, ``state_shardings`` pins the returned state to the layout it
    came in with, so the next call neither recompiles nor loses the donation.
    """
    out = None if state_shardings is None else (state_shardings, None)
    fn = maybe_sequence_loops(fn)  # several CPU processes: one collective order on every device
    if not donate:
        return jax.jit(fn, static_argnums=static_argnums, out_shardings=out)
    # The state's frozen params (LoRA's base) go in as an argument of their own that is not donated.
    bare_out = None if out is None else (detach_frozen(state_shardings)[0], None)
    static = tuple(i + 1 for i in static_argnums)
    return FrozenApart(fn, lambda apart: jax.jit(apart, donate_argnums=(0,), static_argnums=static,
                                                 out_shardings=bare_out))


def _plain(config: Any) -> dict[str, Any] | None:
    from jaxrlhf.config import to_dict

    if dataclasses.is_dataclass(config):
        return to_dict(config)
    return dict(config) if isinstance(config, dict) else None


def total_steps(train: TrainSection, batches_per_epoch: int) -> int:
    """``train.steps``, else ``train.epochs`` × batches per epoch."""
    if train.steps is not None:
        return train.steps
    assert train.epochs is not None
    return train.epochs * batches_per_epoch


@dataclasses.dataclass
class RunResult:
    """What a finished (or deliberately stopped) run leaves behind."""

    run_dir: str
    step: int
    export_dir: str | None
    metrics: dict[str, float]
    stopped_early: bool = False


class Run:
    """One training run of ``jaxrlhf <command>`` with ``config`` (use as a context manager).

    ``run.directory``, ``run.checkpoints`` and ``run.report`` are its services; the mesh helpers place
    states and batches. ``state_key`` names the training state inside a checkpoint.
    """

    def __init__(
        self,
        command: str,
        config: Any,
        checkpoint: CheckpointSection,
        logging_: LoggingSection,
        train: TrainSection,
        peak_dtype: str = "float32",
        state_key: str = "train",
        parallel_cfg: parallel.ParallelConfig | None = None,
    ):
        # Multi-host start-up must precede every other JAX call (orbax and the FLOP probe below make some).
        self.parallel_cfg = parallel_cfg or parallel.ParallelConfig()
        parallel.initialize_distributed(self.parallel_cfg)
        try:
            self.mesh = parallel.make_mesh(self.parallel_cfg)
        except ValueError as e:
            raise ConfigError(f"parallel: {e}") from None
        self.command, self.config = command, config
        self.is_main = jax.process_index() == 0
        self.directory = RunDirectory(logging_.run_dir, command, logging_.level, enabled=self.is_main)
        self.directory.lock()  # before anything reads or cleans its checkpoints (a new directory: at open)
        self.checkpoints = Checkpointing(command, checkpoint, train, self.directory.path, state_key)
        self.checkpoints.on_committed = self.directory.commit_config
        self.report = Reporting(command, logging_, train, peak_dtype, enabled=self.is_main)
        log.info(
            "device mesh %s over %d device(s) in %d process(es)",
            dict(self.mesh.shape),
            self.mesh.size,
            jax.process_count(),
        )
        if self.mesh.size < jax.device_count():
            log.warning("parallel.data × parallel.fsdp = %d of the %d devices: the other %d stay idle",
                        self.mesh.size, jax.device_count(), jax.device_count() - self.mesh.size)

    @property
    def run_dir(self) -> str:
        return self.directory.path

    def open(self, resume_step: int) -> None:
        """Write the run directory (config.yaml, run.log) and start the metrics logger at ``resume_step``:
        call once the inputs are validated and the checkpoint (if any) is restored."""
        self.directory.open(self.config)
        self.report.open(self.run_dir, resume_step, _plain(self.config))

    # ------------------------------------------------------------------ devices
    def place(self, state: Any, name: str = "state") -> Any:
        """``state`` on the mesh: replicated, or FSDP-sharded by ``parallel.fsdp``; logs bytes per device."""
        placed = parallel.place_state(self.mesh, state, self.parallel_cfg.fsdp_min_size)
        fsdp = self.mesh.shape[parallel.FSDP_AXIS]
        split = parallel.split_fraction(state, fsdp, self.parallel_cfg.fsdp_min_size)
        if fsdp > 1 and split < 0.5:
            log.warning("%s: parallel.fsdp=%d splits only %.0f%% of its bytes (a leaf is split along a "
                        "dimension divisible by %d, if it has at least parallel.fsdp_min_size=%d elements); "
                        "the rest is whole on every device", name, fsdp, 100 * split, fsdp,
                        self.parallel_cfg.fsdp_min_size)
        log.info(
            "%s: %.1f MiB per device (%.1f MiB in all)",
            name,
            parallel.per_device_bytes(placed) / 2**20,
            sum(
                np.asarray(x).nbytes if not isinstance(x, jax.Array) else x.nbytes
                for x in jax.tree.leaves(state)
            )
            / 2**20,
        )
        return placed

    def state_shardings(self, state: Any) -> Any:
        """The shardings :meth:`place` gives ``state`` (for :func:`compile_step`)."""
        return parallel.state_shardings(self.mesh, state, self.parallel_cfg.fsdp_min_size)

    def shard(self, batch: Any) -> Any:
        """A host batch on the mesh, rows split over every device (each process passes its own rows)."""
        return parallel.shard_batch(self.mesh, batch)

    def check_batch_size(self, key: str, size: int) -> None:
        """Global batch sizes must split evenly over the mesh's devices."""
        if size % self.mesh.size:
            raise ConfigError(
                f"{key}: {size} is not divisible by the {self.mesh.size} devices of the mesh "
                f"{dict(self.mesh.shape)} (set parallel.data / parallel.fsdp or the batch size)"
            )

    def check_micro_batch(self, key: str, rows: int) -> None:
        """Warn when the rows one forward/backward pass sees do not split over the mesh's devices: the step
        then computes each micro-batch whole on every device (results stay right, the work per device
        grows up to the device count)."""
        if rows % self.mesh.size:
            log.warning(
                "%s: micro-batches of %d rows do not split over the %d devices of the mesh %s, so each "
                "device computes every row of each micro-batch (same results, more work per device); make "
                "them a multiple of %d", key, rows, self.mesh.size, dict(self.mesh.shape), self.mesh.size)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        # Each part closes even if one before it fails (a metrics file that cannot be written must not
        # leave a checkpoint save in flight uncommitted).
        try:
            self.report.close()
        finally:
            try:
                self.checkpoints.close()
            finally:
                self.directory.close()
                self.directory.release()

    def __enter__(self) -> Run:
        # Everything jitted inside the run is traced under the mesh, so the steps' row hints apply.
        self._mesh_context = jax.set_mesh(self.mesh)
        self._mesh_context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self._mesh_context.__exit__(None, None, None)

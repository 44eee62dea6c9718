"""What every trainer shares: the one jit helper, the run's host-side services, and the step-count rules.

A trainer builds its pure step, compiles it with :func:`compile_step`, and drives it through a :class:`Run`,
which owns the run directory, message logging, the metrics logger, checkpoints (save / resume), the
non-finite tracker, phase timers, the peak-FLOP/s probe for MFU, recompilation watchers and the progress bar.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxrlhf import parallel
from jaxrlhf.config import ConfigError, to_dict
from jaxrlhf.train.checkpoint import CheckpointManager
from jaxrlhf.train.metrics import MetricsLogger, format_postfix, progress, setup_logging
from jaxrlhf.train.nonfinite import NonFiniteTracker
from jaxrlhf.train.run_config import CheckpointSection, LoggingSection, TrainSection
from jaxrlhf.train.timing import CompileWatcher, Timers, matmul_peak_flops

log = logging.getLogger("jaxrlhf")


def compile_step(
    fn: Callable[..., Any],
    donate: bool = True,
    static_argnums: tuple[int, ...] = (),
    state_shardings: Any = None,
) -> Any:
    """``jax.jit`` of a step, donating its first argument (the state) when ``donate``.

    The one place steps are compiled. Input shardings follow the (placed) arguments; for a
    ``step(state, ...) -> (state, metrics)``, ``state_shardings`` pins the returned state to the layout it
    came in with, so the next call neither recompiles nor loses the donation.
    """
    out = None if state_shardings is None else (state_shardings, None)
    return jax.jit(
        fn, donate_argnums=(0,) if donate else (), static_argnums=static_argnums, out_shardings=out
    )


def total_steps(train: TrainSection, batches_per_epoch: int) -> int:
    """``train.steps``, else ``train.epochs`` × batches per epoch."""
    if train.steps is not None:
        return train.steps
    assert train.epochs is not None
    return train.epochs * batches_per_epoch


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars to Python floats (one transfer for the whole dict)."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


class MetricsWindow:
    """Running mean of step metrics between two log lines, and plain totals (``tally``) such as tokens."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tallies: dict[str, float] = {}
        self.count = 0

    def tally(self, **amounts: float) -> None:
        for k, v in amounts.items():
            self.tallies[k] = self.tallies.get(k, 0.0) + v

    def add(self, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.tallies.clear()
        self.count = 0


@dataclasses.dataclass
class RunResult:
    """What a finished (or deliberately stopped) run leaves behind."""

    run_dir: str
    step: int
    export_dir: str | None
    metrics: dict[str, float]
    stopped_early: bool = False


class Run:
    """Host-side services of one training run (use as a context manager; :meth:`close` waits for saves)."""

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
        self.command = command
        self.state_key = state_key  # checkpoints hold {state_key: training state, "rng": key}
        self.is_main = jax.process_index() == 0
        self.run_dir = os.path.abspath(logging_.run_dir)
        self.logging_cfg, self.checkpoint_cfg, self.train_cfg = logging_, checkpoint, train
        setup_logging(logging_.level, self.run_dir if self.is_main else None)
        if self.is_main:
            self._write_config(config)
        ckpt_dir = checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        # The interval is applied in save(): orbax's own would also save the first step.
        self.checkpoints = CheckpointManager(
            ckpt_dir, max_to_keep=checkpoint.keep, async_save=checkpoint.async_save
        )
        self.metrics = MetricsLogger(self.run_dir, tensorboard=logging_.tensorboard, enabled=self.is_main)
        self.nonfinite = NonFiniteTracker(train.max_consecutive_nonfinite)
        self.timers = Timers()
        self.window = MetricsWindow()
        self.watchers: dict[str, CompileWatcher] = {}
        self.last_logged: dict[str, float] = {}
        self.peak_flops = math.nan
        if logging_.mfu_matmul_size > 0:
            self.peak_flops = matmul_peak_flops(logging_.mfu_matmul_size, jnp.dtype(peak_dtype))
            log.info(
                "peak matmul throughput %.3g FLOP/s (%s, n=%d), the MFU denominator",
                self.peak_flops,
                peak_dtype,
                logging_.mfu_matmul_size,
            )
        self.bar: Any = None
        log.info(
            "device mesh %s over %d device(s) in %d process(es)",
            dict(self.mesh.shape),
            self.mesh.size,
            jax.process_count(),
        )

    # ------------------------------------------------------------------ devices
    def place(self, state: Any, name: str = "state") -> Any:
        """``state`` on the mesh: replicated, or FSDP-sharded by ``parallel.fsdp``; logs bytes per device."""
        placed = parallel.place_state(self.mesh, state, self.parallel_cfg.fsdp_min_size)
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

    @property
    def peak_known(self) -> bool:
        """Whether the FLOP/s probe ran (``logging.mfu_matmul_size`` > 0), so MFU can be reported."""
        return math.isfinite(self.peak_flops)

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

    def _write_config(self, config: Any) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        path = Path(self.run_dir) / "config.yaml"
        # Reloadable as is: `jaxrlhf <command> --config <run_dir>/config.yaml` repeats the run.
        header = f"# jaxrlhf {self.command} --config {path}\n"
        text = header + yaml.safe_dump(to_dict(config), sort_keys=False)
        if path.is_file() and path.read_text() != text:
            log.warning("%s differs from this run's config; replacing it (old one: config.yaml.prev)", path)
            os.replace(path, path.with_suffix(".yaml.prev"))
        path.write_text(text)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """The latest checkpoint restored into ``target``'s structure, or ``None`` (fresh start).

        With ``checkpoint.resume`` false, existing checkpoints are an error: a fresh run would interleave its
        steps with them (and prune them), never silently overwrite a good checkpoint.
        """
        step = self.checkpoints.latest_step()
        if step is None:
            return None
        if not self.checkpoint_cfg.resume:
            raise ConfigError(
                f"checkpoint.resume: false, but {self.checkpoints.directory} already holds checkpoints "
                f"(steps {self.checkpoints.all_steps()}); resume them or choose another logging.run_dir / "
                "checkpoint.dir"
            )
        state, metadata = self.checkpoints.restore(step, target)
        if metadata.get("command", self.command) != self.command:
            raise ConfigError(
                f"checkpoint.dir: {self.checkpoints.directory} holds a {metadata['command']!r} run, "
                f"not {self.command!r} (set checkpoint.resume=false or another directory)"
            )
        self.nonfinite.total_skips = int(metadata.get("nonfinite_skips", 0))
        log.info("resuming from step %d of %s", step, self.checkpoints.directory)
        return state, metadata

    def resume_loop(self, state: Any, rng: jax.Array, batches: Any) -> tuple[Any, jax.Array, int]:
        """``(state, rng, step)`` of the latest checkpoint (``{state_key: state, "rng": rng}``, with the
        data iterator's position restored into ``batches``), or the given ones at step 0."""
        restored = self.resume({self.state_key: state, "rng": rng})
        if restored is None:
            return state, rng, 0
        saved, metadata = restored
        batches.restore(metadata["data"])
        return saved[self.state_key], saved["rng"], int(metadata["step"])

    def end_step(self, step: int, total: int, state: Any, rng: jax.Array, batches: Any) -> bool:
        """Checkpoint on schedule and at the last step; True when ``train.stop_at_step`` ends this
        invocation here (after a checkpoint, so the next one resumes)."""
        stop = self.train_cfg.stop_at_step == step and step < total
        self.save(
            step, {self.state_key: state, "rng": rng}, {"data": batches.state()}, force=stop or step == total
        )
        if stop:
            log.info("stopping at step %d (train.stop_at_step); run again to resume", step)
        return stop

    def save(self, step: int, state: Any, metadata: Mapping[str, Any], force: bool = False) -> bool:
        """Checkpoint ``state`` at ``step`` every ``checkpoint.every`` steps (or now with ``force``)."""
        if not force and step % self.checkpoint_cfg.every:
            return False
        if step in self.checkpoints.all_steps():  # e.g. the final step of a run that already finished
            return False
        meta = {
            "command": self.command,
            "step": step,
            "nonfinite_skips": self.nonfinite.total_skips,
            **metadata,
        }
        return self.checkpoints.save(step, state, meta, force=True)

    # ------------------------------------------------------------------ per-step bookkeeping
    def watch(self, name: str, fn: Any) -> Any:
        """Warn if ``fn`` recompiles after its first call; returns ``fn``."""
        self.watchers[name] = CompileWatcher(fn, name)
        return fn

    def after_step(self, step: int, metrics: Mapping[str, float], finite: bool) -> None:
        """Non-finite accounting (raises after too many in a row), recompile checks, the metrics window."""
        for watcher in self.watchers.values():
            watcher.check(step)
        self.nonfinite.update(step, finite)
        self.window.add(metrics)
        if self.bar is not None:
            self.bar.update(1)

    def should_log(self, step: int, total: int) -> bool:
        return step % self.logging_cfg.log_every == 0 or step == total

    def flush_window(self, step: int, extra: Mapping[str, float], postfix_keys: tuple[str, ...] = ()) -> dict:
        """Log the window's mean metrics, the timers (seconds per step) and ``extra``; reset both."""
        steps = max(self.window.count, 1)
        record = self.window.mean()
        record.update({k: v / steps for k, v in self.timers.summary().items()})
        record.update(extra)
        record.update(self.nonfinite.metrics())
        self.metrics.log(step, record)
        if self.bar is not None and postfix_keys:
            self.bar.set_postfix(format_postfix(record, postfix_keys))
        self.window.reset()
        self.timers.reset()
        self.last_logged = record
        return record

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self.metrics.log(step, metrics)
        log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def start_progress(self, total: int, initial: int) -> None:
        self.bar = progress(
            total, desc=self.command, enabled=self.logging_cfg.progress_bar and self.is_main, initial=initial
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.checkpoints.close()
        self.metrics.close()

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

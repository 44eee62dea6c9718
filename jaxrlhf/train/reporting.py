"""What a run reports as it trains: the metrics window between log lines, phase timers, recompilation
watchers, the non-finite tracker, the progress bar and the metrics logger.

Everything but the logger works before the run directory exists; :meth:`Reporting.open` starts the logger
once the run's inputs are validated, first cutting ``metrics.jsonl`` (and ``text.jsonl``) back to the step the
run resumes from, so that every step appears once however often the run was interrupted.

Each logged window is also one INFO line (``run.log``, and stderr when no progress bar shows it): the step,
steps/s, the time left and the trainer's main metrics — the progress a run shows without a terminal.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.train.metrics import (
    FILE_ONLY,
    MetricsLogger,
    format_postfix,
    progress,
    require_wandb,
    truncate_jsonl,
)
from jaxrlhf.train.nonfinite import NonFiniteTracker
from jaxrlhf.train.run_config import LoggingSection, TrainSection
from jaxrlhf.train.timing import CompileWatcher, Timers, matmul_peak_flops

log = logging.getLogger("jaxrlhf")


def host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
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


class Reporting:
    """The reporting services of one run (``logging`` and ``train`` sections of its config).

    ``peak_dtype`` is the compute dtype of the peak-FLOP/s probe behind MFU (``logging.mfu_matmul_size``
    > 0). Only the main process writes (``enabled``).
    """

    def __init__(self, command: str, logging_: LoggingSection, train: TrainSection,
                 peak_dtype: str = "float32", enabled: bool = True):
        self.command, self.cfg, self.enabled = command, logging_, enabled
        self.timers = Timers()
        self.window = MetricsWindow()
        self.nonfinite = NonFiniteTracker(train.max_consecutive_nonfinite)
        self.watchers: dict[str, CompileWatcher] = {}
        self.last_logged: dict[str, float] = {}
        self.metrics: MetricsLogger | None = None
        self.bar: Any = None
        self.total, self._clock = 0, (0.0, 0)  # steps of the run; (time, step) of the last progress line
        if logging_.wandb and enabled:
            require_wandb()  # before anything is loaded: a missing package is a one-line error
        self.peak_flops = math.nan
        if logging_.mfu_matmul_size > 0:
            self.peak_flops = matmul_peak_flops(logging_.mfu_matmul_size, jnp.dtype(peak_dtype))
            log.info("peak matmul throughput %.3g FLOP/s (%s, n=%d), the MFU denominator",
                     self.peak_flops, peak_dtype, logging_.mfu_matmul_size)

    @property
    def peak_known(self) -> bool:
        """Whether the FLOP/s probe ran (``logging.mfu_matmul_size`` > 0), so MFU can be reported."""
        return math.isfinite(self.peak_flops)

    def open(self, run_dir: str, resume_step: int, config: Mapping[str, Any] | None = None) -> None:
        """Start the metrics logger in ``run_dir``, dropping any record past ``resume_step`` (logged by an
        earlier invocation after its last checkpoint, and about to be logged again). ``config`` (plain
        dicts) goes to Weights & Biases with ``logging.wandb``."""
        if self.enabled:
            for name in ("metrics.jsonl", "text.jsonl"):
                dropped = truncate_jsonl(Path(run_dir) / name, resume_step)
                if dropped:
                    log.info("%s: dropped %d record(s) past step %d (logged after the last checkpoint)",
                             name, dropped, resume_step)
        self.metrics = MetricsLogger(run_dir, tensorboard=self.cfg.tensorboard, enabled=self.enabled,
                                     wandb=self.cfg.wandb, config=config)

    def watch(self, name: str, fn: Any) -> Any:
        """Warn if the jitted ``fn`` recompiles after its first call; returns ``fn``."""
        self.watchers[name] = CompileWatcher(fn, name)
        return fn

    def start_progress(self, total: int, initial: int) -> None:
        self.bar = progress(total, desc=self.command, enabled=self.cfg.progress_bar and self.enabled,
                            initial=initial)
        self.total, self._clock = total, (time.perf_counter(), initial)

    def after_step(self, step: int, metrics: Mapping[str, float], finite: bool) -> None:
        """Recompile checks, non-finite accounting (raises after too many in a row), the metrics window."""
        for watcher in self.watchers.values():
            watcher.check(step)
        self.nonfinite.update(step, finite)
        self.window.add(metrics)
        if self.bar is not None:
            self.bar.update(1)

    def should_log(self, step: int, total: int) -> bool:
        return step % self.cfg.log_every == 0 or step == total

    def flush_window(self, step: int, extra: Mapping[str, float], postfix_keys: tuple[str, ...] = ()) -> dict:
        """Log the window's mean metrics, the timers (seconds per step) and ``extra``; reset both."""
        steps = max(self.window.count, 1)
        record = self.window.mean()
        record.update({k: v / steps for k, v in self.timers.summary().items()})
        record.update(extra)
        record.update(self.nonfinite.metrics())
        self.log(step, record)
        if self.bar is not None and postfix_keys:
            self.bar.set_postfix(format_postfix(record, postfix_keys))
        self.log_progress(step, record, postfix_keys)
        self.window.reset()
        self.timers.reset()
        self.last_logged = record
        return record

    def log_progress(self, step: int, record: Mapping[str, float], keys: tuple[str, ...]) -> None:
        """One INFO line: ``step 40/200 (20%) · 3.1 steps/s · 52 s left · loss 1.23 · …``; to the log file
        only while a progress bar on a terminal shows the same."""
        now, (since, from_step) = time.perf_counter(), self._clock
        self._clock = (now, step)
        rate = (step - from_step) / max(now - since, 1e-9)
        left = (self.total - step) / rate if rate > 0 else math.nan
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)", f"{rate:.3g} steps/s"]
        if step < self.total:
            parts.append(f"{_duration(left)} left")
        parts += [f"{k} {v}" for k, v in format_postfix(record, keys).items()]
        bar_shows_it = self.bar is not None and not getattr(self.bar, "disable", True) and sys.stderr.isatty()
        log.info(" · ".join(parts), extra={FILE_ONLY: bar_shows_it})

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        assert self.metrics is not None, "Reporting.open() first"
        self.metrics.log(step, metrics)

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self.log(step, metrics)
        log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def log_text(self, tag: str, text: str, step: int) -> None:
        assert self.metrics is not None, "Reporting.open() first"
        self.metrics.log_text(tag, text, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()



def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"

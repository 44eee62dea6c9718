"""Ctrl-C and ``kill`` without losing work: SIGINT and SIGTERM ask the training loop to stop after the
current step, write a checkpoint and exit with :class:`RunInterrupted`.

    with GracefulStop() as stop:
        while ...:
            ...one step...
            if stop.requested():
                ...checkpoint, then raise stop.interrupted(step, total, directory)

The handlers only set a flag, so a step, and an asynchronous checkpoint being written, are never cut in
the middle. They write nothing either: a signal can land while the main thread is inside a write to stderr,
and a log call from the handler would then be a reentrant write (Python's logging prints that as a
"Logging error" traceback); the warning is logged by :meth:`GracefulStop.requested` instead. A second
signal gives up waiting: it raises ``KeyboardInterrupt`` at once (the run then stops where it is;
pending checkpoint writes are still waited for by the run's ``close``). In a multi-process run every
process stops at the same step (each checkpoint is a collective save): :meth:`GracefulStop.requested`
agrees on it across processes.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import jax
import numpy as np

log = logging.getLogger("jaxrlhf")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """A run stopped on a signal after checkpointing; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int, step: int, total: int, checkpoint_dir: str):
        self.signum, self.step, self.total, self.checkpoint_dir = signum, step, total, checkpoint_dir
        self.exit_code = 128 + int(signum)
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after step {step} of {total}: checkpoint saved in "
            f"{checkpoint_dir}; run the same command again to resume"
        )


class GracefulStop:
    """While entered (in the main thread), SIGINT and SIGTERM set :attr:`signum` instead of stopping."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._announced = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum  # only the flag: see the module docstring on why the handler logs nothing

    def requested(self) -> bool:
        """Whether a signal arrived (in any process of a multi-process run, which then all stop)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = np.asarray(multihost_utils.process_allgather(np.asarray([self.signum or 0], np.int32)))
            if self.signum is None and flags.any():
                self.signum = int(flags[flags > 0][0])
        if self.signum is not None and not self._announced:
            self._announced = True
            log.warning("%s: finishing the current step, then writing a checkpoint (send it again to stop at "
                        "once)", signal.Signals(self.signum).name)
        return self.signum is not None

    def interrupted(self, step: int, total: int, checkpoint_dir: str) -> RunInterrupted:
        assert self.signum is not None
        return RunInterrupted(self.signum, step, total, checkpoint_dir)

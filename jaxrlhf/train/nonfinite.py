"""The host side of the non-finite policy: count the steps whose update was skipped (a NaN/inf loss or
gradient, see ``jaxrlhf.steps.guard``) and stop after too many in a row. Once per step::

    tracker.update(step, metrics["train/skipped_updates"] == 0)   # logs each skip, raises after N in a row
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive training steps produced non-finite values."""


class NonFiniteTracker:
    """Host-side count of skipped (non-finite) steps; raises :class:`NonFiniteError` after too many in a row.

    ``total_skips`` is what trainers log as ``train/nonfinite_skips``; ``consecutive_skips`` resets on
    every finite step.
    """

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteTracker: max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total_skips = 0
        self.consecutive_skips = 0

    def update(self, step: int, ok: bool | jax.Array) -> None:
        """Record whether ``step`` was finite; log a skipped one and raise after ``max_consecutive``."""
        if bool(ok):
            self.consecutive_skips = 0
            return
        self.total_skips += 1
        self.consecutive_skips += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
            step,
            self.consecutive_skips,
            self.total_skips,
        )
        if self.consecutive_skips >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive non-finite steps (last at step {step}); "
                "lower the learning rate or check the data"
            )

    def metrics(self, prefix: str = "train/") -> dict[str, int]:
        """``{prefix + "nonfinite_skips": total_skips}`` for the metrics logger."""
        return {f"{prefix}nonfinite_skips": self.total_skips}

"""The host side of the non-finite policy: NonFiniteTracker counts skipped steps and gives up after too many
in a row (the jitted guard is tested in tests/steps/test_guard.py)."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.train.nonfinite import NonFiniteError, NonFiniteTracker


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

"""DAPO's soft over-long penalty, by hand and against the piecewise formula."""

import numpy as np
import pytest

from jaxrlhf.rl.reward_shaping import soft_overlong_penalty


def test_hand_values(maybe_jit):
    # L_max = 10, L_cache = 4: 0 up to 6, then (6 − L)/4 down to −1 at 10, −1 beyond
    penalty = maybe_jit(soft_overlong_penalty, static_argnames=("max_length", "cache_length"))
    lengths = np.array([0, 3, 6, 7, 8, 9, 10, 11, 50])
    got = penalty(lengths, max_length=10, cache_length=4)
    np.testing.assert_allclose(got, [0, 0, 0, -0.25, -0.5, -0.75, -1, -1, -1])
    assert got.dtype == np.float32


def test_against_formula_and_continuity():
    lengths = np.arange(0, 300)
    got = np.asarray(soft_overlong_penalty(lengths, 256, 64))
    start = 256 - 64
    expected = np.where(lengths <= start, 0.0, np.where(lengths <= 256, (start - lengths) / 64, -1.0))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.max(np.abs(np.diff(got))) <= 1 / 64 + 1e-7  # no cliff anywhere: continuous in L
    assert np.all(np.diff(got) <= 0)  # never rewards length


@pytest.mark.parametrize("cache", [0, -1, 11])
def test_bad_window(cache):
    with pytest.raises(ValueError, match=f"cache_length={cache}, max_length=10"):
        soft_overlong_penalty(np.array([1]), 10, cache)


def test_score_at_last_token_hand_values(maybe_jit):
    from jaxrlhf.rl.reward_shaping import score_at_last_token

    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.int32)
    rewards = maybe_jit(score_at_last_token)(np.array([2.0, -1.0, 0.5, 9.0], np.float32), mask)
    want = np.zeros((4, 4), np.float32)
    want[0, 2], want[1, 3], want[2, 0] = 2.0, -1.0, 0.5  # the empty row gets nothing
    np.testing.assert_array_equal(np.asarray(rewards), want)
    # Every score survives the mask (the point of the helper: [:, -1] would drop rows 0 and 2).
    np.testing.assert_array_equal(np.asarray(rewards * mask).sum(1), [2.0, -1.0, 0.5, 0.0])
    assert rewards.dtype == np.float32
    with pytest.raises(AssertionError):
        score_at_last_token(np.zeros(3, np.float32), mask)

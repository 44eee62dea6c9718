"""Fixed-shape batches: exact padding and alignment on hand-written rows, buckets, last-batch padding."""

import re

import numpy as np
import pytest

from jaxrlhf.data import (
    BatchIterator,
    LengthBuckets,
    PreferenceExample,
    PromptExample,
    RankingExample,
    RatingExample,
    SequenceExample,
    bucket_length,
    pad_batch,
    power_of_two_buckets,
    preference_batch,
    prompt_batch,
    ranking_batch,
    rating_batch,
    sequence_batch,
)


def a(*values):
    return np.asarray(values, np.int32)


def check(batch, expected):
    assert sorted(batch) == sorted(expected)
    for key, value in expected.items():
        want = np.asarray(value, batch[key].dtype)
        np.testing.assert_array_equal(batch[key], want, err_msg=key)
        assert batch[key].dtype == (np.float32 if key == "ratings" else np.int32), key


def test_prompt_batch_is_left_padded_and_padded_to_batch_size():
    rows = [PromptExample(a(8, 9, 10)), PromptExample(a(11))]
    batch = prompt_batch(rows, buckets=LengthBuckets((2, 4, 8), (4,)), pad_id=99, batch_size=3)
    check(
        batch,
        {
            "tokens": [[99, 8, 9, 10], [99, 99, 99, 11], [99, 99, 99, 99]],
            "mask": [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]],
            "row_mask": [1, 1, 0],
        },
    )


def test_sequence_batch_layout_and_loss_alignment():
    rows = [SequenceExample(a(8, 9), a(10, 2)), SequenceExample(a(11), a(12, 13, 2))]
    batch = sequence_batch(rows, buckets=LengthBuckets((2, 4), (2, 4)), pad_id=0, batch_size=3)
    check(
        batch,
        {  # P = 2 | N = 4
            "tokens": [[8, 9, 10, 2, 0, 0], [0, 11, 12, 13, 2, 0], [0, 0, 0, 0, 0, 0]],
            "mask": [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]],
            "loss_mask": [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]],
            "row_mask": [1, 1, 0],
        },
    )
    # Next-token pairing: input tokens[:, :-1] predicts target tokens[:, 1:] where loss_mask[:, 1:] is 1.
    inputs, targets, weights = batch["tokens"][:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
    for b, row in enumerate(rows):
        on = weights[b].astype(bool)
        assert targets[b][on].tolist() == row.response.tolist()
        assert inputs[b][on].tolist() == [*row.prompt[-1:].tolist(), *row.response[:-1].tolist()]


def test_preference_batch_shares_one_shape():
    rows = [
        PreferenceExample(a(8), a(9, 2), a(10, 10, 10, 2)),
        PreferenceExample(a(8, 9), a(2), a(11, 2)),
    ]
    batch = preference_batch(rows, buckets=LengthBuckets((2, 4), (2, 4)), pad_id=0)
    check(
        batch,
        {
            "chosen_tokens": [[0, 8, 9, 2, 0, 0], [8, 9, 2, 0, 0, 0]],
            "chosen_mask": [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]],
            "chosen_loss_mask": [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]],
            "rejected_tokens": [[0, 8, 10, 10, 10, 2], [8, 9, 11, 2, 0, 0]],
            "rejected_mask": [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]],
            "rejected_loss_mask": [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]],
            "row_mask": [1, 1],
        },
    )


def test_ranking_batch_masks_missing_items():
    rows = [
        RankingExample(a(8), (a(9, 2), a(10, 2), a(11, 2))),
        RankingExample(a(12), (a(13, 2), a(14, 14, 2))),
    ]
    batch = ranking_batch(rows, num_items=3, buckets=LengthBuckets((2,), (2, 4)), pad_id=0)
    zeros = [0] * 6
    check(
        batch,
        {
            "tokens": [
                [[0, 8, 9, 2, 0, 0], [0, 8, 10, 2, 0, 0], [0, 8, 11, 2, 0, 0]],
                [[0, 12, 13, 2, 0, 0], [0, 12, 14, 14, 2, 0], zeros],
            ],
            "mask": [[[0, 1, 1, 1, 0, 0]] * 3, [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], zeros]],
            "loss_mask": [[[0, 0, 1, 1, 0, 0]] * 3, [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], zeros]],
            "item_mask": [[1, 1, 1], [1, 1, 0]],
            "row_mask": [1, 1],
        },
    )
    too_many = [RankingExample(a(8), (a(2),) * 4, source="r.jsonl:9")]
    with pytest.raises(
        ValueError, match=re.escape("r.jsonl:9: a ranking of 4 responses exceeds num_items=3")
    ):
        ranking_batch(too_many, num_items=3, buckets=LengthBuckets((2,), (2,)), pad_id=0)


def test_rating_batch_pads_ratings():
    rows = [RatingExample(a(8), a(9, 2), 0.5), RatingExample(a(10), a(2), -1.0)]
    batch = rating_batch(rows, buckets=LengthBuckets((1, 2), (2,)), pad_id=0, batch_size=3)
    check(
        batch,
        {
            "tokens": [[8, 9, 2], [10, 2, 0], [0, 0, 0]],
            "mask": [[1, 1, 1], [1, 1, 0], [0, 0, 0]],
            "loss_mask": [[0, 1, 1], [0, 1, 0], [0, 0, 0]],
            "ratings": [0.5, -1.0, 0.0],
            "row_mask": [1, 1, 0],
        },
    )


def test_empty_shard_and_shape_rows():
    buckets = LengthBuckets((2, 4), (2, 4))
    empty = sequence_batch([], buckets=buckets, pad_id=5, batch_size=2)
    check(
        empty,
        {
            "tokens": np.full((2, 4), 5),
            "mask": np.zeros((2, 4)),
            "loss_mask": np.zeros((2, 4)),
            "row_mask": [0, 0],
        },
    )
    rows = [PromptExample(a(8)), PromptExample(a(8, 9, 10))]
    # The shape comes from all rows (the global batch), not only the ones built here.
    assert prompt_batch(rows[:1], buckets=buckets, pad_id=0, shape_rows=rows)["tokens"].tolist() == [
        [0, 0, 0, 8]
    ]
    with pytest.raises(ValueError, match="explicit batch_size"):
        prompt_batch([], buckets=buckets, pad_id=0)


def test_bucket_helpers():
    assert power_of_two_buckets(100) == (16, 32, 64, 100)
    assert power_of_two_buckets(64) == (16, 32, 64)
    assert power_of_two_buckets(8) == (8,)
    assert LengthBuckets.powers_of_two(32, 20, smallest=8) == LengthBuckets((8, 16, 32), (8, 16, 20))
    assert [bucket_length(n, (2, 4, 8)) for n in (0, 1, 2, 3, 5, 8)] == [2, 2, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="increasing positive ints"):
        LengthBuckets((4, 2), (2,))
    rows = [SequenceExample(a(8), a(2)), SequenceExample(a(8, 8, 8), a(2), source="d.jsonl:7")]
    with pytest.raises(
        ValueError, match=re.escape("d.jsonl:7: prompt of 3 tokens exceeds the largest prompt bucket 2")
    ):
        sequence_batch(rows, buckets=LengthBuckets((1, 2), (2,)), pad_id=0)


def test_pad_batch_generic():
    batch = {"tokens": a([1, 2]), "ratings": np.ones((1,), np.float32)}
    out = pad_batch(batch, 3, pad_id=7)
    np.testing.assert_array_equal(out["tokens"], [[1, 2], [7, 7], [7, 7]])
    np.testing.assert_array_equal(out["ratings"], [1, 0, 0])
    np.testing.assert_array_equal(out["row_mask"], [1, 0, 0])
    with pytest.raises(ValueError, match="does not fit batch_size=0"):
        pad_batch(batch, 0)


def test_buckets_yield_only_configured_shapes():
    # Lengths grow along the dataset (1…16 prompt, 1…32 response tokens), so unshuffled batches vary.
    rows = [
        SequenceExample(np.full(1 + i * 16 // 200, 8, np.int32), np.full(1 + i * 32 // 200, 9, np.int32))
        for i in range(200)
    ]
    buckets = LengthBuckets((4, 8, 16), (8, 16, 32))
    shapes = set()
    for chunk in BatchIterator(rows, 8, seed=0, shuffle=False, process_index=0, process_count=1, epochs=1):
        batch = sequence_batch(chunk, buckets=buckets, pad_id=0)
        p = min(s for s in buckets.prompt if s >= max(len(r.prompt) for r in chunk))
        n = min(s for s in buckets.response if s >= max(len(r.response) for r in chunk))
        assert batch["tokens"].shape == (8, p + n)
        shapes.add((p, n))
    assert shapes <= {(p, n) for p in buckets.prompt for n in buckets.response}
    assert shapes == {(4, 8), (8, 16), (16, 32)}  # 25 batches, 3 shapes

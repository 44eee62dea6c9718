"""BatchIterator: per-epoch seeded shuffling, resume equality, and splitting global batches by process."""

import functools
import itertools

import numpy as np
import pytest

from jaxrlhf.data import BatchIterator, LengthBuckets, PromptExample, epoch_permutation, prompt_batch

SINGLE = {"process_index": 0, "process_count": 1}


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def flat(batches):
    return list(itertools.chain.from_iterable(batches))


def test_epochs_are_seeded_permutations():
    data = list(range(12))
    first = take(BatchIterator(data, 4, seed=3, **SINGLE), 6)
    assert first == take(BatchIterator(data, 4, seed=3, **SINGLE), 6)  # deterministic
    assert first != take(BatchIterator(data, 4, seed=4, **SINGLE), 6)
    epoch0, epoch1 = flat(first[:3]), flat(first[3:])
    assert sorted(epoch0) == sorted(epoch1) == data and epoch0 != epoch1
    assert epoch0 == epoch_permutation(12, 3, 0).tolist()
    assert take(BatchIterator(data, 4, seed=3, shuffle=False, **SINGLE), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_drop_last_and_epoch_limit():
    data = list(range(10))
    kept = list(BatchIterator(data, 4, seed=0, drop_last=True, epochs=2, **SINGLE))
    assert [len(b) for b in kept] == [4, 4, 4, 4]
    full = list(BatchIterator(data, 4, seed=0, drop_last=False, epochs=1, **SINGLE))
    assert [len(b) for b in full] == [4, 4, 2] and sorted(flat(full)) == data


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 5])
def test_resume_gives_the_same_batches(stop):
    data = [PromptExample(np.arange(1 + i % 5, dtype=np.int32)) for i in range(10)]
    make = functools.partial(
        BatchIterator,
        data,
        4,
        seed=7,
        drop_last=False,
        collate=functools.partial(prompt_batch, buckets=LengthBuckets((2, 4, 8), (4,)), pad_id=0),
        **SINGLE,
    )
    uninterrupted = take(make(), 8)  # 3 batches per epoch: crosses two epoch boundaries
    interrupted = make()
    head = take(interrupted, stop)
    state = interrupted.state()
    assert state == {"epoch": stop // 3, "position": stop % 3, "seed": 7, "size": 10, "batch_size": 4,
                     "fingerprint": make().fingerprint}
    resumed = make()
    resumed.restore(dict(state))
    for want, got in zip(uninterrupted, head + take(resumed, 8 - stop), strict=True):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_restore_checks_the_state():
    it = BatchIterator(list(range(8)), 4, seed=1, **SINGLE)
    with pytest.raises(ValueError, match="seed=2 does not match this iterator's seed=1"):
        it.restore({"epoch": 0, "position": 0, "seed": 2, "size": 8})
    with pytest.raises(ValueError, match="position=3 is out of range"):
        it.restore({"epoch": 0, "position": 3})


def test_restore_refuses_another_batch_size_or_other_data_of_the_same_size():
    """A saved position counts batches of the saved size over the saved data: another data.batch_size
    reread it silently (rows skipped), and so did another train file of as many rows."""
    rows = [PromptExample(np.arange(3, dtype=np.int32) + i, f"a.jsonl:{i + 1}") for i in range(8)]
    saved = BatchIterator(rows, 2, seed=1, **SINGLE)
    take(saved, 3)
    state = saved.state()
    assert state["batch_size"] == 2 and 0 <= state["fingerprint"] < 2**63
    with pytest.raises(ValueError, match=r"batch_size=2 does not match .* batch_size=4: the batch size "
                                         r"\(data\.batch_size\) differs"):
        BatchIterator(rows, 4, seed=1, **SINGLE).restore(state)
    other = [PromptExample(r.prompt + (i == 5), r.source) for i, r in enumerate(rows)]  # one token changed
    with pytest.raises(ValueError, match=r"the data's content \(data\.train_file\) differs"):
        BatchIterator(other, 2, seed=1, **SINGLE).restore(state)
    moved = [PromptExample(r.prompt.copy(), f"elsewhere/b.jsonl:{i + 1}") for i, r in enumerate(rows)]
    resumed = BatchIterator(moved, 2, seed=1, **SINGLE)  # the same rows read from another place: fine
    resumed.restore(state)
    assert resumed.state() == state
    # A state saved before batch size and content were recorded is still accepted.
    old = {k: v for k, v in state.items() if k not in ("batch_size", "fingerprint")}
    BatchIterator(rows, 4, seed=1, **SINGLE).restore({**old, "position": 0})


def test_processes_partition_each_global_batch():
    data = list(range(24))
    global_batches = take(BatchIterator(data, 8, seed=5, process_index=0, process_count=1), 6)
    shards = [take(BatchIterator(data, 8, seed=5, process_index=p, process_count=4), 6) for p in range(4)]
    for step, global_batch in enumerate(global_batches):
        local = [shards[p][step] for p in range(4)]
        assert all(len(rows) == 2 for rows in local)
        assert flat(local) == global_batch  # contiguous slices, in process order


def test_last_partial_batch_is_padded_to_one_shape_on_every_process():
    # 6 examples, global batch 4 over 2 processes: the last global batch has 2 rows, both on process 0.
    data = [PromptExample(np.arange(n, dtype=np.int32) + 8) for n in (1, 1, 1, 1, 1, 6)]
    collate = functools.partial(prompt_batch, buckets=LengthBuckets((2, 8), (4,)), pad_id=0)
    last = [
        list(BatchIterator(data, 4, seed=0, shuffle=False, drop_last=False, process_index=p, process_count=2,
                           collate=collate, epochs=1))[-1]
        for p in range(2)
    ]  # fmt: skip
    assert last[0]["tokens"].shape == last[1]["tokens"].shape == (2, 8)  # process 1's rows are short
    np.testing.assert_array_equal(last[0]["row_mask"], [1, 1])
    np.testing.assert_array_equal(last[1]["row_mask"], [0, 0])
    np.testing.assert_array_equal(last[1]["mask"], np.zeros((2, 8)))
    np.testing.assert_array_equal(last[0]["tokens"][1], [0, 0, 8, 9, 10, 11, 12, 13])


def test_argument_checks_and_jax_defaults():
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        BatchIterator(list(range(8)), 4, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2 is not in"):
        BatchIterator(list(range(8)), 4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="exceeds the dataset's 3 examples"):
        BatchIterator(list(range(3)), 4, seed=0, **SINGLE)
    it = BatchIterator(list(range(8)), 4, seed=0)
    assert (it.process_index, it.process_count, it.local_batch_size) == (0, 1, 4)

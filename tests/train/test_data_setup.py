"""The trainers' data iterators: whole training batches, and a warning for what each epoch leaves out."""

from __future__ import annotations

import logging

import pytest

from jaxrlhf.data import DataError
from jaxrlhf.train import data_setup
from jaxrlhf.train.data_setup import train_iterator


@pytest.fixture
def warnings_of_data_setup():
    """The warning lines of jaxrlhf.train.data_setup, however other tests configured the jaxrlhf logger."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    data_setup.log.addHandler(handler)
    yield records
    data_setup.log.removeHandler(handler)


def collate(rows, **_):
    return {"x": rows}


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_epoch_takes_whole_batches_and_says_what_it_leaves_out(shuffle, warnings_of_data_setup):
    """10 examples in batches of 4: 8 per epoch (2 left out, warned once, with which); the examples an
    epoch uses are distinct, and without shuffling the last two are never among them."""
    batches = train_iterator(list(range(10)), 4, seed=0, collate=collate, shuffle=shuffle, path="f.jsonl")
    assert batches.batches_per_epoch == 2
    seen = [x for _ in range(2) for x in next(batches)["x"]]
    assert len(set(seen)) == 8
    if not shuffle:
        assert set(seen) == set(range(8))
    (message,) = warnings_of_data_setup
    assert message.startswith("f.jsonl: 2 of its 10 examples are left out of each epoch, which takes whole "
                              "batches of data.batch_size=4: ")
    assert ("never trained on" in message) != shuffle
    train_iterator(list(range(8)), 4, seed=0, collate=collate, shuffle=shuffle, path="g.jsonl")
    assert len(warnings_of_data_setup) == 1  # nothing left out, nothing said
    with pytest.raises(DataError, match=r"data\.batch_size=11 exceeds the file's 10 examples"):
        train_iterator(list(range(10)), 11, seed=0, collate=collate, shuffle=shuffle, path="f.jsonl")

"""A deterministic, resumable batch iterator that splits each global batch between processes.

Epoch e visits the examples in the order ``permutation(seed, e)`` (identity without shuffling); global
batch b of that epoch is positions ``[b·B, (b+1)·B)`` of it, and process p of P takes the contiguous slice
``[p·B/P, (p+1)·B/P)`` of that global batch. Everything depends only on (seed, epoch, position), so
``state()`` is two counters and a restored iterator continues with exactly the batches an uninterrupted
one would have produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")

# collate(local_rows, batch_size=local batch size, shape_rows=the global batch's rows) -> batch.
# The batch builders of jaxrlhf.data.batching fit this with functools.partial(builder, buckets=…, pad_id=…).
Collate = Callable[..., Any]


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of one epoch: a permutation drawn from a generator seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class BatchIterator(Generic[T]):
    """Iterate over this process's share of fixed-size global batches, epoch after epoch.

    ``batch_size`` is the global batch size; each process gets ``batch_size // process_count`` rows.
    With ``drop_last`` the incomplete final global batch of an epoch is skipped; without it, that batch
    is yielded too, and ``collate`` (when given) pads each process's share to the local batch size.
    Without ``collate`` each item is the list of this process's examples. ``epochs=None`` runs forever.
    """

    def __init__(
        self,
        dataset: Sequence[T],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        collate: Collate | None = None,
        epochs: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax  # only for the defaults, so the data layer works without touching devices

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of process_count={process_count}"
            )
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if drop_last and batch_size > len(dataset):
            raise ValueError(
                f"batch_size={batch_size} exceeds the dataset's {len(dataset)} examples with drop_last=True"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.drop_last, self.collate, self.epochs = shuffle, drop_last, collate, epochs
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        n, b = len(dataset), batch_size
        self.batches_per_epoch = n // b if drop_last else -(-n // b)
        self._epoch, self._position = 0, 0
        self._order = np.arange(0)  # the order of epoch _order_epoch, computed lazily
        self._order_epoch = -1
        self._fingerprint: int | None = None

    @property
    def fingerprint(self) -> int:
        """A 63-bit hash of the dataset's content (arrays, numbers, texts; not where each row came from),
        computed once: a resume on another file of the same size is refused, a moved copy is not."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for example in self.dataset:
                _hash_into(digest, example)
            self._fingerprint = int.from_bytes(digest.digest()[:8], "big") >> 1
        return self._fingerprint

    def state(self) -> dict[str, int]:
        """Where the iterator stands: the next batch is batch ``position`` of epoch ``epoch`` (of batches of
        ``batch_size`` over the dataset whose size and ``fingerprint`` are given)."""
        epoch, position = self._epoch, self._position
        if position >= self.batches_per_epoch:  # the same point, said one way
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed, "size": len(self.dataset),
                "batch_size": self.batch_size, "fingerprint": self.fingerprint}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a ``state()``; seed, dataset size, batch size and content must match the saved ones
        (a state saved before batch size and content were recorded is checked for the rest)."""
        mine = {"seed": self.seed, "size": len(self.dataset), "batch_size": self.batch_size}
        if "fingerprint" in state:  # hashed only when there is something to compare with
            mine["fingerprint"] = self.fingerprint
        for key, value in mine.items():
            if key in state and int(state[key]) != value:
                what = {"batch_size": "the batch size (data.batch_size)",
                        "fingerprint": "the data's content (data.train_file)"}.get(key, key)
                raise ValueError(
                    f"iterator state {key}={state[key]} does not match this iterator's {key}={value}: "
                    f"{what} differs"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"iterator state epoch={epoch}, position={position} is out of range")
        self._epoch, self._position = epoch, position

    def global_indices(self, epoch: int, position: int) -> np.ndarray:
        """Dataset indices of global batch ``position`` of ``epoch`` (all processes' rows)."""
        n = len(self.dataset)
        if self._order_epoch != epoch:
            self._order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order[position * self.batch_size : (position + 1) * self.batch_size]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._position >= self.batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        indices = self.global_indices(self._epoch, self._position)
        self._position += 1
        start = self.process_index * self.local_batch_size
        local = [self.dataset[int(i)] for i in indices[start : start + self.local_batch_size]]
        if self.collate is None:
            return local
        shape_rows = [self.dataset[int(i)] for i in indices]
        return self.collate(local, batch_size=self.local_batch_size, shape_rows=shape_rows)


def _hash_into(digest: Any, value: Any, name: str = "") -> None:
    """Feed ``value`` (an example: a dataclass / NamedTuple / mapping / sequence of arrays, numbers and
    texts) into ``digest``; a field named ``source`` (the row's file and line) is left out."""
    if name == "source":
        return
    if isinstance(value, np.ndarray):
        digest.update(f"a{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (str, bytes)):
        digest.update(b"s" + (value.encode() if isinstance(value, str) else value) + b"\0")
    elif isinstance(value, (bool, int, float, np.generic)) or value is None:
        digest.update(f"n{value!r};".encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _hash_into(digest, getattr(value, field.name), field.name)
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(f"k{key!s};".encode())
            _hash_into(digest, value[key], str(key))
    elif isinstance(value, (list, tuple)):
        digest.update(f"l{len(value)};".encode())
        for item in value:
            _hash_into(digest, item)
    else:
        digest.update(repr(value).encode())

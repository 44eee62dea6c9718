"""A deterministic, resumable batch iterator that splits each global batch between processes.

Epoch e visits the examples in the order ``permutation(seed, e)`` (identity without shuffling); global
batch b of that epoch is positions ``[b·B, (b+1)·B)`` of it, and process p of P takes the contiguous slice
``[p·B/P, (p+1)·B/P)`` of that global batch. Everything depends only on (seed, epoch, position), so
``state()`` is two counters and a restored iterator continues with exactly the batches an uninterrupted
one would have produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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

    def state(self) -> dict[str, int]:
        """Where the iterator stands: the next batch is batch ``position`` of epoch ``epoch``."""
        epoch, position = self._epoch, self._position
        if position >= self.batches_per_epoch:  # the same point, said one way
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed, "size": len(self.dataset)}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a ``state()``; seed and dataset size must match the saved ones."""
        for key, mine in (("seed", self.seed), ("size", len(self.dataset))):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"iterator state {key}={state[key]} does not match this iterator's {key}={mine}"
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

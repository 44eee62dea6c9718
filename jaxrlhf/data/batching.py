"""Fixed-shape numpy batches from tokenized examples.

Layout (the model layer depends on it). A prompt is **left-padded** to the prompt length P and a response
**right-padded** to the response length N, so every prompt ends at column P−1 and every response starts
at column P:

    tokens  = [pad … pad, p_1 … p_m | r_1 … r_n, pad … pad]     # [B, P+N]
    mask    = [ 0  …  0 ,  1  …  1  |  1  …  1 ,  0  …  0 ]
    loss_mask=[ 0  …  0 ,  0  …  0  |  1  …  1 ,  0  …  0 ]

``loss_mask`` is aligned with the **target** token: ``loss_mask[b, j] = 1`` iff token j is a response
token (eos included); it is predicted from the logits at position j − 1, so a next-token loss is
``Σ_j loss_mask[:, j] · −log softmax(logits[:, j−1])[tokens[:, j]]``, i.e. pair ``logits[:, :-1]`` with
``tokens[:, 1:]`` and ``loss_mask[:, 1:]``. Column 0 never carries loss: a prompt has at least one token.

P and N come from a small fixed set of **buckets** (the smallest bucket that fits the longest row of the
batch), so a dataset of varied lengths compiles a few shapes, not one per batch. A batch shorter than
``batch_size`` is padded with fully masked rows (tokens = pad, every mask 0) and ``row_mask`` marks the
real rows; models must therefore tolerate a row whose attention mask is all zeros.

Keys (int32 unless noted; B rows, k ranked items):

- :func:`prompt_batch`: ``tokens, mask`` [B, P]; ``row_mask`` [B].
- :func:`sequence_batch`: ``tokens, mask, loss_mask`` [B, P+N]; ``row_mask`` [B].
- :func:`preference_batch`: ``chosen_tokens, chosen_mask, chosen_loss_mask, rejected_tokens,
  rejected_mask, rejected_loss_mask`` [B, P+N] (one P and N for both sides); ``row_mask`` [B].
- :func:`ranking_batch`: ``tokens, mask, loss_mask`` [B, k, P+N]; ``item_mask`` [B, k]; ``row_mask`` [B].
- :func:`rating_batch`: ``tokens, mask, loss_mask`` [B, P+N]; ``ratings`` [B] float32; ``row_mask`` [B].

Every builder takes ``shape_rows``: the rows whose lengths pick the buckets (default: the rows given). In a
multi-process run pass the whole global batch, so every process builds the same shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def power_of_two_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """``(smallest, 2·smallest, 4·smallest, …)`` below ``max_length``, then ``max_length`` itself."""
    if max_length < 1 or smallest < 1:
        raise ValueError(f"need positive lengths, got max_length={max_length}, smallest={smallest}")
    sizes = []
    size = smallest
    while size < max_length:
        sizes.append(size)
        size *= 2
    return (*sizes, max_length)


def _check_buckets(name: str, sizes: tuple[int, ...]) -> None:
    if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"LengthBuckets.{name} must be increasing positive ints, got {sizes!r}")


@dataclass(frozen=True)
class LengthBuckets:
    """Allowed prompt lengths P and response lengths N (a config dataclass)."""

    prompt: tuple[int, ...] = (16, 32, 64, 128, 256)
    response: tuple[int, ...] = (16, 32, 64, 128, 256)

    def __post_init__(self):
        _check_buckets("prompt", self.prompt)
        _check_buckets("response", self.response)

    @classmethod
    def powers_of_two(cls, max_prompt_length: int, max_response_length: int, smallest: int = 16):
        """Power-of-two buckets up to the two maxima (e.g. from a ``TokenizeConfig``)."""
        return cls(
            power_of_two_buckets(max_prompt_length, smallest),
            power_of_two_buckets(max_response_length, smallest),
        )


def bucket_length(length: int, buckets: Sequence[int], what: str = "sequence", source: str = "") -> int:
    """The smallest bucket ≥ ``length``; an error naming ``source`` if none fits."""
    for size in buckets:
        if length <= size:
            return size
    where = f"{source}: " if source else ""
    raise ValueError(f"{where}{what} of {length} tokens exceeds the largest {what} bucket {buckets[-1]}")


def _fit(lengths: Iterable[tuple[int, str]], buckets: Sequence[int], what: str) -> int:
    """The bucket for the longest of (length, source) pairs."""
    longest, source = max(lengths, default=(0, ""), key=lambda pair: pair[0])
    return bucket_length(longest, buckets, what, source)


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int, pad_id: int = 0) -> Batch:
    """Pad every array along axis 0 to ``batch_size`` rows; new rows are fully masked.

    Arrays whose key ends in ``tokens`` are filled with ``pad_id``, all others with 0; ``row_mask`` [B]
    is 1 on the original rows (or keeps the given ``row_mask``) and 0 on the added ones.
    """
    rows = {len(v) for v in batch.values()}
    if len(rows) != 1:
        raise ValueError(f"arrays disagree on the number of rows: { {k: v.shape for k, v in batch.items()} }")
    (n,) = rows
    if n > batch_size:
        raise ValueError(f"a batch of {n} rows does not fit batch_size={batch_size}")
    out = dict(batch)
    out.setdefault("row_mask", np.ones((n,), np.int32))
    for key, value in out.items():
        fill = pad_id if key.endswith("tokens") else 0
        pad = np.full((batch_size - n, *value.shape[1:]), fill, value.dtype)
        out[key] = np.concatenate([value, pad])
    return out


def _prompts(rows: Sequence[Any], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts: tokens, mask [len(rows), length]."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        m = len(row.prompt)
        tokens[i, length - m :] = row.prompt
        mask[i, length - m :] = 1
    return tokens, mask


def _sequences(
    prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], p: int, n: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[prompt left-padded to p | response right-padded to n]: tokens, mask, loss_mask [rows, p+n]."""
    shape = (len(prompts), p + n)
    tokens, mask, loss_mask = (
        np.full(shape, pad_id, np.int32),
        np.zeros(shape, np.int32),
        np.zeros(shape, np.int32),
    )
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        m, r = len(prompt), len(response)
        tokens[i, p - m : p], tokens[i, p : p + r] = prompt, response
        mask[i, p - m : p + r] = 1
        loss_mask[i, p : p + r] = 1
    return tokens, mask, loss_mask


def _finish(batch: Batch, batch_size: int | None, pad_id: int) -> Batch:
    return pad_batch(batch, len(next(iter(batch.values()))) if batch_size is None else batch_size, pad_id)


def _prompt_length(shape_rows: Sequence[Any], buckets: LengthBuckets) -> int:
    return _fit(((len(r.prompt), r.source) for r in shape_rows), buckets.prompt, "prompt")


def _check_rows(rows: Sequence[Any], batch_size: int | None) -> None:
    if not rows and batch_size is None:
        raise ValueError("an empty batch needs an explicit batch_size")


def prompt_batch(
    rows: Sequence[Any],
    *,
    buckets: LengthBuckets,
    pad_id: int,
    batch_size: int | None = None,
    shape_rows: Sequence[Any] | None = None,
) -> Batch:
    """Left-padded prompts of any examples with a ``.prompt``: ``tokens, mask`` [B, P], ``row_mask`` [B]."""
    _check_rows(rows, batch_size)
    p = _prompt_length(rows if shape_rows is None else shape_rows, buckets)
    tokens, mask = _prompts(rows, p, pad_id)
    return _finish({"tokens": tokens, "mask": mask}, batch_size, pad_id)


def sequence_batch(
    rows: Sequence[Any],
    *,
    buckets: LengthBuckets,
    pad_id: int,
    batch_size: int | None = None,
    shape_rows: Sequence[Any] | None = None,
) -> Batch:
    """Prompt + response rows (``SequenceExample``): ``tokens, mask, loss_mask`` [B, P+N], ``row_mask``."""
    _check_rows(rows, batch_size)
    shape_rows = rows if shape_rows is None else shape_rows
    p = _prompt_length(shape_rows, buckets)
    n = _fit(((len(r.response), r.source) for r in shape_rows), buckets.response, "response")
    tokens, mask, loss_mask = _sequences([r.prompt for r in rows], [r.response for r in rows], p, n, pad_id)
    return _finish({"tokens": tokens, "mask": mask, "loss_mask": loss_mask}, batch_size, pad_id)


def preference_batch(
    rows: Sequence[Any],
    *,
    buckets: LengthBuckets,
    pad_id: int,
    batch_size: int | None = None,
    shape_rows: Sequence[Any] | None = None,
) -> Batch:
    """Chosen and rejected sequences sharing one shape: ``{chosen,rejected}_{tokens,mask,loss_mask}``."""
    _check_rows(rows, batch_size)
    shape_rows = rows if shape_rows is None else shape_rows
    p = _prompt_length(shape_rows, buckets)
    lengths = ((max(len(r.chosen), len(r.rejected)), r.source) for r in shape_rows)
    n = _fit(lengths, buckets.response, "response")
    batch: Batch = {}
    for side in ("chosen", "rejected"):
        arrays = _sequences([r.prompt for r in rows], [getattr(r, side) for r in rows], p, n, pad_id)
        batch.update(zip((f"{side}_tokens", f"{side}_mask", f"{side}_loss_mask"), arrays))
    return _finish(batch, batch_size, pad_id)


def ranking_batch(
    rows: Sequence[Any],
    *,
    num_items: int,
    buckets: LengthBuckets,
    pad_id: int,
    batch_size: int | None = None,
    shape_rows: Sequence[Any] | None = None,
) -> Batch:
    """Rankings of up to ``num_items`` responses, best first: ``tokens, mask, loss_mask`` [B, k, P+N],
    ``item_mask`` [B, k] (1 on the ranked items; shorter rankings have masked trailing items)."""
    _check_rows(rows, batch_size)
    shape_rows = rows if shape_rows is None else shape_rows
    for r in rows:
        if len(r.responses) > num_items:
            raise ValueError(
                f"{r.source}: a ranking of {len(r.responses)} responses exceeds num_items={num_items}"
            )
    p = _prompt_length(shape_rows, buckets)
    n = _fit(((max(map(len, r.responses)), r.source) for r in shape_rows), buckets.response, "response")
    empty = np.zeros((0,), np.int32)
    prompts = [r.prompt for r in rows for _ in range(num_items)]
    responses = [r.responses[j] if j < len(r.responses) else empty for r in rows for j in range(num_items)]
    tokens, mask, loss_mask = _sequences(prompts, responses, p, n, pad_id)
    item_mask = np.array([[j < len(r.responses) for j in range(num_items)] for r in rows], np.int32)
    item_mask = item_mask.reshape(len(rows), num_items)
    # Missing items are fully masked, not just response-less.
    mask = mask * item_mask.reshape(-1, 1)
    tokens = np.where(mask.astype(bool), tokens, pad_id).astype(np.int32)
    batch = {
        "tokens": tokens.reshape(len(rows), num_items, p + n),
        "mask": mask.reshape(len(rows), num_items, p + n),
        "loss_mask": loss_mask.reshape(len(rows), num_items, p + n),
        "item_mask": item_mask,
    }
    return _finish(batch, batch_size, pad_id)


def rating_batch(
    rows: Sequence[Any],
    *,
    buckets: LengthBuckets,
    pad_id: int,
    batch_size: int | None = None,
    shape_rows: Sequence[Any] | None = None,
) -> Batch:
    """Rated sequences (``RatingExample``): as :func:`sequence_batch` plus ``ratings`` [B] float32."""
    batch = sequence_batch(rows, buckets=buckets, pad_id=pad_id, batch_size=batch_size, shape_rows=shape_rows)
    ratings = np.zeros(len(batch["row_mask"]), np.float32)
    ratings[: len(rows)] = [r.rating for r in rows]
    batch["ratings"] = ratings
    return batch

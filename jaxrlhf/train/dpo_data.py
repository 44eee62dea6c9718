"""DPO's data on the host: pairs that carry no preference, a held-out split of the train file, and the cache
of the reference's log-probs batched with the pairs.

The cache is a pure function of the reference's weights and the data, so the trainer recomputes it at every
start-up (one forward pass of the reference over the train and eval pairs) rather than storing it: a stored
cache would have to be checked against the reference weights, the files, the tokenizer and the length
settings that produced it, and a stale one would silently bias every step. The reference (``reference.path``,
or the policy's *initial* weights, which a resumed run loads again before restoring its checkpoint) is the
same at every start-up, so a resumed run gets the same cache and continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from jaxrlhf.data import Batch, DataError, PreferenceExample, RankingExample
from jaxrlhf.data.loader import Collate
from jaxrlhf.parallel import to_host
from jaxrlhf.steps.dpo import REFERENCE_KEYS
from jaxrlhf.train.data_setup import eval_batches

log = logging.getLogger("jaxrlhf")

_HOLD_OUT_STREAM = 0x5EED  # the held-out split's own random stream, independent of the batch order's


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ReferencedPair(PreferenceExample):
    """A preference pair with the reference's sequence log-probs of its two responses (the cache)."""

    ref_chosen_logp: float
    ref_rejected_logp: float


def _lines(examples: Sequence[Any]) -> str:
    shown = ", ".join(e.source.rsplit(":", 1)[-1] for e in examples[:5])
    return shown + (", …" if len(examples) > 5 else "")


def drop_identical_pairs(
    examples: Sequence[PreferenceExample], path: str, policy: Literal["error", "drop"],
    key: str = "dpo.identical_pairs",
) -> list[PreferenceExample]:
    """The pairs whose chosen and rejected token ids differ.

    A pair with identical responses (in the file, or once cut to ``data.max_response_length``) has h ≡ 0 and
    a zero gradient, and the accuracy counts it as lost: ``policy`` "error" raises a :class:`DataError`
    naming its file and line (and the config ``key`` that drops them), "drop" leaves such pairs out with a
    warning that counts them.
    """
    same = [e for e in examples if np.array_equal(e.chosen, e.rejected)]
    if not same:
        return list(examples)
    where = _refuse_if_error(same, len(examples), "pairs", path, policy, key, "'chosen' and 'rejected' are "
                             "identical once tokenized, so the pair carries no preference", "remove them")
    log.warning("dropped %s: 'chosen' and 'rejected' are identical once tokenized", where)
    kept = [e for e in examples if not np.array_equal(e.chosen, e.rejected)]
    if not kept:
        raise DataError(f"{path}: every pair has identical 'chosen' and 'rejected'; nothing to train on")
    return kept


def _refuse_if_error(bad: Sequence[Any], total: int, noun: str, path: str, policy: Literal["error", "drop"],
                     key: str, problem: str, remedy: str) -> str:
    """Which of the file's examples are ``bad`` ("2 of the 16 pairs in f (lines 4, 9)"); for ``policy``
    "error", a DataError at the first of them naming the ``problem`` and the ``key`` that drops them."""
    where = f"{len(bad)} of the {total} {noun} in {path} (lines {_lines(bad)})"
    if policy == "error":
        raise DataError(f"{bad[0].source}: {problem}; {where} are like this: {remedy} or set {key}=drop")
    return where


def drop_repeated_responses(
    examples: Sequence[RankingExample], path: str, policy: Literal["error", "drop"],
    key: str = "reward_model.identical_pairs",
) -> list[RankingExample]:
    """Rankings whose responses are all different token ids.

    A response ranked twice ties with itself: that pair has a zero gradient and the accuracy counts it as
    lost. ``policy`` "error" raises a :class:`DataError` naming its file and line (and the config ``key``),
    "drop" keeps each response's first (best) place, leaves out rankings left with fewer than two, and
    warns with the count.
    """
    # Each distinct response's first (best) place.
    firsts = [[j for j, r in enumerate(e.responses) if not any(np.array_equal(r, q) for q in e.responses[:j])]
              for e in examples]
    repeated = [e for e, keep in zip(examples, firsts) if len(keep) < len(e.responses)]
    if not repeated:
        return list(examples)
    where = _refuse_if_error(repeated, len(examples), "rankings", path, policy, key,
                             "a response appears twice in 'responses' once tokenized, so the ranking ties it "
                             "with itself", "remove the repeats")
    log.warning("%s: kept the first place of each repeated response", where)
    kept = [dataclasses.replace(e, responses=tuple(e.responses[j] for j in keep))
            for e, keep in zip(examples, firsts) if len(keep) >= 2]
    if not kept:
        raise DataError(f"{path}: no ranking has two different responses; nothing to train on")
    return kept


def hold_out(examples: Sequence[Any], fraction: float, seed: int, path: str) -> tuple[list[Any], list[Any]]:
    """(train, held-out): ``round(fraction·n)`` (at least 1) examples drawn by ``seed`` are held out; both
    keep the file's order. The split depends only on (n, fraction, seed), so a resumed run repeats it."""
    n = len(examples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"{path}: dpo.eval_fraction={fraction} would hold out {k} of its {n} pairs, leaving "
                        "none to train on")
    held = np.zeros(n, bool)
    held[np.random.default_rng([seed, _HOLD_OUT_STREAM]).permutation(n)[:k]] = True
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]


def precompute_reference_logps(
    reference: Callable[[Batch], Batch],
    examples: Sequence[PreferenceExample],
    batch_size: int,
    collate: Collate,
    path: str,
) -> list[ReferencedPair]:
    """``examples`` with the reference's log-probs attached, from one pass in file order.

    ``reference(host_batch) -> {"ref_chosen_logps", "ref_rejected_logps"}`` (global [B] arrays) runs the
    reference on a batch of ``collate``; row r of pass batch b is example b·batch_size + r. A non-finite
    log-prob is a :class:`DataError` naming the pair (every step that drew it would be skipped).
    """
    n = len(examples)
    values = np.full((n, 2), np.nan, np.float64)
    for b, batch in enumerate(eval_batches(examples, batch_size, collate)):
        out = to_host(reference(batch))
        rows = min(batch_size, n - b * batch_size)
        for column, key in enumerate(REFERENCE_KEYS):
            values[b * batch_size : b * batch_size + rows, column] = np.asarray(out[key])[:rows]
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        raise DataError(f"{examples[bad[0]].source}: the reference's log-prob of this pair is not finite "
                        f"({bad.size} such pairs in {path}); check the reference model")
    return [
        ReferencedPair(e.prompt, e.chosen, e.rejected, e.source, ref_chosen_logp=float(c),
                       ref_rejected_logp=float(r))
        for e, (c, r) in zip(examples, values)
    ]


def with_reference_logps(collate: Collate) -> Collate:
    """A preference collate whose batches also carry ``ref_chosen_logps, ref_rejected_logps`` [B] float32
    from :class:`ReferencedPair` rows (0 on padded rows)."""

    def build(rows: Sequence[ReferencedPair], **kwargs: Any) -> Batch:
        batch = collate(rows, **kwargs)
        size = len(batch["row_mask"])
        for key, attr in zip(REFERENCE_KEYS, ("ref_chosen_logp", "ref_rejected_logp")):
            values = np.zeros(size, np.float32)
            values[: len(rows)] = [getattr(r, attr) for r in rows]
            batch[key] = values
        return batch

    return build

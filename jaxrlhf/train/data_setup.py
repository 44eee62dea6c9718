"""Datasets for the trainers: JSONL file → tokenized examples → fixed-shape batches (the ``data`` section)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxrlhf.config import ConfigError
from jaxrlhf.data import (
    Batch,
    BatchIterator,
    DataError,
    Example,
    Kind,
    LengthBuckets,
    TokenizeConfig,
    load_examples,
    pad_token_id,
    power_of_two_buckets,
    preference_batch,
    prompt_batch,
    ranking_batch,
    rating_batch,
    sequence_batch,
)
from jaxrlhf.data.loader import Collate
from jaxrlhf.train.run_config import DataSection

log = logging.getLogger(__name__)

_BUILDERS = {
    "sft": sequence_batch,
    "preference": preference_batch,
    "ranking": ranking_batch,
    "rating": rating_batch,
    "prompt": prompt_batch,
}


def tokenize_config(data: DataSection) -> TokenizeConfig:
    """Length limits of the data section (``max_length`` = prompt + response)."""
    return TokenizeConfig(
        max_prompt_length=data.max_prompt_length,
        max_length=data.max_prompt_length + data.max_response_length,
        add_bos=data.add_bos,
        truncate_prompts=data.truncate_prompts,
    )


def _buckets(given: tuple[int, ...], maximum: int, smallest: int, key: str) -> tuple[int, ...]:
    if not given:
        return power_of_two_buckets(maximum, min(smallest, maximum))
    if given[-1] < maximum:
        raise ConfigError(f"data.{key}: the largest bucket {given[-1]} is below the maximum length {maximum}")
    return given


def length_buckets(data: DataSection) -> LengthBuckets:
    """Prompt and response buckets: the configured ones, or powers of two up to the maxima."""
    try:
        smallest = data.smallest_bucket
        return LengthBuckets(
            _buckets(data.prompt_buckets, data.max_prompt_length, smallest, "prompt_buckets"),
            _buckets(data.response_buckets, data.max_response_length, smallest, "response_buckets"),
        )
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


def load_dataset(path: str, kind: Kind, tokenizer: Any, data: DataSection) -> list[Example]:
    """Read and tokenize a JSONL file; errors name the file and line."""
    examples, stats = load_examples(path, kind, tokenizer, tokenize_config(data))
    log.info(
        "%s: %d %s examples (%d prompts cut, %d completions cut)",
        path, stats.examples, kind, stats.truncated_prompts, stats.truncated_completions,
    )
    if stats.untemplated_completions:
        log.warning("%s: the chat template does not render %d conversations as their prompt followed by the "
                    "assistant turn; those responses end with eos instead of the template's end of turn",
                    path, stats.untemplated_completions)
    return examples


def train_and_eval_sets(kind: Kind, tokenizer: Any, data: DataSection,
                        seed: int) -> tuple[list[Example], list[Example] | None]:
    """The training examples and the evaluation examples: ``data.eval_file``'s, else a held-out share
    ``data.eval_fraction`` of the train file (at least one example, leaving at least one batch to train
    on; drawn by ``seed``, so a resumed run holds out the same ones), else None (no evaluation)."""
    train = load_dataset(data.train_file, kind, tokenizer, data)
    if data.eval_file:
        return train, load_dataset(data.eval_file, kind, tokenizer, data)
    if data.eval_fraction <= 0:
        log.info("no data.eval_file and data.eval_fraction 0: no evaluation")
        return train, None
    held = min(max(1, round(data.eval_fraction * len(train))), len(train) - data.batch_size)
    if held < 1:
        log.warning("no data.eval_file, and %s's %d examples leave none to hold out beside a batch of %d: "
                    "no evaluation", data.train_file, len(train), data.batch_size)
        return train, None
    order = np.random.default_rng([seed, 7919]).permutation(len(train))
    chosen = set(order[:held].tolist())
    log.info("no data.eval_file: holding out %d of the %d examples of %s for evaluation "
             "(data.eval_fraction=%g)", held, len(train), data.train_file, data.eval_fraction)
    return ([e for i, e in enumerate(train) if i not in chosen], [train[i] for i in sorted(chosen)])


# The key of a prompt batch's host-side columns (a list of dicts, one per row; see make_collate).
COLUMNS = "columns"


def make_collate(kind: Kind, data: DataSection, tokenizer: Any, num_items: int | None = None,
                 columns: bool = False) -> Collate:
    """The batch builder of ``kind`` with this config's buckets and the tokenizer's pad id.

    ``columns`` (prompt batches): the batch also holds ``batch[COLUMNS]``, each row's prompt as written and
    its record's other keys (``{}`` for padding rows), for reward functions that read them; it stays on
    the host (pop it before putting the batch on devices).
    """
    kwargs: dict[str, Any] = {"buckets": length_buckets(data), "pad_id": pad_token_id(tokenizer)}
    if kind == "ranking":
        kwargs["num_items"] = num_items
    collate = functools.partial(_BUILDERS[kind], **kwargs)
    return functools.partial(_with_columns, collate) if columns else collate


def _with_columns(collate: Collate, rows: Sequence[Any], **kwargs: Any) -> Batch:
    batch = collate(rows, **kwargs)
    padding = len(batch["row_mask"]) - len(rows)
    batch[COLUMNS] = [dict(getattr(r, "columns", None) or {}) for r in rows] + [{}] * padding
    return batch


def ranking_items(examples: Sequence[Any], data: DataSection) -> int:
    """Items per ranking row: the configured number or the longest ranking in ``examples``."""
    longest = max(len(e.responses) for e in examples)
    if data.ranking_items is not None and data.ranking_items < longest:
        raise ConfigError(f"data.ranking_items: {data.ranking_items} < the longest ranking's {longest} items")
    return data.ranking_items or longest


def train_iterator(examples: Sequence[Any], batch_size: int, seed: int, collate: Collate, shuffle: bool,
                   path: str) -> BatchIterator:
    """Endless full batches in a (seed, epoch)-determined order; the state is resumable. Each epoch leaves
    out len % batch_size examples (a warning says how many, and which when the order is fixed)."""
    if batch_size > len(examples):
        raise DataError(f"{path}: data.batch_size={batch_size} exceeds the file's {len(examples)} examples")
    left = len(examples) % batch_size
    if left:
        which = ("different ones each epoch (data.shuffle)" if shuffle else
                 "always the last ones, so they are never trained on (data.shuffle is false)")
        log.warning("%s: %d of its %d examples are left out of each epoch, which takes whole batches of "
                    "data.batch_size=%d: %s", path, left, len(examples), batch_size, which)
    return BatchIterator(examples, batch_size, seed=seed, shuffle=shuffle, drop_last=True, collate=collate)


def eval_batches(examples: Sequence[Any], batch_size: int, collate: Collate) -> Iterator[Batch]:
    """One pass in file order; the last batch is padded with masked rows (``row_mask`` 0)."""
    return iter(BatchIterator(examples, batch_size, seed=0, shuffle=False, drop_last=False, collate=collate,
                              epochs=1))

"""Datasets for the trainers: JSONL file → tokenized examples → fixed-shape batches (the ``data`` section)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

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
    return examples


def make_collate(kind: Kind, data: DataSection, tokenizer: Any, num_items: int | None = None) -> Collate:
    """The batch builder of ``kind`` with this config's buckets and the tokenizer's pad id."""
    kwargs: dict[str, Any] = {"buckets": length_buckets(data), "pad_id": pad_token_id(tokenizer)}
    if kind == "ranking":
        kwargs["num_items"] = num_items
    return functools.partial(_BUILDERS[kind], **kwargs)


def ranking_items(examples: Sequence[Any], data: DataSection) -> int:
    """Items per ranking row: the configured number or the longest ranking in ``examples``."""
    longest = max(len(e.responses) for e in examples)
    if data.ranking_items is not None and data.ranking_items < longest:
        raise ConfigError(f"data.ranking_items: {data.ranking_items} < the longest ranking's {longest} items")
    return data.ranking_items or longest


def train_iterator(examples: Sequence[Any], batch_size: int, seed: int, collate: Collate, shuffle: bool,
                   path: str) -> BatchIterator:
    """Endless full batches in a (seed, epoch)-determined order; the state is resumable."""
    if batch_size > len(examples):
        raise DataError(f"{path}: data.batch_size={batch_size} exceeds the file's {len(examples)} examples")
    return BatchIterator(examples, batch_size, seed=seed, shuffle=shuffle, drop_last=True, collate=collate)


def eval_batches(examples: Sequence[Any], batch_size: int, collate: Collate) -> Iterator[Batch]:
    """One pass in file order; the last batch is padded with masked rows (``row_mask`` 0)."""
    return iter(BatchIterator(examples, batch_size, seed=0, shuffle=False, drop_last=False, collate=collate,
                              epochs=1))

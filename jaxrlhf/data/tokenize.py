"""Records to token ids with any Hugging Face tokenizer.

A prompt is encoded without the tokenizer's own special tokens, optionally with ``bos`` prepended; a
conversation is first rendered by the tokenizer's chat template (``add_generation_prompt=True``), and bos
is then added only if the rendering does not already start with it. A completion is encoded separately
(as TRL does) and followed by ``eos``.

Lengths: a prompt may hold at most ``max_prompt_length`` tokens (bos included): a longer one is an error
naming the file and line, or with ``truncate_prompts="left"`` keeps its last tokens (and its bos). A
completion may hold at most ``max_length − max_prompt_length`` tokens (eos included), so every
prompt + completion fits ``max_length`` in the fixed [prompt | response] layout; a longer one is cut to
that many tokens, has no eos, and is counted in :class:`TokenizeStats`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxrlhf.data.jsonl import (
    DataError,
    Kind,
    PreferenceRecord,
    Prompt,
    PromptRecord,
    RankingRecord,
    RatingRecord,
    Record,
    SFTRecord,
    read_jsonl,
)


@dataclass(frozen=True)
class TokenizeConfig:
    """Length limits and prompt handling (a config dataclass: simple typed fields)."""

    max_prompt_length: int = 256
    max_length: int = 512
    add_bos: bool = False
    truncate_prompts: Literal["error", "left"] = "error"

    def __post_init__(self):
        if self.max_prompt_length < 1 or self.max_length <= self.max_prompt_length:
            raise ValueError(
                f"need 1 <= max_prompt_length < max_length, got max_prompt_length={self.max_prompt_length}, "
                f"max_length={self.max_length}"
            )
        if self.truncate_prompts not in ("error", "left"):
            raise ValueError(f"truncate_prompts must be 'error' or 'left', got {self.truncate_prompts!r}")

    @property
    def max_completion_length(self) -> int:
        return self.max_length - self.max_prompt_length


# Tokenized examples: int32 id arrays; `source` is "path:line" for error messages downstream.
@dataclass(frozen=True, eq=False)
class PromptExample:
    prompt: np.ndarray
    source: str = ""
    # The record's prompt as written (text or messages) and its other keys, for reward functions.
    columns: Mapping[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class SequenceExample:
    prompt: np.ndarray
    response: np.ndarray
    source: str = ""


@dataclass(frozen=True, eq=False)
class PreferenceExample:
    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    source: str = ""


@dataclass(frozen=True, eq=False)
class RankingExample:
    prompt: np.ndarray
    responses: tuple[np.ndarray, ...]  # best first
    source: str = ""


@dataclass(frozen=True, eq=False)
class RatingExample:
    prompt: np.ndarray
    response: np.ndarray
    rating: float
    source: str = ""


Example = PromptExample | SequenceExample | PreferenceExample | RankingExample | RatingExample


@dataclass(frozen=True)
class TokenizeStats:
    """Counts to report: examples, prompts cut on the left, completions cut (each response counts)."""

    examples: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, source: str = "") -> str:
    """Plain text as is; a conversation through the tokenizer's chat template with a generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: the prompt is a chat conversation but the tokenizer "
            f"({type(tokenizer).__name__} {tokenizer.name_or_path!r}) has no chat template; "
            "set tokenizer.chat_template or give the prompt as a string"
        )
    messages = [{"role": m.role, "content": m.content} for m in prompt]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may raise anything (e.g. an unsupported role)
        raise DataError(f"{source}: the chat template failed on this conversation: {e}") from e


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, config: TokenizeConfig, source: str = ""
) -> tuple[np.ndarray, bool]:
    """Prompt ids (int32) and whether they were cut on the left to fit ``max_prompt_length``."""
    ids = _ids(tokenizer, render_prompt(tokenizer, prompt, source))
    bos = tokenizer.bos_token_id
    has_bos = config.add_bos and bos is not None
    if has_bos and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if not ids:
        # The first response token is predicted from the last prompt token, so one must exist.
        raise DataError(f"{source}: the prompt encodes to no tokens (set add_bos=True to start it with bos)")
    limit = config.max_prompt_length
    if len(ids) <= limit:
        return np.asarray(ids, np.int32), False
    if config.truncate_prompts == "error":
        raise DataError(
            f"{source}: the prompt has {len(ids)} tokens, more than max_prompt_length={limit} "
            "(shorten it, raise the limit, or set truncate_prompts='left')"
        )
    kept = [ids[0], *ids[len(ids) - limit + 1 :]] if has_bos else ids[len(ids) - limit :]
    return np.asarray(kept, np.int32), True


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int
) -> tuple[np.ndarray, bool]:
    """Completion ids followed by eos (int32), cut to ``max_tokens`` (then without eos); and whether cut."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} defines no eos token; completions need one")
    ids = [*_ids(tokenizer, text), eos]
    truncated = len(ids) > max_tokens
    return np.asarray(ids[:max_tokens], np.int32), truncated


def tokenize_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig, path: str = ""
) -> tuple[list[Example], TokenizeStats]:
    """Encode records into examples (SFTRecord → SequenceExample, RatingRecord → RatingExample, …).

    ``path`` names the source file in error messages and in each example's ``source``.
    """
    examples: list[Example] = []
    cut_prompts = cut_completions = 0
    for record in records:
        source = f"{path}:{record.line}"
        prompt, cut = encode_prompt(tokenizer, record.prompt, config, source)
        cut_prompts += cut

        def completion(text: str) -> np.ndarray:
            nonlocal cut_completions
            ids, cut = encode_completion(tokenizer, text, config.max_completion_length)
            cut_completions += cut
            return ids

        if isinstance(record, SFTRecord):
            examples.append(SequenceExample(prompt, completion(record.completion), source))
        elif isinstance(record, PreferenceRecord):
            chosen, rejected = completion(record.chosen), completion(record.rejected)
            examples.append(PreferenceExample(prompt, chosen, rejected, source))
        elif isinstance(record, RankingRecord):
            examples.append(RankingExample(prompt, tuple(completion(r) for r in record.responses), source))
        elif isinstance(record, RatingRecord):
            examples.append(RatingExample(prompt, completion(record.response), record.rating, source))
        elif isinstance(record, PromptRecord):
            examples.append(PromptExample(prompt, source, prompt_columns(record)))
        else:
            raise TypeError(f"{source}: not a record: {type(record).__name__}")
    return examples, TokenizeStats(len(examples), cut_prompts, cut_completions)


def prompt_columns(record: PromptRecord) -> dict[str, Any]:
    """A prompt record's columns as TRL hands them to reward functions: ``prompt`` as written (a string, or
    a list of ``{"role", "content"}`` messages) and the record's other keys."""
    prompt = record.prompt
    if not isinstance(prompt, str):
        prompt = [{"role": m.role, "content": m.content} for m in prompt]
    return {**record.columns, "prompt": prompt}


def load_examples(
    path: str | os.PathLike, kind: Kind, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig
) -> tuple[list[Example], TokenizeStats]:
    """``read_jsonl`` then ``tokenize_records``: a JSONL file straight to tokenized examples."""
    return tokenize_records(read_jsonl(path, kind), tokenizer, config, str(path))


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos (as for GPT-2); masks say what is real."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} defines neither a pad nor an eos token")

"""Records to token ids with any Hugging Face tokenizer.

A plain-text prompt is encoded without the tokenizer's own special tokens, then starts with ``bos`` when
``add_bos`` says so (default: when the tokenizer itself puts bos before text, as Llama's do and GPT-2's
does not); a conversation is rendered by the tokenizer's chat template (``add_generation_prompt=True``),
which decides its bos (``add_bos=True`` adds one where the rendering lacks it). A plain-text completion is
encoded separately (as TRL does) and followed by ``eos``; after a conversation, a completion is the
assistant turn as the template renders it after the generation prompt, up to and including the last
special token of that turn (``<|eot_id|>``, ``<|im_end|>``, ``</s>``: the token the model must learn to
stop on, without what a template writes after it, such as ChatML's newline), followed by ``eos`` only
when the turn holds no special token. A template that does not render the conversation as its prompt
followed by the turn falls back to content + ``eos`` and is counted.

Lengths: a prompt may hold at most ``max_prompt_length`` tokens (bos included): a longer one is an error
naming the file and line, or with ``truncate_prompts="left"`` keeps its last tokens (and its bos, whoever
put it there). A completion may hold at most ``max_length − max_prompt_length`` tokens (its ending
included), so every prompt + completion fits ``max_length`` in the fixed [prompt | response] layout; a
longer one is cut to that many tokens, has no ending, and is counted in :class:`TokenizeStats`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxrlhf.data.jsonl import (
    ChatMessage,
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
    # Start plain-text prompts with bos (conversations: where the template's rendering lacks it); None: as
    # the tokenizer itself does when it encodes text with its special tokens.
    add_bos: bool | None = None
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
    # chat completions the template did not render as prompt + turn (encoded as content + eos instead)
    untemplated_completions: int = 0


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


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts its bos before text it encodes with special tokens (Llama: yes; GPT-2:
    no): what ``add_bos=None`` follows for plain-text prompts."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    return bool(ids) and ids[0] == bos and _ids(tokenizer, "a")[:1] != [bos]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, config: TokenizeConfig, source: str = ""
) -> tuple[np.ndarray, bool]:
    """Prompt ids (int32) and whether they were cut on the left to fit ``max_prompt_length``."""
    ids = _ids(tokenizer, render_prompt(tokenizer, prompt, source))
    bos = tokenizer.bos_token_id
    add_bos = config.add_bos
    if add_bos is None:  # as the tokenizer does for text; a conversation's template decides its own
        add_bos = isinstance(prompt, str) and tokenizer_adds_bos(tokenizer)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if not ids:
        # The first response token is predicted from the last prompt token, so one must exist.
        raise DataError(f"{source}: the prompt encodes to no tokens (set data.add_bos=true to start it with "
                        "bos)")
    limit = config.max_prompt_length
    if len(ids) <= limit:
        return np.asarray(ids, np.int32), False
    if config.truncate_prompts == "error":
        raise DataError(
            f"{source}: the prompt has {len(ids)} tokens, more than data.max_prompt_length={limit} "
            "(shorten it, raise the limit, or set data.truncate_prompts=left)"
        )
    keep_bos = bos is not None and ids[0] == bos  # added here or written by the chat template
    kept = [ids[0], *ids[len(ids) - limit + 1 :]] if keep_bos else ids[len(ids) - limit :]
    return np.asarray(kept, np.int32), True


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {*tokenizer.all_special_ids, *(i for i, t in decoder.items() if getattr(t, "special", False))}


def chat_turn_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Sequence[ChatMessage], text: str, source: str = ""
) -> list[int] | None:
    """The assistant turn ``text`` after the conversation ``prompt`` as the chat template renders it after
    the generation prompt, up to and including the turn's last special token (with ``eos`` appended when it
    has none); None when the template does not render prompt + turn as the prompt's rendering followed by
    more text (the caller then falls back to content + eos)."""
    head = render_prompt(tokenizer, prompt, source)
    messages = [{"role": m.role, "content": m.content} for m in (*prompt, ChatMessage("assistant", text))]
    try:
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # a template may raise anything (e.g. an unsupported role)
        raise DataError(f"{source}: the chat template failed on this conversation: {e}") from e
    if not isinstance(whole, str) or not whole.startswith(head) or len(whole) == len(head):
        return None
    ids = _ids(tokenizer, whole[len(head):])
    special = _special_ids(tokenizer)
    ends = [i for i, t in enumerate(ids) if t in special]
    if ends:
        return ids[: ends[-1] + 1]
    return [*ids, tokenizer.eos_token_id]


def chat_turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special token that closes an assistant turn in the tokenizer's chat template (``<|eot_id|>``,
    ``<|im_end|>``, …; what chat completions end with, so rollouts stop there too), or () without a
    template or where it does not render a plain user → assistant exchange."""
    template, eos = getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id
    if not template or eos is None:
        return ()
    # Rendering the template costs ~1 ms; host-side scorers ask once per batch, so remember the answer
    # per tokenizer, for as long as its template and eos stay what they were.
    key = (template if isinstance(template, str) else repr(template), eos)
    try:
        cached = _TURN_END_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: just compute
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        ids = chat_turn_ids(tokenizer, (ChatMessage("user", "a"),), "b")
    except DataError:
        ids = None
    found = (ids[-1],) if ids and ids[-1] in _special_ids(tokenizer) else ()
    try:
        _TURN_END_CACHE[tokenizer] = (key, found)
    except TypeError:
        pass
    return found


_TURN_END_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int, prompt: Prompt = "", source: str = ""
) -> tuple[np.ndarray, bool]:
    """Completion ids (int32) with their ending, cut to ``max_tokens`` (then without it); and whether cut.

    After a plain-text ``prompt``: the text's ids + eos. After a conversation: :func:`chat_turn_ids` (the
    template's end of turn), or the text's ids + eos where the template does not allow that (see
    :func:`encode_completion_counted`)."""
    return encode_completion_counted(tokenizer, text, max_tokens, prompt, source)[:2]


def encode_completion_counted(
    tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int, prompt: Prompt = "", source: str = ""
) -> tuple[np.ndarray, bool, bool]:
    """:func:`encode_completion`, and whether a chat completion fell back to content + eos."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{source or 'completion'}: tokenizer {tokenizer.name_or_path!r} defines no eos "
                        "token; completions need one (set eos_token in its tokenizer_config.json)")
    ids, untemplated = None, False
    if not isinstance(prompt, str):
        ids = chat_turn_ids(tokenizer, prompt, text, source)
        untemplated = ids is None
    if ids is None:
        ids = [*_ids(tokenizer, text), eos]
    truncated = len(ids) > max_tokens
    return np.asarray(ids[:max_tokens], np.int32), truncated, untemplated


def tokenize_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig, path: str = ""
) -> tuple[list[Example], TokenizeStats]:
    """Encode records into examples (SFTRecord → SequenceExample, RatingRecord → RatingExample, …).

    ``path`` names the source file in error messages and in each example's ``source``.
    """
    examples: list[Example] = []
    cut_prompts = cut_completions = untemplated = 0
    if config.add_bos is None:  # resolved once, not per record
        config = replace(config, add_bos=tokenizer_adds_bos(tokenizer))
        config_chat = replace(config, add_bos=False)  # a conversation's template decides its bos
    else:
        config_chat = config
    for record in records:
        source = f"{path}:{record.line}"
        chat = not isinstance(record.prompt, str)
        prompt, cut = encode_prompt(tokenizer, record.prompt, config_chat if chat else config, source)
        cut_prompts += cut

        def completion(text: str, record: Record = record, source: str = source) -> np.ndarray:
            nonlocal cut_completions, untemplated
            ids, cut, fell_back = encode_completion_counted(tokenizer, text, config.max_completion_length,
                                                            record.prompt, source)
            cut_completions += cut
            untemplated += fell_back
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
    return examples, TokenizeStats(len(examples), cut_prompts, cut_completions, untemplated)


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

"""JSONL datasets in the formats TRL users have, read into small typed records.

One JSON object per line; blank lines are skipped; keys other than the ones a kind needs are ignored.

| kind | fields |
|---|---|
| ``"sft"`` | ``prompt``, ``completion`` |
| ``"preference"`` | ``prompt``, ``chosen``, ``rejected``; or ``chosen``, ``rejected`` (implicit prompt) |
| ``"ranking"`` | ``prompt``, ``responses`` (a list, best first, at least 2) |
| ``"rating"`` | ``prompt``, ``response``, ``rating`` (a number; or ``reward``) |
| ``"prompt"`` | ``prompt``; every other key is kept as a column (``PromptRecord.columns``), e.g. a reference
  answer for a reward function |

Conversational (chat) form, as in TRL: ``prompt`` may be a list of ``{"role", "content"}`` messages, or the
conversation may be given as ``messages`` instead of ``prompt``; ``completion``, ``chosen``, ``rejected``,
``response`` and each ranked response may be a list holding one assistant message, whose content is taken.
For ``"sft"``, ``{"messages": [..., {"role": "assistant", ...}]}`` without ``completion`` means the final
assistant turn is the completion and the turns before it are the prompt. Prompts stay as messages here;
the tokenizer's chat template renders them later (:mod:`jaxrlhf.data.tokenize`), with the generation
prompt added.

Implicit prompt (TRL's preference format without ``prompt``): ``chosen`` and ``rejected`` are whole
conversations (or whole texts) and their shared beginning is the prompt (:func:`split_implicit_prompt`):

- conversations: the turns both share are the prompt; what follows must be one assistant turn on each
  side, which is the response;
- texts: the prompt ends at the last whitespace before the first character where the two differ (so
  ``"The sky is blue."`` / ``"The sky is green."`` give the prompt ``"The sky is"`` and the responses
  ``" blue."`` / ``" green."``, as in TRL's documentation); without whitespace after the first word, at
  that character (``"blue sky"`` / ``"bluer sky"`` give ``"blue"``, ``" sky"``, ``"r sky"``). A common
  beginning of only whitespace is refused, and so is a key that looks like a misspelt ``prompt``; a
  column datasets often hold the prompt in (``question``, ``instruction``, ...) is not read, with a warning.

Every error is a :class:`DataError` whose message starts ``path:line:``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jaxrlhf.files import write_text_atomic

log = logging.getLogger("jaxrlhf")

Kind = Literal["sft", "preference", "ranking", "rating", "prompt"]
KINDS: tuple[str, ...] = ("sft", "preference", "ranking", "rating", "prompt")


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the 1-based line."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str


# A prompt is plain text or a conversation to be rendered by the tokenizer's chat template.
Prompt = str | tuple[ChatMessage, ...]


@dataclass(frozen=True)
class SFTRecord:
    prompt: Prompt
    completion: str
    line: int = 0


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: Prompt
    chosen: str
    rejected: str
    line: int = 0


@dataclass(frozen=True)
class RankingRecord:
    prompt: Prompt
    responses: tuple[str, ...]  # best first
    line: int = 0


@dataclass(frozen=True)
class RatingRecord:
    prompt: Prompt
    response: str
    rating: float
    line: int = 0


@dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    line: int = 0
    # The record's other keys (TRL passes them to reward functions as keyword arguments).
    columns: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


Record = SFTRecord | PreferenceRecord | RankingRecord | RatingRecord | PromptRecord


#: The roles a chat message may have (those of the chat templates in use: OpenAI's, Llama 3's, tools).
CHAT_ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def _messages(value: Any, key: str, where: str) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages, got {_describe(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                got = _describe(m[field]) if field in m else "nothing"
                raise DataError(f"{where}: {key}[{i}].{field} must be a string, got {got}")
        if m["role"] not in CHAT_ROLES:  # a template may render any role string: a typo would train as is
            raise DataError(f"{where}: {key}[{i}].role {m['role']!r} is not a chat role (one of "
                            f"{', '.join(CHAT_ROLES)})")
        out.append(ChatMessage(m["role"], m["content"]))
    return tuple(out)


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:60]}"


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    """A response field: a string, or a list holding exactly one assistant message (TRL's chat form)."""
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    return _response(obj[key], key, where)


def _response(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = _messages(value, key, where)
        if len(turns) != 1 or turns[0].role != "assistant":
            roles = [t.role for t in turns]
            raise DataError(f"{where}: {key!r} as messages must be one assistant turn, got roles {roles}")
        return turns[0].content
    raise DataError(f"{where}: {key!r} must be a string or a list of messages, got {_describe(value)}")


def _prompt(obj: Mapping[str, Any], where: str) -> Prompt:
    if "prompt" in obj and "messages" in obj:
        raise DataError(f"{where}: give either 'prompt' or 'messages', not both")
    if "messages" in obj:
        return _messages(obj["messages"], "messages", where)
    if "prompt" not in obj:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages')")
    value = obj["prompt"]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, "prompt", where)
    raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got {_describe(value)}")


def _sft(obj: Mapping[str, Any], line: int, where: str) -> SFTRecord:
    if "messages" in obj and "completion" not in obj and "prompt" not in obj:
        turns = _messages(obj["messages"], "messages", where)
        if len(turns) < 2 or turns[-1].role != "assistant":
            raise DataError(f"{where}: 'messages' must end with an assistant turn after at least one other")
        return SFTRecord(turns[:-1], turns[-1].content, line)
    return SFTRecord(_prompt(obj, where), _text(obj, "completion", where), line)


def _ranking(obj: Mapping[str, Any], line: int, where: str) -> RankingRecord:
    prompt = _prompt(obj, where)
    if "responses" not in obj:
        raise DataError(f"{where}: missing field 'responses'")
    value = obj["responses"]
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(
            f"{where}: 'responses' must be a list of at least 2 responses, got {_describe(value)}"
        )
    return RankingRecord(
        prompt, tuple(_response(v, f"responses[{i}]", where) for i, v in enumerate(value)), line
    )


def _rating(obj: Mapping[str, Any], line: int, where: str) -> RatingRecord:
    prompt, response = _prompt(obj, where), _text(obj, "response", where)
    # "reward" is accepted for "rating" (offline RL data, e.g. `jaxrlhf ilql`); not both.
    if "rating" in obj and "reward" in obj:
        raise DataError(f"{where}: both 'rating' and 'reward' are given; keep one")
    name = "reward" if "reward" in obj else "rating"
    if name not in obj:
        raise DataError(f"{where}: missing field 'rating' (or 'reward')")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: '{name}' must be a finite number, got {_describe(value)}")
    return RatingRecord(prompt, response, float(value), line)


def split_implicit_prompt(
    chosen: str | tuple[ChatMessage, ...], rejected: str | tuple[ChatMessage, ...], where: str = ""
) -> tuple[Prompt, str, str]:
    """``(prompt, chosen response, rejected response)`` of a preference pair given as two whole
    conversations (or two whole texts) that share their beginning; a :class:`DataError` otherwise."""
    where = f"{where}: " if where else ""
    if chosen == rejected:
        raise DataError(f"{where}'chosen' and 'rejected' are identical, so nothing is preferred")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}'chosen' and 'rejected' must both be texts or both be conversations")
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    if isinstance(chosen, str):
        assert isinstance(rejected, str)
        # Cut before the differing word, its leading whitespace going with the responses (TRL's example).
        spaces = [i for i in range(1, shared) if chosen[i].isspace() and not chosen[:i].isspace()]
        cut = spaces[-1] if spaces else shared
        if not chosen[:cut].strip():
            # A prompt of nothing or only whitespace is no prompt: the pair (often a typo'd
            # 'prompt' key) would train on responses to an empty context.
            raise DataError(
                f"{where}'chosen' and 'rejected' share no prompt: their common beginning "
                f"{chosen[:shared]!r} has no text before they differ; give 'prompt' explicitly"
            )
        return chosen[:cut], chosen[cut:], rejected[cut:]
    assert not isinstance(rejected, str)
    if shared == 0:
        raise DataError(
            f"{where}'chosen' and 'rejected' have no common prefix to take as the prompt "
            f"(their first turns differ); give 'prompt' explicitly"
        )
    responses = []
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        rest = turns[shared:]
        if len(rest) != 1 or rest[0].role != "assistant":
            roles = [t.role for t in rest]
            raise DataError(
                f"{where}after the {shared} turn(s) 'chosen' and 'rejected' share, {key!r} must have "
                f"exactly one assistant turn (the response), got roles {roles}"
            )
        responses.append(rest[0].content)
    return chosen[:shared], responses[0], responses[1]


def _whole(obj: Mapping[str, Any], key: str, where: str) -> str | tuple[ChatMessage, ...]:
    """A whole conversation or text (the implicit-prompt preference form)."""
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, key, where)
    raise DataError(f"{where}: {key!r} must be a string or a list of messages, got {_describe(value)}")


def _preference(obj: Mapping[str, Any], line: int, where: str) -> PreferenceRecord:
    if "prompt" in obj or "messages" in obj:
        prompt = _prompt(obj, where)
        return PreferenceRecord(prompt, _text(obj, "chosen", where), _text(obj, "rejected", where), line)
    near = [(k, name) for k in obj if k not in ("chosen", "rejected")
            for name in [_close(k, ("prompt", "messages"))] if name]
    if near:
        # Without 'prompt' the pair is read as implicit-prompt; a misspelt key would be dropped.
        raise DataError(
            f"{where}: unknown key {near[0][0]!r} beside 'chosen' and 'rejected'; did you mean "
            f"{near[0][1]!r}? (without 'prompt' the pair is read as two whole texts sharing their beginning)"
        )
    chosen, rejected = _whole(obj, "chosen", where), _whole(obj, "rejected", where)
    return PreferenceRecord(*split_implicit_prompt(chosen, rejected, where), line)


# Columns that datasets often give the prompt under; beside 'chosen' and 'rejected' without 'prompt' they
# are not read (the pair is implicit-prompt), so reading such a file says so.
PROMPT_LIKE_KEYS = ("question", "instruction", "input", "query", "prompt_text", "context")


def _snake(key: str) -> str:
    """``promptText`` → ``prompt_text``: camelCase and snake_case spellings of a key compare alike."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()


def _close(key: str, names: tuple[str, ...]) -> str | None:
    """The name in ``names`` that ``key`` looks like a misspelling of (case or a letter or two)."""
    lower = _snake(key)
    stems = {*names, *(n.rstrip("s") for n in names)}  # 'message_count' is about messages too
    prefixed = any(lower.startswith(f"{stem}{sep}") for stem in stems for sep in "_-.")
    if prefixed or lower.endswith(("id", "ids")):
        return None  # 'prompt_id', 'promptId', 'prompt_len', 'messages_count': other fields about it
    match = difflib.get_close_matches(lower, names, n=1, cutoff=0.7)
    return match[0] if match else None


def _parse(kind: str, obj: Mapping[str, Any], line: int, where: str) -> Record:
    if kind == "sft":
        return _sft(obj, line, where)
    if kind == "preference":
        return _preference(obj, line, where)
    if kind == "ranking":
        return _ranking(obj, line, where)
    if kind == "rating":
        return _rating(obj, line, where)
    columns = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    return PromptRecord(_prompt(obj, where), line, columns)


def read_jsonl(path: str | os.PathLike, kind: Kind) -> list[Record]:
    """Read a JSONL dataset of the given ``kind`` into records, each carrying its 1-based source line."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {list(KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    records: list[Record] = []
    unused: dict[str, list[int]] = {}  # prompt-like key an implicit-prompt pair leaves unread: [line, count]
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            where = f"{path}:{line}"
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            # Without its line break: an object cut short is then reported at the end of this line, not
            # at "column 1" of a line that does not exist.
            text = text.rstrip("\r\n")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                end = ", the end of the line" if e.pos >= len(text) else ""
                raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno}{end})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(_parse(kind, obj, line, where))
            if kind == "preference" and "prompt" not in obj and "messages" not in obj:
                for key in obj:
                    if _snake(key) in PROMPT_LIKE_KEYS:
                        unused.setdefault(key, [line, 0])[1] += 1
    if not records:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    for key, (first, count) in unused.items():
        log.warning(
            "%s: %d record(s) (the first at line %d) give %r beside 'chosen' and 'rejected' but no 'prompt': "
            "they are read as implicit-prompt pairs (the prompt is the beginning chosen and rejected share) "
            "and %r is not used; if it holds the prompt, name it 'prompt' (chosen and rejected then hold "
            "only the responses)", path, count, first, key, key)
    return records


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, ChatMessage):
        return {"role": value.role, "content": value.content}
    return value


def record_to_json(record: Record | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object for a record (the inverse of reading it; the ``line`` field is dropped)."""
    if isinstance(record, Mapping):
        return dict(record)
    out = {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)
           if f.name not in ("line", "columns")}
    return {**getattr(record, "columns", {}), **out}


def write_jsonl(path: str | os.PathLike, records: Iterable[Record | Mapping[str, Any]]) -> None:
    """Write records (or plain dicts) one JSON object per line, atomically: a temp file, then os.replace.

    A reader never sees a half-written file, and a crash leaves any previous file intact.
    """
    text = "".join(json.dumps(record_to_json(r), ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(path, text)

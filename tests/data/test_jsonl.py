"""Reading and writing JSONL datasets: records, chat forms, and errors that name file and line."""

import json
import os
import re

import pytest

from jaxrlhf.data import (
    ChatMessage,
    DataError,
    PreferenceRecord,
    PromptRecord,
    RankingRecord,
    RatingRecord,
    SFTRecord,
    read_jsonl,
    write_jsonl,
)


def test_reads_every_kind_with_line_numbers_and_skips_blank_lines(jsonl):
    path = jsonl(
        [{"prompt": "ab", "completion": "cd", "id": 7}, "", "   ", {"prompt": "e", "completion": ""}]
    )
    assert read_jsonl(path, "sft") == [SFTRecord("ab", "cd", 1), SFTRecord("e", "", 4)]
    path = jsonl([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert read_jsonl(path, "preference") == [PreferenceRecord("p", "c", "r", 1)]
    path = jsonl([{"prompt": "p", "responses": ["x", "y", "z"]}])
    assert read_jsonl(path, "ranking") == [RankingRecord("p", ("x", "y", "z"), 1)]
    path = jsonl(
        [{"prompt": "p", "response": "x", "rating": 3}, {"prompt": "q", "response": "y", "rating": -0.5}]
    )
    assert read_jsonl(path, "rating") == [RatingRecord("p", "x", 3.0, 1), RatingRecord("q", "y", -0.5, 2)]
    assert read_jsonl(jsonl([{"prompt": "p"}]), "prompt") == [PromptRecord("p", 1)]


def test_conversational_records(jsonl):
    user = {"role": "user", "content": "hi"}
    system = {"role": "system", "content": "be brief"}
    answer = [{"role": "assistant", "content": "yo"}]
    path = jsonl(
        [
            {"prompt": [system, user], "completion": answer},
            {"messages": [user, {"role": "assistant", "content": "ok"}]},
            {"messages": [user], "completion": "plain"},
        ]
    )
    msgs = (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))
    assert read_jsonl(path, "sft") == [
        SFTRecord(msgs, "yo", 1),
        SFTRecord((ChatMessage("user", "hi"),), "ok", 2),
        SFTRecord((ChatMessage("user", "hi"),), "plain", 3),
    ]
    path = jsonl([{"prompt": [user], "chosen": answer, "rejected": [{"role": "assistant", "content": "no"}]}])
    assert read_jsonl(path, "preference") == [PreferenceRecord((ChatMessage("user", "hi"),), "yo", "no", 1)]
    path = jsonl([{"messages": [user], "responses": [answer, "b"]}])
    assert read_jsonl(path, "ranking") == [RankingRecord((ChatMessage("user", "hi"),), ("yo", "b"), 1)]


def test_implicit_prompt_preferences_as_trl_documents_them(jsonl):
    user = {"role": "user", "content": "What color is the sky?"}
    system = {"role": "system", "content": "Be brief."}

    def assistant(text):
        return {"role": "assistant", "content": text}

    path = jsonl(
        [
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": [user, assistant("It is blue.")], "rejected": [user, assistant("It is green.")]},
            # A multi-turn conversation: everything before the differing assistant turn is the prompt.
            {
                "chosen": [system, user, assistant("Blue."), user, assistant("Yes.")],
                "rejected": [system, user, assistant("Blue."), user, assistant("No.")],
                "source": "ignored",
            },
            # Texts: the prompt ends before the differing word, mid-word differences included.
            {"chosen": "Answer: yes", "rejected": "Answer: yo"},
            {"chosen": "abc", "rejected": "abd"},  # no whitespace: cut at the first difference
            {"chosen": "Q: a", "rejected": "Q: a b"},  # one text extends the other
            # Leading whitespace stays in the prompt; an identifier key is not a misspelt 'prompt'.
            {"chosen": "\n\nA: yes", "rejected": "\n\nA: no", "prompt_id": "7", "prompt_len": 3,
             "messages_count": 1, "prompt_ids": [1], "promptLen": 3, "messageCount": 1, "promptId": "7"},
            {"chosen": "blue sky", "rejected": "bluer sky"},  # mid-word when no earlier whitespace
        ]
    )
    msgs = (ChatMessage("user", "What color is the sky?"),)
    long = (ChatMessage("system", "Be brief."), *msgs, ChatMessage("assistant", "Blue."), *msgs)
    assert read_jsonl(path, "preference") == [
        PreferenceRecord("The sky is", " blue.", " green.", 1),
        PreferenceRecord(msgs, "It is blue.", "It is green.", 2),
        PreferenceRecord(long, "Yes.", "No.", 3),
        PreferenceRecord("Answer:", " yes", " yo", 4),
        PreferenceRecord("ab", "c", "d", 5),
        PreferenceRecord("Q:", " a", " a b", 6),
        PreferenceRecord("\n\nA:", " yes", " no", 7),
        PreferenceRecord("blue", " sky", "r sky", 8),
    ]


def test_a_prompt_column_an_implicit_pair_leaves_unread_is_warned_about_once(jsonl):
    """{"question": ..., "chosen": ..., "rejected": ...} has no 'prompt', so it is an implicit-prompt pair
    and 'question' is not read: the reader says so once per key, with the count and the first line."""
    import logging

    from jaxrlhf.data import jsonl as jsonl_module

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    jsonl_module.log.addHandler(handler)
    try:
        path = jsonl([
            {"question": "2+2?", "chosen": "The answer is 4", "rejected": "The answer is 5"},
            {"prompt": "2+3?", "chosen": "5", "rejected": "6", "question": "2+3?"},  # read: has a prompt
            {"instruction": "Add.", "chosen": "It is 7", "rejected": "It is 8", "source": "x"},
            {"question": "1+1?", "chosen": "The answer is 2", "rejected": "The answer is 3"},
        ])
        records = read_jsonl(path, "preference")
    finally:
        jsonl_module.log.removeHandler(handler)
    assert records[0] == PreferenceRecord("The answer is", " 4", " 5", 1)
    assert sorted(said) == sorted([
        f"{path}: 2 record(s) (the first at line 1) give 'question' beside 'chosen' and 'rejected' but no "
        "'prompt': they are read as implicit-prompt pairs (the prompt is the beginning chosen and rejected "
        "share) and 'question' is not used; if it holds the prompt, name it 'prompt' (chosen and rejected "
        "then hold only the responses)",
        f"{path}: 1 record(s) (the first at line 3) give 'instruction' beside 'chosen' and 'rejected' but "
        "no 'prompt': they are read as implicit-prompt pairs (the prompt is the beginning chosen and "
        "rejected share) and 'instruction' is not used; if it holds the prompt, name it 'prompt' (chosen "
        "and rejected then hold only the responses)",
    ])


def test_conversational_prompt_only_records(jsonl):
    path = jsonl([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": "plain"}])
    records = [PromptRecord((ChatMessage("user", "hi"),), 1), PromptRecord("plain", 2)]
    assert read_jsonl(path, "prompt") == records


USER, OTHER = {"role": "user", "content": "q"}, {"role": "user", "content": "other"}
A, B = {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}

BAD_LINES = [
    ("sft", '{"prompt": "a", "completion": "b"', r"malformed JSON"),
    ("sft", '["prompt", "completion"]', r"expected a JSON object, got list"),
    ("sft", {"prompt": "a"}, r"missing field 'completion'"),
    ("sft", {"completion": "a"}, r"missing field 'prompt'"),
    ("sft", {"prompt": 3, "completion": "a"}, r"'prompt' must be a string or a list of messages, got int"),
    ("sft", {"prompt": "a", "completion": None}, r"'completion' must be a string"),
    ("sft", {"messages": [{"role": "user", "content": "a"}]}, r"must end with an assistant turn"),
    ("sft", {"prompt": "a", "messages": [], "completion": "b"}, r"either 'prompt' or 'messages'"),
    ("sft", {"prompt": [{"role": "user"}], "completion": "b"}, r"prompt\[0\]\.content must be a string"),
    ("sft", {"prompt": [], "completion": "b"}, r"non-empty list of messages"),
    (
        "sft",
        {"prompt": "a", "completion": [{"role": "user", "content": "b"}]},
        r"one assistant turn, got roles \['user'\]",
    ),
    (
        "rating",
        {"prompt": "a", "response": "b", "rating": "high"},
        r"'rating' must be a finite number, got str",
    ),
    (
        "rating",
        {"prompt": "a", "response": "b", "rating": True},
        r"'rating' must be a finite number, got bool",
    ),
    ("rating", {"prompt": "a", "response": "b"}, r"missing field 'rating'"),
    ("ranking", {"prompt": "a", "responses": ["only"]}, r"at least 2 responses"),
    ("ranking", {"prompt": "a", "responses": "xy"}, r"at least 2 responses"),
    ("ranking", {"prompt": "a", "responses": ["x", 5]}, r"'responses\[1\]' must be a string"),
    ("preference", {"prompt": "a", "chosen": "b"}, r"missing field 'rejected'"),
    ("preference", {"chosen": "same", "rejected": "same"}, r"'chosen' and 'rejected' are identical"),
    ("preference", {"chosen": [USER, A], "rejected": [USER, A]}, r"are identical"),
    ("preference", {"chosen": "yes", "rejected": "no"}, r"share no prompt: .*'' .*give 'prompt' explicitly"),
    # A shared beginning of only whitespace is no prompt (a leading space is how responses often start).
    ("preference", {"chosen": " blue sky", "rejected": " red"}, r"common beginning ' ' has no text"),
    ("preference", {"chosen": "\n\n a", "rejected": "\n\n b"}, r"common beginning '\\n\\n ' has no"),
    # A misspelt 'prompt' would make the pair implicit-prompt and drop the prompt.
    (
        "preference",
        {"promt": "The moon is", "chosen": " green", "rejected": " red"},
        r"unknown key 'promt' beside 'chosen' and 'rejected'; did you mean 'prompt'\?",
    ),
    ("preference", {"Messages": [USER], "chosen": "a", "rejected": "b"}, r"'Messages' .*mean 'messages'"),
    ("preference", {"chosen": [USER, A], "rejected": [OTHER, A]}, r"no common prefix .*first turns differ"),
    ("preference", {"chosen": [USER, A], "rejected": "q a"}, r"both be texts or both be conversations"),
    (
        "preference",
        {"chosen": [USER, A, USER], "rejected": [USER, B, USER]},
        r"'chosen' must have exactly one assistant turn \(the response\), got roles \['assistant', 'user'\]",
    ),
    (
        "preference",
        {"chosen": [USER, A], "rejected": [USER, OTHER]},
        r"'rejected' must have exactly one assistant turn.*got roles \['user'\]",
    ),
    ("preference", {"chosen": [USER, A], "rejected": [USER]}, r"'rejected' must have.*got roles \[\]"),
    ("preference", {"chosen": "the sky", "rejected": 3}, r"'rejected' must be a string or a list of"),
    ("preference", {"chosen": "the sky"}, r"missing field 'rejected'"),
    # a role typo is rendered as is by templates that do not check roles (ChatML): refused here
    ("sft", {"messages": [{"role": "usr", "content": "q"}, A]},
     r"messages\[0\]\.role 'usr' is not a chat role \(one of system, developer, user, assistant, tool"),
    ("prompt", {"prompt": [{"role": "bot", "content": "q"}]}, r"prompt\[0\]\.role 'bot' is not a chat role"),
]


@pytest.mark.parametrize(("kind", "bad", "message"), BAD_LINES)
def test_errors_name_file_and_line(jsonl, kind, bad, message):
    good = {"prompt": "a", "completion": "b", "chosen": "c", "rejected": "d", "responses": ["x", "y"]}
    good |= {"response": "r", "rating": 1.0}
    path = jsonl([good, "", bad, good])  # the bad record is on line 3
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + message):
        read_jsonl(path, kind)


@pytest.mark.parametrize(
    ("line", "column"),
    [
        ('{"prompt": "a"', r"Expecting ',' delimiter \(column 15, the end of the line\)"),
        ('{"prompt": "a",}', r"Expecting property name enclosed in double quotes \(column 16\)"),
        ('{"prompt": "é" x}', r"Expecting ',' delimiter \(column 16\)"),  # characters, not bytes
        ('  {"prompt": nope}', r"Expecting value \(column 14\)"),
        ('{"prompt": "a"} x', r"Extra data \(column 17\)"),
        ('{"prompt": "a', r"Unterminated string starting at \(column 12\)"),
    ],
)
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_malformed_json_names_the_column(tmp_path, line, column, newline):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(('{"prompt": "ok"}' + newline + line + newline).encode())
    with pytest.raises(DataError, match=re.escape(f"{path}:2: malformed JSON: ") + column):
        read_jsonl(path, "prompt")


def test_empty_and_missing_files(jsonl, tmp_path):
    for lines in ([], ["", "  "]):
        path = jsonl(lines)
        with pytest.raises(DataError, match=re.escape(f"{path}: no records")):
            read_jsonl(path, "prompt")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{missing}: no such file")):
        read_jsonl(missing, "prompt")
    with pytest.raises(ValueError, match="unknown dataset kind 'dpo'"):
        read_jsonl(jsonl([{"prompt": "a"}]), "dpo")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8")):
        read_jsonl(path, "prompt")


def test_write_round_trips_and_is_atomic(tmp_path):
    records = [
        SFTRecord((ChatMessage("user", "hé"),), "x", 1),
        SFTRecord("plain", "y\nz", 2),
    ]
    path = tmp_path / "out.jsonl"
    path.write_text("old contents\n")
    write_jsonl(path, records)
    assert read_jsonl(path, "sft") == records
    assert json.loads(path.read_text().splitlines()[0]) == {
        "prompt": [{"role": "user", "content": "hé"}],
        "completion": "x",
    }
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temp file left behind

    def failing():
        yield {"prompt": "a"}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(path, failing())
    assert read_jsonl(path, "sft") == records  # the previous file survives a failed write
    assert os.listdir(tmp_path) == ["out.jsonl"]

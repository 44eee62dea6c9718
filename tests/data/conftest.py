"""Fixtures for the data layer: a character tokenizer and a JSONL file writer."""

import json

import pytest

from jaxrlhf.data import make_char_tokenizer

# Ids: a=8, b=9, c=10, d=11, e=12, … z=33, " "=34, "."=35, "?"=36, "\n"=37; pad=0, bos=1, eos=2, unk=3,
# <|system|>=4, <|user|>=5, <|assistant|>=6, <|end|>=7.
ALPHABET = "abcdefghijklmnopqrstuvwxyz .?\n"


@pytest.fixture(scope="session")
def tokenizer():
    return make_char_tokenizer(ALPHABET)


@pytest.fixture
def jsonl(tmp_path):
    """write(lines, name) -> path: each line a dict/list (dumped as JSON) or a raw string (written as is)."""

    def write(lines, name="data.jsonl"):
        path = tmp_path / name
        text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
        path.write_text(text, encoding="utf-8")
        return path

    return write

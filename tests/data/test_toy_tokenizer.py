"""The character tokenizer: ids, chat template, left padding, and a save/load round trip."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from jaxrlhf.data import make_char_tokenizer


def test_ids_and_specials(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3 and len(tokenizer) == 8 + 30
    assert tokenizer("ab z\n", add_special_tokens=False)["input_ids"] == [8, 9, 34, 33, 37]
    assert tokenizer("a!", add_special_tokens=False)["input_ids"] == [8, 3]  # "!" is not in the alphabet
    assert tokenizer.decode([8, 9, 34, 10]) == "ab c"
    assert tokenizer.decode([1, 8, 2], skip_special_tokens=True) == "a"


def test_left_padding(tokenizer):
    batch = tokenizer(["a", "abc"], padding=True, add_special_tokens=False)
    assert batch["input_ids"] == [[0, 0, 8], [8, 9, 10]]
    assert batch["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


def test_round_trip_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "hi there?\nok."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.padding_side == "left" and loaded.chat_template == tokenizer.chat_template
    chat = [{"role": "user", "content": "hi"}]
    rendered = loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>hi<|end|><|assistant|>"
    assert loaded(rendered, add_special_tokens=False)["input_ids"] == [5, 15, 16, 7, 6]


def test_bad_alphabets():
    with pytest.raises(ValueError, match="repeats characters \\['a'\\]"):
        make_char_tokenizer("aba")
    with pytest.raises(ValueError, match="at least one character"):
        make_char_tokenizer("")

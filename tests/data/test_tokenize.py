"""Tokenisation: ids by hand with the character tokenizer, chat rendering, length limits and their errors."""

import re

import numpy as np
import pytest

from jaxrlhf.data import (
    ChatMessage,
    DataError,
    PreferenceExample,
    PromptExample,
    RankingExample,
    RatingExample,
    SequenceExample,
    TokenizeConfig,
    encode_completion,
    encode_prompt,
    load_examples,
    make_char_tokenizer,
    pad_token_id,
    render_prompt,
    tokenize_records,
)
from jaxrlhf.data.jsonl import PreferenceRecord, PromptRecord, RankingRecord, RatingRecord, SFTRecord

CONFIG = TokenizeConfig(max_prompt_length=8, max_length=12)  # completions: at most 4 tokens


def ids(array):
    assert array.dtype == np.int32
    return array.tolist()


def test_plain_prompt_and_completion(tokenizer):
    assert ids(encode_prompt(tokenizer, "ab c", CONFIG)[0]) == [8, 9, 34, 10]
    with_bos = TokenizeConfig(8, 12, add_bos=True)
    assert ids(encode_prompt(tokenizer, "ab", with_bos)[0]) == [1, 8, 9]
    assert ids(encode_prompt(tokenizer, "", with_bos)[0]) == [1]
    completion, cut = encode_completion(tokenizer, "cd", max_tokens=4)
    assert (ids(completion), cut) == ([10, 11, 2], False)
    completion, cut = encode_completion(tokenizer, "", max_tokens=4)
    assert (ids(completion), cut) == ([2], False)


def test_chat_prompt_is_rendered_with_the_template(tokenizer):
    prompt = (ChatMessage("system", "s"), ChatMessage("user", "ab"))
    assert render_prompt(tokenizer, prompt) == "<|system|>s<|end|><|user|>ab<|end|><|assistant|>"
    assert ids(encode_prompt(tokenizer, prompt, TokenizeConfig(16, 20))[0]) == [4, 26, 7, 5, 8, 9, 7, 6]
    bos = TokenizeConfig(16, 20, add_bos=True)
    assert ids(encode_prompt(tokenizer, prompt[1:], bos)[0]) == [1, 5, 8, 9, 7, 6]


def test_chat_template_starting_with_bos_gets_no_second_bos():
    tok = make_char_tokenizer("ab", chat_template="<s>{% for m in messages %}{{ m['content'] }}{% endfor %}")
    prompt = (ChatMessage("user", "ab"),)
    assert ids(encode_prompt(tok, prompt, TokenizeConfig(8, 12, add_bos=True))[0]) == [1, 8, 9]


def test_prompt_length_limit(tokenizer):
    long = "abcdefghij"  # 10 tokens > 8
    with pytest.raises(
        DataError, match=re.escape("f.jsonl:5: the prompt has 10 tokens, more than data.max_prompt_length=8")
    ):
        encode_prompt(tokenizer, long, CONFIG, source="f.jsonl:5")
    left = TokenizeConfig(8, 12, truncate_prompts="left")
    prompt, cut = encode_prompt(tokenizer, long, left)
    assert (ids(prompt), cut) == ([10, 11, 12, 13, 14, 15, 16, 17], True)  # "cdefghij"
    left_bos = TokenizeConfig(4, 12, add_bos=True, truncate_prompts="left")
    prompt, cut = encode_prompt(tokenizer, long, left_bos)
    assert (ids(prompt), cut) == ([1, 15, 16, 17], True)  # bos + "hij"
    prompt, cut = encode_prompt(tokenizer, "abcdefgh", CONFIG)  # exactly 8 fits
    assert (len(prompt), cut) == (8, False)


def test_completion_is_cut_without_eos(tokenizer):
    completion, cut = encode_completion(tokenizer, "abc", 4)  # 3 chars + eos = 4 fits
    assert (ids(completion), cut) == ([8, 9, 10, 2], False)
    completion, cut = encode_completion(tokenizer, "abcd", 4)  # 4 chars + eos = 5 > 4
    assert (ids(completion), cut) == ([8, 9, 10, 11], True)


def test_tokenize_records_of_every_kind(tokenizer):
    records = [
        SFTRecord("ab", "c", 1),
        PreferenceRecord("a", "bb", "abcdefg", 2),  # rejected is cut to 4 tokens
        RankingRecord("a", ("b", "c", "d"), 3),
        RatingRecord("b", "a", 0.5, 4),
        PromptRecord("ba", 5),
    ]
    examples, stats = tokenize_records(records, tokenizer, CONFIG, path="x.jsonl")
    sft, pref, rank, rate, prompt = examples
    assert isinstance(sft, SequenceExample) and (ids(sft.prompt), ids(sft.response)) == ([8, 9], [10, 2])
    assert isinstance(pref, PreferenceExample)
    assert (ids(pref.chosen), ids(pref.rejected)) == ([9, 9, 2], [8, 9, 10, 11])
    assert isinstance(rank, RankingExample) and [ids(r) for r in rank.responses] == [[9, 2], [10, 2], [11, 2]]
    assert isinstance(rate, RatingExample) and (ids(rate.response), rate.rating) == ([8, 2], 0.5)
    assert isinstance(prompt, PromptExample) and ids(prompt.prompt) == [9, 8]
    assert [e.source for e in examples] == [f"x.jsonl:{i}" for i in range(1, 6)]
    assert (stats.examples, stats.truncated_prompts, stats.truncated_completions) == (5, 0, 1)


def test_load_examples_errors_name_file_and_line(jsonl, tokenizer):
    path = jsonl([{"prompt": "ab"}, {"prompt": "abcdefghijk"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: the prompt has 11 tokens")):
        load_examples(path, "prompt", tokenizer, CONFIG)
    path = jsonl([{"prompt": "ab"}, {"prompt": ""}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: the prompt encodes to no tokens")):
        load_examples(path, "prompt", tokenizer, CONFIG)
    path = jsonl([{"prompt": "ab"}, {"messages": [{"role": "tool", "content": "x"}]}])
    with pytest.raises(
        DataError, match=re.escape(f"{path}:2: the chat template failed") + ".*unknown role tool"
    ):
        load_examples(path, "prompt", tokenizer, CONFIG)


def test_chat_prompt_without_template_names_file_and_line(jsonl):
    plain = make_char_tokenizer("ab", chat_template=None)
    path = jsonl([{"prompt": "ab"}, {"prompt": [{"role": "user", "content": "a"}]}])
    with pytest.raises(
        DataError, match=re.escape(f"{path}:2: the prompt is a chat conversation") + ".*no chat template"
    ):
        load_examples(path, "prompt", plain, CONFIG)
    examples, _ = load_examples(jsonl([{"prompt": "ab"}]), "prompt", plain, CONFIG)  # plain text still works
    assert ids(examples[0].prompt) == [8, 9]


def test_config_and_pad_id_checks(tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        TokenizeConfig(max_prompt_length=8, max_length=8)
    with pytest.raises(ValueError, match="truncate_prompts"):
        TokenizeConfig(truncate_prompts="right")
    assert pad_token_id(tokenizer) == 0
    no_pad = make_char_tokenizer("ab")
    no_pad.pad_token = None
    assert pad_token_id(no_pad) == 2  # falls back to eos, as for GPT-2


def test_trl_conversational_prompts_and_implicit_preferences_end_to_end(jsonl, tokenizer):
    """TRL's conversational prompt-only and implicit-prompt preference records, through the chat template."""
    user = {"role": "user", "content": "ab"}
    path = jsonl([{"prompt": [user]}])
    (example,), _ = load_examples(path, "prompt", tokenizer, TokenizeConfig(16, 20))
    assert ids(example.prompt) == [5, 8, 9, 7, 6]  # <|user|>ab<|end|><|assistant|>: the generation prompt

    path = jsonl(
        [
            {"chosen": [user, {"role": "assistant", "content": "c"}],
             "rejected": [user, {"role": "assistant", "content": "dd"}]},
            {"chosen": "ab c", "rejected": "ab d"},
        ]
    )
    chat, text = load_examples(path, "preference", tokenizer, TokenizeConfig(16, 20))[0]
    # a chat response ends as the template closes the assistant turn (<|end|>), not with </s>
    assert (ids(chat.prompt), ids(chat.chosen), ids(chat.rejected)) == ([5, 8, 9, 7, 6], [10, 7], [11, 11, 7])
    assert (ids(text.prompt), ids(text.chosen), ids(text.rejected)) == ([8, 9], [34, 10, 2], [34, 11, 2])


# ------------------------------------------------------------------ chat endings and bos, as HF renders them

CHATML_LIKE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LLAMA2_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[' + m['content'] + ']' }}"
               "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
NO_SPECIAL = "{% for m in messages %}{{ m['content'] }};{% endfor %}"


def hf_ids(tok, messages, **kwargs):
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize(("template", "turn"), [
    (None, [10, 7]),  # the toy template: c<|end|>
    (CHATML_LIKE, [10, 7]),  # c<|end|>\n: ends at the special token, the template's newline after it dropped
    (LLAMA2_LIKE, [11, 10, 11, 2]),  # " c </s>": the template's own eos, not a second one
    (NO_SPECIAL, [10, 15, 2]),  # "c;": no special token closes the turn, so eos does
])
def test_a_chat_completion_ends_as_the_template_closes_the_assistant_turn(template, turn):
    alphabet = "abc []\n;"
    tok = make_char_tokenizer(alphabet, **({} if template is None else {"chat_template": template}))
    conversation = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
    record = SFTRecord((ChatMessage("user", "ab"),), "c", 1)
    (example,), stats = tokenize_records([record], tok, TokenizeConfig(16, 24), "f.jsonl")
    assert ids(example.response) == turn and stats.untemplated_completions == 0
    # prompt + response is the template's rendering of the conversation, up to the turn's last special token
    whole = hf_ids(tok, conversation)
    assert ids(example.prompt) == hf_ids(tok, conversation[:1], add_generation_prompt=True)
    if turn[-1] in whole:
        assert ids(example.prompt) + turn == whole[: len(example.prompt) + len(turn)]


def test_a_template_that_does_not_extend_its_prompt_falls_back_to_eos_and_is_counted():
    # The generation prompt differs from how a full conversation renders the assistant turn.
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>a{% endif %}")
    tok = make_char_tokenizer("abc", chat_template=template)
    record = PreferenceRecord((ChatMessage("user", "ab"),), "c", "b", 3)
    (example,), stats = tokenize_records([record], tok, TokenizeConfig(16, 24), "f.jsonl")
    assert (ids(example.chosen), ids(example.rejected)) == ([10, 2], [9, 2])
    assert stats.untemplated_completions == 2


def add_bos_post_processor(tok):
    """The tokenizer puts <s> before the text it encodes with special tokens, as Llama's do."""
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    assert tok("ab")["input_ids"] == [1, 8, 9]
    return tok


def test_plain_prompts_start_with_bos_when_the_tokenizer_adds_one():
    plain, llama_like = make_char_tokenizer("abc"), add_bos_post_processor(make_char_tokenizer("abc"))
    default = TokenizeConfig(8, 12)
    assert default.add_bos is None
    assert ids(encode_prompt(plain, "ab", default)[0]) == [8, 9]  # GPT-2-like: no bos of its own
    assert ids(encode_prompt(llama_like, "ab", default)[0]) == [1, 8, 9] == llama_like("ab")["input_ids"]
    assert ids(encode_prompt(llama_like, "ab", TokenizeConfig(8, 12, add_bos=False))[0]) == [8, 9]
    # a conversation: the template decides (the toy template writes no bos)
    chat = (ChatMessage("user", "ab"),)
    assert ids(encode_prompt(llama_like, chat, default)[0]) == [5, 8, 9, 7, 6]
    examples, _ = tokenize_records([PromptRecord("ab", 1), PromptRecord(chat, 2)], llama_like, default)
    assert [ids(e.prompt) for e in examples] == [[1, 8, 9], [5, 8, 9, 7, 6]]


def test_left_truncation_keeps_the_bos_a_template_wrote():
    tok = make_char_tokenizer("abc", chat_template="<s>{% for m in messages %}{{ m['content'] }}{% endfor %}")
    left = TokenizeConfig(4, 8, truncate_prompts="left")  # add_bos left at its default
    kept, cut = encode_prompt(tok, (ChatMessage("user", "abcabc"),), left)
    assert (ids(kept), cut) == ([1, 8, 9, 10], True)  # <s> + the last three tokens


def test_chat_turn_end_ids():
    from jaxrlhf.data.tokenize import chat_turn_end_ids

    assert chat_turn_end_ids(make_char_tokenizer("ab")) == (7,)  # <|end|>
    assert chat_turn_end_ids(make_char_tokenizer("ab", chat_template=None)) == ()
    assert chat_turn_end_ids(make_char_tokenizer("ab;", chat_template=NO_SPECIAL)) == (2,)  # its eos
    raising = "{{ raise_exception('no') }}"
    assert chat_turn_end_ids(make_char_tokenizer("ab", chat_template=raising)) == ()


def test_chat_turn_end_ids_renders_once_per_tokenizer_until_its_template_changes(monkeypatch):
    from jaxrlhf.data import tokenize

    tok = make_char_tokenizer("ab;")
    calls = []
    real = tokenize.chat_turn_ids
    monkeypatch.setattr(tokenize, "chat_turn_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert [tokenize.chat_turn_end_ids(tok) for _ in range(3)] == [(7,)] * 3
    assert len(calls) == 1  # scorers ask once per batch: the template is rendered once
    tok.chat_template = NO_SPECIAL
    assert tokenize.chat_turn_end_ids(tok) == (tok.eos_token_id,) and len(calls) == 2
    tok.chat_template = None
    assert tokenize.chat_turn_end_ids(tok) == ()


def test_a_tokenizer_without_eos_is_a_data_error_naming_the_record():
    tok = make_char_tokenizer("ab")
    tok.eos_token = None
    with pytest.raises(DataError, match=r"^f\.jsonl:1: tokenizer .* defines no eos token"):
        tokenize_records([SFTRecord("a", "b", 1)], tok, CONFIG, "f.jsonl")

"""Task tokenizers: ids, padding side, and the save_pretrained / AutoTokenizer round trip."""

import pytest
import transformers

from jaxrlhf.oracle import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_task_tokenizer, get_task


def test_ids_padding_and_decoding():
    tok = build_task_tokenizer(["A", "B", "C"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    assert tok("A C B", add_special_tokens=False)["input_ids"] == [4, 6, 5]
    assert tok("A Z")["input_ids"] == [4, UNK_ID]  # no special tokens added, unknown symbol -> unk
    batch = tok(["A", "B C"], padding=True)
    assert batch["input_ids"] == [[0, 4], [5, 6]]
    assert batch["attention_mask"] == [[0, 1], [1, 1]]
    assert tok.decode([4, 5, 2]) == "A B <eos>"
    assert tok.decode([1, 4, 5, 2], skip_special_tokens=True) == "A B"
    assert len(tok) == 7


@pytest.mark.parametrize("name", ["random_walk", "digit_sort"])
def test_save_and_auto_tokenizer_round_trip(name, tmp_path):
    task = get_task(name)
    task.save_tokenizer(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.get_vocab() == task.tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert loaded.padding_side == "left"
    assert len(task.tokenizer) <= 40
    for demo in task.demonstrations(0, 20):
        for text in (demo["prompt"], demo["completion"]):
            ids = task.tokenizer(text)["input_ids"]
            assert loaded(text)["input_ids"] == ids
            assert UNK_ID not in ids
            assert loaded.decode(ids) == text
    prompts = task.sample_prompts(1, 4)
    assert loaded(prompts, padding=True)["input_ids"] == task.tokenizer(prompts, padding=True)["input_ids"]


@pytest.mark.parametrize(
    "symbols, message",
    [(["A", "A"], "distinct"), (["A B"], "no spaces"), ([""], "non-empty"), (["<eos>"], "clashes")],
)
def test_bad_symbols(symbols, message):
    with pytest.raises(ValueError, match=message):
        build_task_tokenizer(symbols)

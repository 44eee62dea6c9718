"""Tiny word-level tokenizers for the built-in tasks.

Every task text is a sequence of symbols separated by spaces ("A C G", "3 1 4"). The tokenizer is a
``tokenizers`` WordLevel model with a whitespace pre-tokenizer, wrapped in
``transformers.PreTrainedTokenizerFast`` so that it saves with ``save_pretrained`` and loads back with
``transformers.AutoTokenizer.from_pretrained`` like any Hugging Face tokenizer.

Ids 0..3 are always ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; the task's symbols follow in the order
given. Padding is on the left (prompts are left-padded for generation). The tokenizer adds no special
tokens by itself: the data layer decides where ``<bos>`` and ``<eos>`` go.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def build_task_tokenizer(
    symbols: Sequence[str], model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``symbols`` with ids ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3.

    ``symbols[i]`` gets id ``4 + i``. Symbols must be distinct, non-empty, free of whitespace and must not
    clash with the special tokens.
    """
    symbols = list(symbols)
    for i, symbol in enumerate(symbols):
        if not symbol or any(ch.isspace() for ch in symbol):
            raise ValueError(f"symbols[{i}] = {symbol!r}: a symbol must be non-empty and contain no spaces")
        if symbol in SPECIAL_TOKENS:
            raise ValueError(f"symbols[{i}] = {symbol!r} clashes with a special token {SPECIAL_TOKENS}")
    if len(set(symbols)) != len(symbols):
        raise ValueError(f"symbols must be distinct, got {symbols}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + i for i, symbol in enumerate(symbols)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        **extra,
    )

"""A character-level Hugging Face tokenizer for tiny models in tests and toy tasks.

Vocabulary: ``<pad>``=0, ``<s>``=1 (bos), ``</s>``=2 (eos), ``<unk>``=3, then the chat markers
``<|system|>``=4, ``<|user|>``=5, ``<|assistant|>``=6, ``<|end|>``=7, then one id per alphabet character
from 8 on, in alphabet order. Padding is on the left. The chat template renders a conversation as
``<|role|>content<|end|>`` per turn and, with ``add_generation_prompt``, ends with ``<|assistant|>``; the
markers are single tokens, so chat formatting needs no extra characters in the alphabet.

It is a real ``PreTrainedTokenizerFast``: it round-trips through ``save_pretrained`` and
``AutoTokenizer.from_pretrained`` like any checkpoint's tokenizer.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
FIRST_CHAR_ID = len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_char_tokenizer(
    alphabet: str, *, chat_template: str | None = CHAT_TEMPLATE, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``alphabet`` (ids from 8 on); other characters map to ``<unk>``.

    ``chat_template=None`` builds one without a chat template (to test that path).
    """
    if not alphabet:
        raise ValueError("alphabet must hold at least one character")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"alphabet repeats characters {repeated!r}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: FIRST_CHAR_ID + i for i, c in enumerate(alphabet)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character (newlines included) is its own pre-token, hence its own word.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=chat_template,
        model_max_length=model_max_length,
    )

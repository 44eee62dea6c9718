"""Host-side data layer: JSONL datasets, tokenisation, fixed-shape numpy batches, a resumable loader.

Typical use::

    examples, stats = load_examples("prefs.jsonl", "preference", tokenizer, TokenizeConfig(64, 192))
    collate = functools.partial(preference_batch, buckets=LengthBuckets.powers_of_two(64, 128),
                                pad_id=pad_token_id(tokenizer))
    for batch in BatchIterator(examples, batch_size=32, seed=0, collate=collate):
        ...

Batch layouts and keys are documented in :mod:`jaxrlhf.data.batching`.
"""

from jaxrlhf.data.batching import (
    Batch,
    LengthBuckets,
    bucket_length,
    pad_batch,
    power_of_two_buckets,
    preference_batch,
    prompt_batch,
    ranking_batch,
    rating_batch,
    sequence_batch,
)
from jaxrlhf.data.jsonl import (
    KINDS,
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
    record_to_json,
    split_implicit_prompt,
    write_jsonl,
)
from jaxrlhf.data.loader import BatchIterator, epoch_permutation
from jaxrlhf.data.tokenize import (
    Example,
    PreferenceExample,
    PromptExample,
    RankingExample,
    RatingExample,
    SequenceExample,
    TokenizeConfig,
    TokenizeStats,
    encode_completion,
    encode_prompt,
    load_examples,
    pad_token_id,
    render_prompt,
    tokenize_records,
)
from jaxrlhf.data.toy_tokenizer import make_char_tokenizer

__all__ = [
    "KINDS",
    "Batch",
    "BatchIterator",
    "ChatMessage",
    "DataError",
    "Example",
    "Kind",
    "LengthBuckets",
    "PreferenceExample",
    "PreferenceRecord",
    "Prompt",
    "PromptExample",
    "PromptRecord",
    "RankingExample",
    "RankingRecord",
    "RatingExample",
    "RatingRecord",
    "Record",
    "SFTRecord",
    "SequenceExample",
    "TokenizeConfig",
    "TokenizeStats",
    "bucket_length",
    "encode_completion",
    "encode_prompt",
    "epoch_permutation",
    "load_examples",
    "make_char_tokenizer",
    "pad_batch",
    "pad_token_id",
    "power_of_two_buckets",
    "preference_batch",
    "prompt_batch",
    "ranking_batch",
    "rating_batch",
    "read_jsonl",
    "record_to_json",
    "render_prompt",
    "sequence_batch",
    "split_implicit_prompt",
    "tokenize_records",
    "write_jsonl",
]

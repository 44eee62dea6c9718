"""Helpers shared by the oracle tests: turn texts into the oracle's array form."""

import numpy as np
import pytest


def encode_batch(tokenizer, prompts, responses, finished, prompt_len, response_len, bos_rows=()):
    """Left-padded prompts and right-padded responses (eos appended where finished), as int32/bool arrays."""
    batch = len(prompts)
    prompt_tokens = np.zeros((batch, prompt_len), np.int32)
    prompt_mask = np.zeros((batch, prompt_len), bool)
    response_tokens = np.zeros((batch, response_len), np.int32)
    response_mask = np.zeros((batch, response_len), bool)
    for b, (p, r, f) in enumerate(zip(prompts, responses, finished)):
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if b in bos_rows:
            ids = [tokenizer.bos_token_id, *ids]
        prompt_tokens[b, prompt_len - len(ids) :] = ids
        prompt_mask[b, prompt_len - len(ids) :] = True
        ids = tokenizer(r, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if f else [])
        response_tokens[b, : len(ids)] = ids
        response_mask[b, : len(ids)] = True
    return prompt_tokens, prompt_mask, response_tokens, response_mask


def random_responses(rng, batch, response_len, token_ids, eos_id):
    """Random response arrays: random lengths, tokens from ``token_ids``, eos at the end of about half."""
    tokens = rng.choice(np.asarray(token_ids), size=(batch, response_len)).astype(np.int32)
    lengths = rng.integers(0, response_len + 1, size=batch)
    finished = (rng.random(batch) < 0.5) & (lengths > 0)
    mask = np.arange(response_len)[None, :] < lengths[:, None]
    rows = np.flatnonzero(finished)
    tokens[rows, lengths[rows] - 1] = eos_id
    tokens[~mask] = 0
    return tokens, mask


@pytest.fixture
def encode():
    return encode_batch


@pytest.fixture
def random_response_arrays():
    return random_responses

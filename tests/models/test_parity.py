"""Parity with the Hugging Face PyTorch implementations on tiny random GPT-2, Llama (GQA) and Qwen2 models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models import hf_io
from jaxrlhf.models.transformer import positions_from_mask
from jaxrlhf.rollout.generate import GenerationConfig, generate

torch = pytest.importorskip("torch")


def torch_logits(model, tokens, mask):
    """HF logits with the position ids HF's own generate() would use for a left-padded batch."""
    ids = torch.tensor(tokens, dtype=torch.long)
    am = torch.tensor(mask, dtype=torch.long)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am, position_ids=pos).logits.numpy()


@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 3, 5)], ids=["unpadded", "left-padded"])
def test_logits_match_transformers(hf_checkpoint, padded_batch, pads):
    name, path, hf_model = hf_checkpoint
    model, params, _ = hf_io.load(path)
    tokens, mask = padded_batch(pads=pads)
    ours, _, _ = jax.jit(model.apply)(params, tokens, positions_from_mask(jnp.asarray(mask)), mask)
    ref = torch_logits(hf_model, tokens, mask)
    real = mask > 0  # padded query rows are garbage in both implementations
    err = np.abs(np.asarray(ours) - ref)[real].max()
    assert err <= 1e-4, f"{name}: max |Δlogits| = {err}"


def test_padding_does_not_change_real_rows(hf_checkpoint, padded_batch):
    """A left-padded row computes the same logits as the same tokens unpadded."""
    _, path, _ = hf_checkpoint
    model, params, _ = hf_io.load(path)
    tokens, mask = padded_batch(pads=(0, 4, 0))
    full, _, _ = model.apply(params, tokens, positions_from_mask(jnp.asarray(mask)), mask)
    alone = tokens[1:2, 4:]
    one, _, _ = model.apply(params, alone, positions_from_mask(jnp.ones_like(alone)), np.ones_like(alone))
    np.testing.assert_allclose(np.asarray(full)[1, 4:], np.asarray(one)[0], atol=1e-5)


def test_greedy_generation_matches_transformers(hf_checkpoint, padded_batch):
    name, path, hf_model = hf_checkpoint
    model, params, _ = hf_io.load(path)
    tokens, mask = padded_batch(seed=1, pads=(0, 2, 4))
    n = 12
    config = GenerationConfig(max_new_tokens=n, greedy=True, stop_token_ids=(2,), pad_token_id=0)
    out = generate(model, params, tokens, mask, jax.random.key(0), config)
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )[:, tokens.shape[1] :].numpy()
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])), constant_values=0)
    np.testing.assert_array_equal(np.asarray(out.response_tokens), ref, err_msg=name)
    # The response mask covers tokens up to and including the first eos.
    for row, toks in zip(np.asarray(out.response_mask), ref):
        eos = np.flatnonzero(toks == 2)
        length = eos[0] + 1 if eos.size else n
        np.testing.assert_array_equal(row, np.arange(n) < length)

"""Values read off the decode steps (``generate(..., value_head=…)``): they equal the value head on a fresh
forward pass over the finished sequences, 0 after a stop; the final state's value is bootstrapped for
truncated rows only; sampling is unchanged by them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.config import gpt2_config, llama_config
from jaxrlhf.models.heads import init_value_head
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.rollout.scoring import response_hidden, response_values

V = 40
MODELS = {
    "gpt2": LanguageModel(
        gpt2_config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)),
    "llama-gqa": LanguageModel(
        llama_config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=48)),
}
P, N = 7, 6


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    model = MODELS[request.param]
    params = jax.tree.map(lambda p: 2.0 * p, model.init(jax.random.key(0)))
    head = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(3), x.shape), init_value_head(32))
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, V, size=(4, P)).astype(np.int32)
    mask = np.ones_like(tokens)
    for i, pad in enumerate([0, 2, 5, 1]):
        mask[i, :pad], tokens[i, :pad] = 0, 0
    return model, params, head, jnp.asarray(tokens), jnp.asarray(mask)


def _fresh_values(model, params, head, rollout):
    hidden = response_hidden(model, params, rollout.sequences, rollout.sequence_mask, P)
    values, bootstrap = response_values(head, hidden)
    return np.where(np.asarray(rollout.response_mask) > 0, values, 0.0), np.asarray(bootstrap)


def test_values_equal_a_fresh_forward_and_sampling_is_unchanged(setup):
    model, params, head, tokens, mask = setup
    config = GenerationConfig(max_new_tokens=N)
    plain = generate(model, params, tokens, mask, jax.random.key(1), config)
    # A stop token the first row samples at its third step: that row stops, the others run to N tokens.
    stop = int(plain.response_tokens[0, 2])
    config = GenerationConfig(max_new_tokens=N, stop_token_ids=(stop,))
    plain = generate(model, params, tokens, mask, jax.random.key(1), config)
    rollout = generate(model, params, tokens, mask, jax.random.key(1), config, value_head=head)
    for field in ("sequences", "sequence_mask", "logprobs", "stopped"):
        np.testing.assert_array_equal(getattr(rollout, field), getattr(plain, field))
    stopped = np.asarray(rollout.stopped)
    assert stopped[0] and not stopped.all()
    values, bootstrap = _fresh_values(model, params, head, rollout)
    assert np.abs(values).max() > 1.0  # not vacuous
    # The cached decode sums in another order than a full forward: float32 rounding only.
    np.testing.assert_allclose(rollout.values, values, rtol=1e-5, atol=1e-5)
    assert (np.asarray(rollout.values)[np.asarray(rollout.response_mask) == 0] == 0).all()
    # The final state is bootstrapped where a response ran out of tokens; a stopped one ends in a terminal.
    np.testing.assert_allclose(np.asarray(rollout.bootstrap_values)[~stopped], bootstrap[~stopped],
                               rtol=1e-5, atol=1e-5)
    assert (np.asarray(rollout.bootstrap_values)[stopped] == 0).all()


def test_no_final_step_when_every_row_stopped(setup):
    model, params, head, tokens, mask = setup
    # Every token id a stop token: each row stops at its first token.
    config = GenerationConfig(max_new_tokens=N, stop_token_ids=tuple(range(V)))
    rollout = generate(model, params, tokens, mask, jax.random.key(1), config, value_head=head)
    assert np.asarray(rollout.stopped).all()
    np.testing.assert_array_equal(rollout.bootstrap_values, np.zeros(4, np.float32))
    values, _ = _fresh_values(model, params, head, rollout)
    np.testing.assert_allclose(rollout.values, values, rtol=1e-5, atol=1e-5)
    assert (np.asarray(rollout.values)[:, 1:] == 0).all()


def test_without_a_value_head_the_rollout_has_no_values(setup):
    model, params, _, tokens, mask = setup
    rollout = generate(model, params, tokens, mask, jax.random.key(1), GenerationConfig(max_new_tokens=N))
    assert rollout.values is None and rollout.bootstrap_values is None

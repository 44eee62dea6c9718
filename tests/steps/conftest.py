"""Shared tiny model for the steps tests: one config, parameters initialised once per session."""

import jax
import pytest

from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.transformer import LanguageModel

VOCAB = 16
HIDDEN = 32


@pytest.fixture(scope="session")
def tiny_model() -> LanguageModel:
    # One layer: compilation dominates on a CPU and scales with depth; one block exercises every path.
    return LanguageModel(gpt2_config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=1, num_heads=2,
                                     max_position_embeddings=64))


@pytest.fixture(scope="session")
def tiny_params(tiny_model):
    return jax.jit(tiny_model.init)(jax.random.key(0))


@pytest.fixture(scope="session")
def other_params(tiny_model):
    """A second, independent initialisation (a reference policy that differs from the policy)."""
    return jax.jit(tiny_model.init)(jax.random.key(1))


@pytest.fixture(scope="session")
def make_rollout():
    """``make_rollout(seed) -> Rollout`` with B=4, P=4, N=6: left-padded prompts; row 0 stops after 3
    tokens (EOS = 2), row 2 at the last column, rows 1 and 3 are cut at the length limit."""
    import jax.numpy as jnp
    import numpy as np

    from jaxrlhf.rollout.generate import Rollout

    def build(seed: int = 0, b: int = 4, p: int = 4, n: int = 6) -> Rollout:
        rng = np.random.RandomState(seed)
        prompt = rng.randint(3, VOCAB, (b, p)).astype(np.int32)
        prompt_mask = np.ones((b, p), np.int32)
        prompt_mask[1, :2] = prompt[1, :2] = 0
        prompt_mask[3, :1] = prompt[3, :1] = 0
        response = rng.randint(3, VOCAB, (b, n)).astype(np.int32)
        response_mask = np.ones((b, n), np.int32)
        response[0, 2], response[0, 3:], response_mask[0, 3:] = 2, 0, 0
        response[2, -1] = 2
        return Rollout(
            sequences=jnp.asarray(np.concatenate([prompt, response], 1)),
            sequence_mask=jnp.asarray(np.concatenate([prompt_mask, response_mask], 1)),
            response_tokens=jnp.asarray(response), response_mask=jnp.asarray(response_mask),
            logprobs=jnp.zeros((b, n)), stopped=jnp.asarray(np.arange(b) % 2 == 0))

    return build

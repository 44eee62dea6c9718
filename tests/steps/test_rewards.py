"""Reward sources: built-in programmatic rewards, the registry and import paths, host functions, and the
reward-model scorer with normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.heads import init_reward_head
from jaxrlhf.rl.reward_norm import RewardNormalization
from jaxrlhf.rollout.generate import Rollout
from jaxrlhf.steps.reward_model import make_reward_scorer
from jaxrlhf.steps.rewards import (
    RewardModelScorer,
    get_reward_fn,
    register_reward_fn,
    registered_reward_fns,
    rollout_reward_inputs,
)

WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


def make_rollout():
    prompt = np.array([[0, 9, 8], [7, 7, 7], [0, 0, 6]], np.int32)
    prompt_mask = (np.arange(3)[None] >= np.array([[1], [0], [2]])).astype(np.int32)
    response = np.array([[5, 5, 2, 0], [5, 1, 5, 3], [4, 0, 0, 0]], np.int32)
    response_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.int32)
    return Rollout(
        sequences=jnp.asarray(np.concatenate([prompt, response], 1)),
        sequence_mask=jnp.asarray(np.concatenate([prompt_mask, response_mask], 1)),
        response_tokens=jnp.asarray(response), response_mask=jnp.asarray(response_mask),
        logprobs=jnp.zeros((3, 4)), stopped=jnp.array([True, False, True]))


@WITH_AND_WITHOUT_JIT
def test_builtin_rewards(transform):
    rollout = make_rollout()
    count = get_reward_fn("token_count:5")
    assert count.jittable
    np.testing.assert_allclose(transform(count.score_rollout)(rollout), [2 / 3, 2 / 4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(transform(get_reward_fn("length").score_rollout)(rollout), [3 / 4, 1, 1 / 4])
    prompt, prompt_mask, response, _ = rollout_reward_inputs(rollout)
    np.testing.assert_array_equal(prompt[1], [7, 7, 7])
    np.testing.assert_array_equal(prompt_mask[2], [0, 0, 1])
    np.testing.assert_array_equal(response[0], [5, 5, 2, 0])


def prompt_length_reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
    """A host (numpy) reward: the prompt's length."""
    assert isinstance(prompt_mask, np.ndarray)
    return prompt_mask.sum(1).astype(np.float64)


def test_registry_host_functions_and_import_paths():
    register_reward_fn("test_prompt_length", prompt_length_reward, jittable=False, overwrite=True)
    fn = get_reward_fn("test_prompt_length")
    assert not fn.jittable and "test_prompt_length" in registered_reward_fns()
    scores = fn.score_rollout(make_rollout())
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [2, 3, 1])
    with pytest.raises(ValueError, match="already registered"):
        register_reward_fn("test_prompt_length", prompt_length_reward, jittable=False)

    by_path = get_reward_fn("jaxrlhf.steps.rewards:length_reward")
    assert not by_path.jittable  # no `jittable` attribute: treated as a host function
    np.testing.assert_allclose(by_path.score_rollout(make_rollout()), [3 / 4, 1, 1 / 4])
    assert get_reward_fn("jaxrlhf.steps.rewards.length_reward").fn is by_path.fn

    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="integer token id"):
        get_reward_fn("token_count:x")
    with pytest.raises(ValueError, match="has no attribute"):
        get_reward_fn("jaxrlhf.steps.rewards:missing")
    register_reward_fn("test_bad_shape", lambda *a: np.zeros(2), jittable=False, overwrite=True)
    with pytest.raises(ValueError, match=r"returned shape \(2,\), expected \(3,\)"):
        get_reward_fn("test_bad_shape").score_rollout(make_rollout())


def test_reward_model_scorer_normalises(tiny_model, tiny_params):
    params = {"lm": tiny_params, "reward_head": init_reward_head(jax.random.key(3), 32)}
    rollout = make_rollout()
    raw = jax.jit(make_reward_scorer(tiny_model))(params, rollout.sequences, rollout.sequence_mask)
    scorer = RewardModelScorer(tiny_model, RewardNormalization(jnp.float32(2.0), jnp.float32(-1.0)))
    np.testing.assert_allclose(jax.jit(scorer)(params, rollout), 2.0 * raw - 1.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(RewardModelScorer(tiny_model))(params, rollout), raw, rtol=1e-6)

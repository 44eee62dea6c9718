"""Policy scoring: the per-prompt summary, and the jitted policy evaluator's plumbing on a tiny random model
with a jitted and a host oracle."""

import math

import jax
import numpy as np
import pytest

from jaxrlhf.experiments.policy_scoring import summarize
from jaxrlhf.oracle import FunctionOracle, get_task
from jaxrlhf.steps.params import RewardModelParams


def test_summarize_grid():
    scores = {"gold": np.array([1.0, 0.0, 0.0, 0.0]), "proxy": np.array([2.0, 2.0, 0.0, 0.0]),
              "kl": np.array([0.5, 0.5, 0.5, 0.5]), "optimal": np.array([1.0, 0.0, 0.0, 0.0]),
              "finished": np.ones(4), "length": np.array([3.0, 4.0, 5.0, 6.0])}
    e = summarize("SFT", scores, samples_per_prompt=2)  # prompts: gold means 0.5, 0
    assert (e.gold, e.proxy, e.kl, e.optimal, e.length, e.samples) == (0.25, 1.0, 0.5, 0.25, 4.5, 4)
    assert e.gold_ci == pytest.approx(12.706204736174705 * math.sqrt(0.125) / math.sqrt(2))  # t_{1, 0.975}
    assert e.kl_ci == 0.0 and e.sqrt_kl == pytest.approx(math.sqrt(0.5))
    assert e.metrics()["eval/gold"] == 0.25 and e.point(7).x == 7


@pytest.fixture(scope="module")
def tiny_evaluator_parts():
    """A random tiny policy and reward model over the random_walk vocabulary."""
    from jaxrlhf.models.config import gpt2_config
    from jaxrlhf.models.heads import init_reward_head
    from jaxrlhf.models.transformer import LanguageModel
    from jaxrlhf.rollout.generate import GenerationConfig

    task = get_task("random_walk", seed=0)
    model = LanguageModel(gpt2_config(vocab_size=len(task.tokenizer), hidden_size=16, num_layers=1,
                                      num_heads=2, intermediate_size=32, max_position_embeddings=16))
    params = model.init(jax.random.key(0))
    rm_params = RewardModelParams(model.init(jax.random.key(1)), init_reward_head(jax.random.key(2), 16))
    gen = GenerationConfig(max_new_tokens=task.max_response_tokens, stop_token_ids=(2,), pad_token_id=0)
    return task, model, params, rm_params, gen


def test_policy_evaluator_jitted_and_host_oracles_agree(tiny_evaluator_parts):
    from jaxrlhf.experiments.demo_stages import prompt_arrays
    from jaxrlhf.experiments.policy_scoring import PolicyEvaluator

    task, model, params, rm_params, gen = tiny_evaluator_parts
    tokens, mask = prompt_arrays(task.sample_prompts(0, 6), task.tokenizer, 1, add_bos=False)
    key = jax.random.key(3)
    jitted = PolicyEvaluator(model, params, model, rm_params, None, task.oracle, task, gen, chunk_size=4)
    scores, rollouts = jitted.scores(params, tokens, mask, key, keep_rollouts=True)
    assert all(v.shape == (6,) for v in scores.values())
    assert sum(r.sequences.shape[0] for r in rollouts) == 6  # the wrapped-around rows are trimmed
    # The policy is its own reference: KL exactly 0. Gold is the oracle's score of the very samples.
    np.testing.assert_array_equal(scores["kl"], 0.0)
    responses = np.concatenate([r.response_tokens for r in rollouts])
    response_mask = np.concatenate([r.response_mask for r in rollouts])
    expected = task.oracle.score_tokens(tokens, mask, responses, response_mask)
    np.testing.assert_array_equal(scores["gold"], np.asarray(expected))
    np.testing.assert_array_equal(scores["optimal"], np.asarray(expected) == task.optimal_score)

    # A user's Python oracle runs on the host, once per chunk, and sees the same texts.
    def host_gold(prompt: str, response: str) -> float:
        return float(task.oracle.score_texts([prompt], [response])[0])

    host = PolicyEvaluator(model, params, model, rm_params, None, FunctionOracle(host_gold, task.tokenizer),
                           task, gen, chunk_size=4)
    host_scores, _ = host.scores(params, tokens, mask, key)
    finished = scores["finished"] > 0  # the text form cannot tell an unfinished walk from a finished one
    np.testing.assert_allclose(host_scores["gold"][finished], scores["gold"][finished])
    np.testing.assert_array_equal(host_scores["proxy"], scores["proxy"])


def test_a_sampler_replaces_the_policy_and_its_rollouts_kl_is_the_kl_score(tiny_evaluator_parts):
    """Value-guided decoding has no parameters of its own: the evaluator samples through ``sampler`` and
    reads the KL from the rollouts (the exact per-step KL); the other scores are of those very samples."""
    from jaxrlhf.experiments.demo_stages import prompt_arrays
    from jaxrlhf.experiments.policy_scoring import PolicyEvaluator
    from jaxrlhf.rollout.generate import generate

    task, model, params, rm_params, gen = tiny_evaluator_parts
    tokens, mask = prompt_arrays(task.sample_prompts(0, 6), task.tokenizer, 1, add_bos=False)
    key = jax.random.key(3)
    evaluator = PolicyEvaluator(model, params, model, rm_params, None, task.oracle, task, gen, chunk_size=4)
    calls = []

    def sampler(t, m, k):  # the policy itself, with a made-up per-row KL to tell it from the default
        rollout = generate(model, params, t, m, k, gen)
        calls.append(t.shape[0])
        return rollout._replace(kl=jax.numpy.arange(t.shape[0], dtype=jax.numpy.float32) / 10)

    plain, _ = evaluator.scores(params, tokens, mask, key)
    guided, _ = evaluator.scores(params, tokens, mask, key, sampler=sampler)
    assert calls == [4, 4]  # two chunks of 4 rows (the last wraps around)
    np.testing.assert_allclose(guided["kl"], np.array([0, 1, 2, 3, 0, 1]) / 10, rtol=1e-6)
    for k in ("gold", "proxy", "finished", "length"):  # the same samples as sampling the policy
        np.testing.assert_array_equal(guided[k], plain[k])

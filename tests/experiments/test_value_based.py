"""The demo's value-based method: ILQL trained on a policy's scored samples; guided decoding raises the reward
with β while its KL to the policy grows from 0 (a toy reward: the share of one token in the response)."""

from __future__ import annotations

import jax
import numpy as np

from jaxrlhf.experiments.value_based import ValueBasedBudget, train_value_based
from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.generate import GenerationConfig
from jaxrlhf.steps.ilql import ILQLConfig

GOOD = 5


def test_guided_decoding_raises_the_reward_with_beta_and_reports_its_kl():
    model = LanguageModel(gpt2_config(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2,
                                      max_position_embeddings=16))
    params = jax.jit(model.init)(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 16, (32, 3)).astype(np.int32)
    mask = np.ones_like(prompts)
    calls = []

    def reward(rollout):
        calls.append(rollout.sequences.shape[0])
        tokens, m = np.asarray(rollout.response_tokens), np.asarray(rollout.response_mask)
        return ((tokens == GOOD) * m).sum(1) / np.maximum(m.sum(1), 1)

    generation = GenerationConfig(max_new_tokens=4)
    budget = ValueBasedBudget(samples_per_prompt=8, steps=150, batch_size=64, learning_rate=3e-3,
                              prompts_per_call=16, ilql=ILQLConfig(gamma=1.0, freeze_backbone=True))
    result = train_value_based(model, params, reward, prompts, mask, jax.random.key(1), generation, budget)
    assert result.samples == sum(calls) == 32 * 8
    assert np.isfinite(result.history[-1]["loss/ilql"])
    eval_prompts = rng.integers(3, 16, (64, 3)).astype(np.int32)
    means, kls = [], []
    for beta in (0.0, 4.0, 16.0):
        rollout = result.sampler(beta)(eval_prompts, np.ones_like(eval_prompts), jax.random.key(2))
        means.append(float(np.mean(reward(rollout))))
        kls.append(float(np.mean(rollout.kl)))
    assert abs(kls[0]) < 1e-6 and 0 < kls[1] < kls[2], kls
    # Measured: 0.03, 0.07, 0.21 (β = 0, 4, 16; the base samples the good token 1 time in 16 or so).
    assert means[0] < 0.1 and means[0] < means[1] < means[2] and means[2] > 3 * means[0], means

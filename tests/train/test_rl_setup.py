"""rl_setup: a separate critic initialised from a reward model starts on the normalised reward scale."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.heads import head_apply, init_reward_head
from jaxrlhf.rl import RewardNormalization
from jaxrlhf.train.rl_setup import normalized_head


def test_normalized_head_predicts_the_normalised_reward():
    head = init_reward_head(jax.random.key(0), 8)
    hidden = jax.random.normal(jax.random.key(1), (5, 8))
    norm = RewardNormalization(jnp.float32(0.25), jnp.float32(-1.5))
    expected = 0.25 * head_apply(head, hidden) - 1.5
    got = head_apply(normalized_head(head, norm), hidden)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert jax.jit(lambda h: head_apply(normalized_head(h, norm), hidden))(head).shape == (5,)


def test_load_critic_folds_the_reward_models_normalisation(tmp_path):
    from jaxrlhf.models.config import gpt2_config
    from jaxrlhf.models.transformer import LanguageModel
    from jaxrlhf.oracle import get_task
    from jaxrlhf.train.model_setup import LoadedModel, export_model
    from jaxrlhf.train.rl_setup import load_critic

    task = get_task("digit_sort")
    model = LanguageModel(gpt2_config(vocab_size=len(task.tokenizer), hidden_size=16, num_layers=1,
                                      num_heads=2, intermediate_size=32, max_position_embeddings=32))
    lm = model.init(jax.random.key(0))
    head = init_reward_head(jax.random.key(1), 16)
    norm = RewardNormalization(jnp.float32(2.0), jnp.float32(0.5))
    path = export_model(tmp_path / "rm", model, lm, task.tokenizer, heads={"reward_head": head},
                        normalization=norm)
    policy = LoadedModel(model, lm, task.tokenizer, {})
    _, critic = load_critic(str(path), policy, "float32", jax.random.key(2))
    hidden = jax.random.normal(jax.random.key(3), (4, 16))
    np.testing.assert_allclose(head_apply(critic.value_head, hidden), 2.0 * head_apply(head, hidden) + 0.5,
                               rtol=1e-5, atol=1e-5)

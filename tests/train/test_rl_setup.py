"""rl_setup: a separate critic initialised from a reward model starts on the normalised reward scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_rollouts_stop_at_every_eos_id_of_the_model_by_default():
    """Llama 3 Instruct's config lists three eos ids and its tokenizer names one: a rollout must stop at each
    (a chat turn ends with the third). ``generation.stop_token_ids`` replaces the default."""
    import types

    from jaxrlhf.models.config import llama_config
    from jaxrlhf.train.rl_setup import sampling_settings
    from jaxrlhf.train.run_config import GenerationSection

    tokenizer = types.SimpleNamespace(eos_token_id=9, pad_token_id=0)
    config = llama_config(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                          eos_token_id=5, extra_eos_token_ids=[9, 7])
    assert config.extra_eos_token_ids == (9, 7)  # a list (from YAML or JSON) is kept as a tuple: hashable
    hash(config)
    got = sampling_settings(GenerationSection(), 1.0, tokenizer, config)
    assert got.stop_token_ids == (9, 5, 7) and got.pad_token_id == 0
    assert sampling_settings(GenerationSection(), 1.0, tokenizer).stop_token_ids == (9,)
    given = GenerationSection(stop_token_ids=(3,))
    assert sampling_settings(given, 1.0, tokenizer, config).stop_token_ids == (3,)
    from jaxrlhf.config import ConfigError

    with pytest.raises(ConfigError, match=r"generation\.stop_token_ids: 99 is not a token of the model "
                                          r"\(vocab_size 16\)"):
        sampling_settings(GenerationSection(stop_token_ids=(3, 99)), 1.0, tokenizer, config)
    # Derived ids the model cannot emit (a tokenizer's eos beyond a smaller vocabulary) are left out.
    big_eos = types.SimpleNamespace(eos_token_id=20, pad_token_id=0)
    assert sampling_settings(GenerationSection(), 1.0, big_eos, config).stop_token_ids == (5, 9, 7)
    # and where the chat template closes an assistant turn (chat completions are trained to end there)
    from jaxrlhf.data import make_char_tokenizer

    chat = make_char_tokenizer("ab")  # eos </s> = 2; turns end with <|end|> = 7
    assert sampling_settings(GenerationSection(), 1.0, chat).stop_token_ids == (2, 7)
    assert sampling_settings(GenerationSection(), 1.0, make_char_tokenizer("ab", chat_template=None)
                             ).stop_token_ids == (2,)


def test_a_model_with_fewer_embedding_rows_than_the_policy_is_refused_naming_both():
    """Same tokenizer, but the reward model / reference has vocab_size 386 where the policy has 399 padded
    rows: the padding ids the policy can sample embedded as NaN (scores and KL NaN, exit 0)."""
    import pytest

    from jaxrlhf.config import ConfigError
    from jaxrlhf.data.toy_tokenizer import make_char_tokenizer
    from jaxrlhf.train.rl_setup import same_vocabulary

    tok = make_char_tokenizer("ab")
    same_vocabulary(tok, tok, "reference.path", 399, 399)
    same_vocabulary(tok, tok, "reference.path", 386, 399)  # a larger table reads every id
    with pytest.raises(ConfigError, match=r"^reward.model_path: its vocab_size 386 is smaller than the "
                                          r"policy's 399 \(ids 386–398"):
        same_vocabulary(tok, tok, "reward.model_path", 399, 386)

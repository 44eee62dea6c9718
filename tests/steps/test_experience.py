"""Experience: shapes and masks, log-probs through the scoring path, token rewards (score at the last
token, missing-EOS penalty, −β·KL), reward-to-go returns, GAE with a critic, whitening, KL = 0 when the
policy is the reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.heads import init_reward_head, init_value_head
from jaxrlhf.rl.kl_control import KLControllerState
from jaxrlhf.rollout.scoring import response_hidden, response_logprobs, response_values
from jaxrlhf.steps.experience import make_experience_fn, sequence_kl
from jaxrlhf.steps.params import CriticParams, PolicyParams
from jaxrlhf.steps.rl_config import PPOConfig

B, P, N = 4, 4, 6


def beta(value: float) -> KLControllerState:
    """The KL controller state holding β = ``value``."""
    return KLControllerState(jnp.float32(value))
SCORES = np.array([1.0, -0.5, 2.0, 0.25], np.float32)


def numpy_gae(rewards, values, mask, bootstrap, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        last = int(mask[b].sum()) - 1
        next_adv = 0.0
        for t in range(last, -1, -1):
            next_value = bootstrap[b] if t == last else values[b, t + 1]
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            adv[b, t] = next_adv
    return adv, (adv + values) * mask


def logprobs_of(model, lm, rollout, temperature):
    return np.asarray(response_logprobs(model, lm, rollout.sequences, rollout.sequence_mask, P, temperature))


@pytest.fixture(scope="module")
def experience_fn(tiny_model):
    cfg = PPOConfig(gamma=1.0, lam=1.0, whiten_advantages=False, kl_coef=0.1, missing_eos_penalty=0.5,
                    temperature=0.7)
    return make_experience_fn(tiny_model, tiny_model, None, cfg)


def test_token_rewards_and_reward_to_go(experience_fn, make_rollout, tiny_model, tiny_params,
                                        other_params):
    rollout = make_rollout()
    policy = PolicyParams(tiny_params, init_value_head(32))
    ref = PolicyParams(other_params)
    batch, metrics = jax.jit(experience_fn)(policy, ref, None, rollout, SCORES, beta(0.1))
    mask = np.asarray(rollout.response_mask, np.float32)

    for name in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns", "response_mask"):
        value = getattr(batch, name)
        assert value.shape == (B, N) and value.dtype == jnp.float32, name
        assert np.all(np.asarray(value)[mask == 0] == 0), name
    assert batch.prompt_length == P and batch.scores.shape == (B,)

    # The same log-probs as the scoring path at the same temperature (so the first PPO ratio is 1).
    old = logprobs_of(tiny_model, tiny_params, rollout, 0.7)
    ref = logprobs_of(tiny_model, other_params, rollout, 0.7)
    np.testing.assert_allclose(batch.old_logprobs, old, atol=1e-6)
    np.testing.assert_allclose(batch.ref_logprobs, ref, atol=1e-6)

    kl = (old - ref) * mask  # k1
    penalised = SCORES - 0.5 * np.array([0, 1, 0, 1])  # missing EOS on rows 1 and 3
    rewards = -0.1 * kl
    last = mask.sum(1).astype(int) - 1
    rewards[np.arange(B), last] += penalised
    reward_to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(batch.returns, reward_to_go, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch.advantages, reward_to_go, rtol=1e-5, atol=1e-5)  # zero values
    np.testing.assert_array_equal(batch.old_values, 0.0)

    assert float(metrics["objective/kl"]) == pytest.approx(kl.sum(1).mean(), abs=1e-5)
    assert float(metrics["objective/non_score_reward"]) == pytest.approx(-0.1 * kl.sum(1).mean(), abs=1e-5)
    assert float(metrics["objective/scores"]) == pytest.approx(penalised.mean(), abs=1e-6)
    assert float(metrics["objective/rlhf_reward"]) == pytest.approx(rewards.sum(1).mean(), abs=1e-5)
    assert float(metrics["objective/entropy"]) == pytest.approx(-(old * mask).sum(1).mean(), abs=1e-5)
    assert float(metrics["val/num_eos_tokens"]) == 2.0
    assert float(metrics["objective/kl_coef"]) == pytest.approx(0.1)


def test_kl_is_zero_when_policy_is_reference(experience_fn, make_rollout, tiny_params):
    policy = PolicyParams(tiny_params, init_value_head(32))
    batch, metrics = jax.jit(experience_fn)(policy, PolicyParams(tiny_params), None, make_rollout(1), SCORES,
                                            beta(0.1))
    np.testing.assert_array_equal(batch.old_logprobs, batch.ref_logprobs)
    assert float(metrics["objective/kl"]) == 0.0 and float(metrics["objective/non_score_reward"]) == 0.0


def test_separate_critic_gae_bootstrap_whitening_and_kl_in_loss(tiny_model, make_rollout, tiny_params,
                                                                other_params):
    cfg = PPOConfig(gamma=0.9, lam=0.8, kl_in_reward=False, kl_estimator="k3", missing_eos_penalty=1.0,
                    critic="separate", bootstrap_truncated=True)
    fn = jax.jit(make_experience_fn(tiny_model, tiny_model, tiny_model, cfg))
    # A critic with a random (non-zero) head on another backbone.
    critic = CriticParams(other_params, init_reward_head(jax.random.key(5), 32))
    rollout = make_rollout(2)
    policy, ref = PolicyParams(tiny_params), PolicyParams(other_params)
    batch, metrics = fn(policy, ref, critic, rollout, SCORES, beta(0.3))

    mask = np.asarray(rollout.response_mask, np.float32)
    hidden = response_hidden(tiny_model, other_params, rollout.sequences, rollout.sequence_mask, P)
    values, final = map(np.asarray, response_values(critic.value_head, hidden))
    np.testing.assert_allclose(batch.old_values, values * mask, atol=1e-5)

    # KL in the loss: the reward is the (penalised) score alone; truncated rows bootstrap from V(final).
    rewards = np.zeros((B, N), np.float32)
    last = mask.sum(1).astype(int) - 1
    rewards[np.arange(B), last] = SCORES - np.array([0, 1, 0, 1])
    bootstrap = np.where([False, True, False, True], final, 0.0)
    adv, returns = numpy_gae(rewards, values * mask, mask, bootstrap, 0.9, 0.8)
    np.testing.assert_allclose(batch.returns, returns, rtol=1e-5, atol=1e-5)
    real = adv[mask > 0]
    whitened = (adv - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(batch.advantages, whitened, rtol=1e-4, atol=1e-5)
    assert float(metrics["objective/non_score_reward"]) == 0.0
    log_r = (logprobs_of(tiny_model, other_params, rollout, 1.0) - logprobs_of(tiny_model, tiny_params,
                                                                           rollout, 1.0)).astype(np.float64)
    k3 = (np.expm1(log_r) - log_r) * mask
    assert float(metrics["objective/kl"]) == pytest.approx(k3.sum(1).mean(), rel=1e-4) and k3.sum() > 0
    resid = returns[mask > 0] - (values * mask)[mask > 0]
    expected_ev = 1 - resid.var() / returns[mask > 0].var()
    assert float(metrics["val/var_explained"]) == pytest.approx(expected_ev, rel=1e-3, abs=1e-5)


def test_critic_config_must_match(tiny_model):
    with pytest.raises(ValueError, match="critic"):
        make_experience_fn(tiny_model, tiny_model, None, PPOConfig(critic="separate"))


@pytest.mark.parametrize("jit", [False, True])
def test_sequence_kl_hand_values(jit):
    logp = np.array([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]], np.float32)
    ref = np.array([[-1.5, -1.0, -9.0], [-0.1, -0.7, -0.3]], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.int32)
    fn = jax.jit(sequence_kl) if jit else sequence_kl
    args = tuple(map(jnp.asarray, (logp, ref, mask))) if jit else (logp, ref, mask)
    np.testing.assert_allclose(np.asarray(fn(*args)), [0.5 - 1.0, 0.5], rtol=1e-6)


def test_sequence_kl_estimates_the_known_kl():
    # Two-token responses sampled from p, independent per token: KL(p^2 ‖ q^2) = 2·KL(p ‖ q).
    p, q = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
    exact = 2 * float(np.sum(p * np.log(p / q)))
    tokens = np.random.default_rng(0).choice(3, size=(100_000, 2), p=p)
    kl = sequence_kl(np.log(p)[tokens], np.log(q)[tokens], np.ones_like(tokens))
    stderr = kl.std() / math.sqrt(kl.size)
    assert abs(kl.mean() - exact) < 4 * stderr
    assert exact == pytest.approx(2 * 0.6 * math.log(3) + 2 * 0.3 * math.log(0.6) + 2 * 0.1 * math.log(1 / 3))


# --- where the old log-probs come from (cfg.logprobs_from), batch invariance, TIS weights ----------------

def _sampled(model, params, b=4, p=4, n=6, seed=0):
    """A rollout generated by the model itself (its log-probs are the sampler's)."""
    from jaxrlhf.rollout.generate import GenerationConfig, generate

    vocab = model.config.vocab_size
    prompts = jnp.asarray(np.random.RandomState(seed).randint(3, vocab, (b, p)), jnp.int32)
    return generate(model, params, prompts, jnp.ones((b, p), jnp.int32), jax.random.key(seed),
                    GenerationConfig(max_new_tokens=n))


def test_logprobs_from_rollout_takes_the_sampled_logprobs_and_the_recompute_agrees(tiny_model, tiny_params,
                                                                                  other_params):
    rollout = _sampled(tiny_model, tiny_params)
    policy = PolicyParams(tiny_params, init_value_head(tiny_model.config.hidden_size))
    out = {}
    for source in ("recompute", "rollout"):
        fn = jax.jit(make_experience_fn(tiny_model, tiny_model, None, PPOConfig(logprobs_from=source)))
        out[source], _ = fn(policy, PolicyParams(other_params), None, rollout, jnp.asarray(SCORES), beta(0.1))
    mask = np.asarray(rollout.response_mask)
    np.testing.assert_array_equal(out["rollout"].old_logprobs, np.asarray(rollout.logprobs) * mask)
    # float32: the sampler's and a fresh forward's log-probs are equal up to the rounding of two programs.
    np.testing.assert_allclose(out["recompute"].old_logprobs, out["rollout"].old_logprobs, atol=1e-5)
    # The shared critic's values (a forward without the LM head) and the reference are the same either way.
    np.testing.assert_allclose(out["rollout"].old_values, out["recompute"].old_values, atol=1e-6)
    np.testing.assert_array_equal(out["rollout"].ref_logprobs, out["recompute"].ref_logprobs)
    assert out["rollout"].tis_weights is None


def test_logprobs_from_rollout_reads_the_values_off_the_decode_steps(tiny_model, tiny_params, other_params):
    """With the rollout's own values (generate's value_head) the experience runs no policy forward: its
    output does not depend on the policy's weights at all, and matches the forward-pass values'."""
    from jaxrlhf.rollout.generate import GenerationConfig, generate

    head = jax.tree.map(lambda x: x + 0.3, init_value_head(tiny_model.config.hidden_size))
    vocab = tiny_model.config.vocab_size
    prompts = jnp.asarray(np.random.RandomState(0).randint(3, vocab, (4, 4)), jnp.int32)
    rollout = generate(tiny_model, tiny_params, prompts, jnp.ones((4, 4), jnp.int32), jax.random.key(0),
                       GenerationConfig(max_new_tokens=6), value_head=head)
    fn = jax.jit(make_experience_fn(tiny_model, tiny_model, None, PPOConfig(logprobs_from="rollout")))
    policy = PolicyParams(tiny_params, head)
    with_values, _ = fn(policy, PolicyParams(other_params), None, rollout, jnp.asarray(SCORES), beta(0.1))
    nan_lm = PolicyParams(jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tiny_params), head)
    blind, _ = fn(nan_lm, PolicyParams(other_params), None, rollout, jnp.asarray(SCORES), beta(0.1))
    jax.tree.map(np.testing.assert_array_equal, blind, with_values)  # the policy's weights are not read
    no_values = rollout._replace(values=None, bootstrap_values=None)
    forward, _ = fn(policy, PolicyParams(other_params), None, no_values, jnp.asarray(SCORES), beta(0.1))
    np.testing.assert_allclose(with_values.old_values, forward.old_values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(with_values.advantages, forward.advantages, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("minibatches,accum", [(2, 2), (4, 1)])
def test_first_minibatch_ratio_is_one_in_bfloat16(minibatches, accum):
    """The old log-probs come from the update's micro-batch shapes: in bfloat16 on the CPU the first
    minibatch's mean |r − 1| is ≤ 1e-6 (it is 0: the same program on the same shapes)."""
    import optax

    from jaxrlhf import steps as S
    from jaxrlhf.models.config import gpt2_config
    from jaxrlhf.models.transformer import LanguageModel
    from jaxrlhf.steps.ppo import make_ppo_update

    model = LanguageModel(gpt2_config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                      max_position_embeddings=64, dtype="bfloat16"))
    params = jax.jit(model.init)(jax.random.key(0))
    rollout = _sampled(model, params, b=8, p=6, n=8)
    cfg = PPOConfig(num_minibatches=minibatches, grad_accum_steps=accum, epochs=1)
    policy = PolicyParams(params, init_value_head(32))
    optimizer = optax.sgd(1e-3)
    state = S.create_rl_state(policy, optimizer, S.kl_controller(cfg).init())
    batch, _ = jax.jit(make_experience_fn(model, model, None, cfg))(
        policy, PolicyParams(params), None, rollout, jnp.zeros(8), state.kl)
    _, metrics = jax.jit(make_ppo_update(model, None, cfg, optimizer))(state, batch, jax.random.key(2))
    assert float(metrics["val/ratio_abs_dev_first_minibatch"]) <= 1e-6
    # The sampler's own bfloat16 log-probs (a decode program) are not bit-equal: what TIS is for.
    sampler_gap = np.abs(np.asarray(rollout.logprobs) - np.asarray(batch.old_logprobs)).max()
    assert sampler_gap > 1e-6


@pytest.mark.parametrize("jit", [False, True])
def test_truncated_importance_weights_hand_values(jit):
    from jaxrlhf.steps.experience import truncated_importance_weights

    old = np.log(np.array([[0.5, 0.2, 0.9], [0.1, 0.3, 0.3]], np.float32))
    sampler = np.log(np.array([[0.25, 0.4, 0.1], [0.1, 0.6, 0.3]], np.float32))
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    fn = jax.jit(truncated_importance_weights, static_argnums=3) if jit else truncated_importance_weights
    w = fn(old, sampler, mask, 2.0)
    # ratios 2, 0.5, 9 → cap 2; 1, 0.5; masked → 0
    np.testing.assert_allclose(w, [[2.0, 0.5, 2.0], [1.0, 0.5, 0.0]], rtol=1e-6)


def test_tis_cap_puts_weights_in_the_batch(tiny_model, tiny_params, other_params):
    rollout = _sampled(tiny_model, tiny_params)
    # A sampler that differs by design: its log-probs are shifted by ±0.3 per token.
    shift = np.where(np.arange(6) % 2 == 0, 0.3, -0.3).astype(np.float32)
    rollout = rollout._replace(logprobs=rollout.logprobs + shift * rollout.response_mask)
    fn = jax.jit(make_experience_fn(tiny_model, tiny_model, None, PPOConfig(tis_cap=1.2)))
    policy = PolicyParams(tiny_params, init_value_head(tiny_model.config.hidden_size))
    batch, metrics = fn(policy, PolicyParams(other_params), None, rollout, jnp.asarray(SCORES), beta(0.1))
    mask = np.asarray(rollout.response_mask) > 0
    expected = np.where(mask, np.minimum(np.exp(-shift), 1.2), 0.0)  # π_old/π_sampler = e^{∓0.3}
    np.testing.assert_allclose(batch.tis_weights, expected, rtol=1e-4)
    capped = np.broadcast_to(shift < 0, mask.shape)[mask]  # e^{0.3} > 1.2
    np.testing.assert_allclose(metrics["tis/capped_frac"], np.mean(capped), rtol=1e-6)

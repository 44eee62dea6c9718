"""Critic-free experience: every advantage estimator against a NumPy reference on one small batch (rows in
prompt-major groups), log-probs through the scoring path, score shaping (missing EOS, soft over-long), the
KL in the reward or not, DAPO's filter zeroing exactly the flat groups, ReMax's greedy rows, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.kl_control import KLControllerState
from jaxrlhf.rollout.scoring import response_logprobs
from jaxrlhf.steps.group_experience import group_advantages, make_group_experience_fn, sample_rows
from jaxrlhf.steps.params import PolicyParams
from jaxrlhf.steps.rl_config import GRPOConfig, RLOOConfig

P, N, T = 4, 6, 0.7
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")


def numpy_advantages(estimator, scores, kl, mask, beta, n, greedy=None):
    """The estimators written out in NumPy: token advantages [B, N]."""
    mask = mask.astype(np.float64)
    if estimator.startswith("reinforce_pp"):
        s = scores.astype(np.float64)
        if estimator == "reinforce_pp_baseline":
            groups = s.reshape(-1, n)
            s = (groups - groups.mean(1, keepdims=True)).reshape(-1)
        rewards = -beta * kl * mask
        for b in range(len(s)):
            real = np.flatnonzero(mask[b])
            if len(real):
                rewards[b, real[-1]] += s[b]
        returns = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1] * mask
        values = returns[mask > 0]
        mean, var = values.mean(), values.var(ddof=1)
        return np.where(mask > 0, (returns - mean) / np.sqrt(var + 1e-8), 0.0)
    r = (scores - beta * (kl * mask).sum(1)).reshape(-1, n).astype(np.float64)
    if estimator == "grpo":
        a = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    elif estimator == "dr_grpo":
        a = r - r.mean(1, keepdims=True)
    elif estimator == "rloo":
        a = r - (r.sum(1, keepdims=True) - r) / (n - 1)
    else:
        a = r - np.asarray(greedy)[:, None]
    return a.reshape(-1)[:, None] * mask


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("use_jit", [False, True])
def test_group_advantages_match_numpy(estimator, use_jit):
    rng = np.random.RandomState(3)
    b, n = 8, 4
    scores = rng.randn(b).astype(np.float32)
    kl = rng.randn(b, N).astype(np.float32) * 0.1
    mask = np.ones((b, N), np.float32)
    mask[1, 3:] = 0
    mask[6, 1:] = 0
    greedy = rng.randn(b // n).astype(np.float32)
    cfg = GRPOConfig(group_size=n, advantage=estimator)
    fn = lambda s, k, m, beta, g: group_advantages(cfg, s, k, m, beta, g)
    fn = jax.jit(fn) if use_jit else fn
    got = fn(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), jnp.float32(0.3), jnp.asarray(greedy))
    want = numpy_advantages(estimator, scores, kl, mask, 0.3, n, greedy)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def kl_state(beta: float) -> KLControllerState:
    return KLControllerState(jnp.float32(beta))


def logprobs_of(model, lm, rollout):
    return np.asarray(response_logprobs(model, lm, rollout.sequences, rollout.sequence_mask, P, T))


def test_experience_shapes_scores_and_puts_grpo_advantages_on_the_right_rows(
    tiny_model, tiny_params, other_params, make_rollout
):
    """Two groups of four; KL (k1) in the reward; rows 1, 3, 5, 7 without eos lose 0.5."""
    cfg = GRPOConfig(group_size=4, kl_in_reward=True, kl_coef=0.1, missing_eos_penalty=0.5, temperature=T)
    rollout = make_rollout(0, b=8)
    scores = np.array([1.0, 0.0, 2.0, 0.5, -1.0, 3.0, 0.0, 1.5], np.float32)
    fn = jax.jit(make_group_experience_fn(tiny_model, tiny_model, cfg))
    batch, metrics = fn(PolicyParams(tiny_params), PolicyParams(other_params), None, rollout, scores,
                        kl_state(0.1))
    mask = np.asarray(rollout.response_mask, np.float32)
    old, ref = logprobs_of(tiny_model, tiny_params, rollout), logprobs_of(tiny_model, other_params, rollout)
    np.testing.assert_allclose(batch.old_logprobs, old * mask, atol=1e-6)
    np.testing.assert_allclose(batch.ref_logprobs, ref * mask, atol=1e-6)
    eos = np.asarray(rollout.stopped)
    shaped = scores - 0.5 * ~eos
    np.testing.assert_allclose(batch.scores, shaped, rtol=1e-6)
    kl = (old - ref) * mask
    want = numpy_advantages("grpo", shaped, kl, mask, 0.1, 4)
    np.testing.assert_allclose(batch.advantages, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(batch.response_mask, mask)
    groups = shaped.reshape(2, 4)
    expected = {
        "reward": shaped.mean(),
        "objective/scores": shaped.mean(),
        "reward_std": groups.std(1, ddof=1).mean(),
        "frac_reward_zero_std": 0.0,
        "groups/dropped": 0.0,
        "completions/mean_length": mask.sum(1).mean(),
        "completions/min_length": 3.0,
        "completions/max_length": N,
        "completions/clipped_ratio": 0.5,
        # TRL's: over the responses that ended with eos
        "completions/mean_terminated_length": mask.sum(1)[eos].mean(),
        "completions/min_terminated_length": mask.sum(1)[eos].min(),
        "completions/max_terminated_length": mask.sum(1)[eos].max(),
        "objective/kl": kl.sum(1).mean(),
        "objective/non_score_reward": -0.1 * kl.sum(1).mean(),
        "objective/kl_coef": 0.1,
        "val/num_eos_tokens": 4.0,
    }
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert expected["completions/min_terminated_length"] < expected["completions/max_terminated_length"]
    _, none_ended = fn(PolicyParams(tiny_params), PolicyParams(other_params), None,
                       rollout._replace(stopped=jnp.zeros_like(rollout.stopped)), scores, kl_state(0.1))
    for name in ("mean", "min", "max"):
        assert float(none_ended[f"completions/{name}_terminated_length"]) == 0.0  # TRL's value for none


def test_dynamic_sampling_zeroes_exactly_the_flat_groups(tiny_model, tiny_params, make_rollout):
    """Groups 0 and 2 (of four, two samples each) are flat: their rows get no weight and advantage 0."""
    cfg = GRPOConfig(group_size=2, dynamic_sampling=True, missing_eos_penalty=0.0, temperature=T)
    rollout = make_rollout(1, b=8)
    scores = np.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0, -2.0], np.float32)
    fn = jax.jit(make_group_experience_fn(tiny_model, tiny_model, cfg))
    policy = PolicyParams(tiny_params)
    batch, metrics = fn(policy, policy, None, rollout, scores, kl_state(0.05))
    mask = np.asarray(rollout.response_mask, np.float32)
    kept = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    np.testing.assert_array_equal(batch.response_mask, mask * kept[:, None])
    assert np.all(np.asarray(batch.advantages)[~kept] == 0)
    want = numpy_advantages("grpo", scores, np.zeros_like(mask), mask, 0.0, 2) * kept[:, None]
    np.testing.assert_allclose(batch.advantages, want, rtol=1e-5, atol=1e-6)
    assert float(metrics["groups/dropped"]) == 2.0 and float(metrics["frac_reward_zero_std"]) == 0.5
    # Without the filter the flat groups are still counted, but keep their weight.
    off = jax.jit(make_group_experience_fn(tiny_model, tiny_model, GRPOConfig(
        group_size=2, missing_eos_penalty=0.0, temperature=T)))
    batch_off, metrics_off = off(policy, policy, None, rollout, scores, kl_state(0.05))
    np.testing.assert_array_equal(batch_off.response_mask, mask)
    assert float(metrics_off["groups/dropped"]) == 0.0 and float(metrics_off["frac_reward_zero_std"]) == 0.5


def test_the_adaptive_kl_controller_sees_the_kl_of_every_sample_with_dynamic_sampling(
        tiny_model, tiny_params, other_params, make_rollout):
    """DAPO's filter zeroes the training mask of flat groups, but their samples' KL is real: β moves on
    the mean KL over all sampled rows, the logged objective/kl (it once read the dropped rows as KL 0, and
    β fell while the KL was above target)."""
    from jaxrlhf.steps.actor_critic import kl_controller, update_kl_controller

    cfg = GRPOConfig(group_size=2, dynamic_sampling=True, adaptive_kl=True, kl_coef=0.1, kl_target=0.14,
                     kl_horizon=8, missing_eos_penalty=0.0, temperature=T)
    rollout = make_rollout(1, b=8)
    scores = np.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0, -2.0], np.float32)  # groups 0 and 2 are flat
    fn = jax.jit(make_group_experience_fn(tiny_model, tiny_model, cfg))
    batch, metrics = fn(PolicyParams(tiny_params), PolicyParams(other_params), None, rollout, scores,
                        kl_state(0.1))
    assert float(metrics["groups/dropped"]) == 2.0
    old, ref = logprobs_of(tiny_model, tiny_params, rollout), logprobs_of(tiny_model, other_params, rollout)
    mask = np.asarray(rollout.response_mask, np.float64)
    k2 = 0.5 * np.square(old - ref)  # GRPO's default estimator: the KL is in the loss
    observed = float(np.mean(np.sum(np.where(mask > 0, k2, 0.0), axis=1)))  # over every sample
    assert float(metrics["objective/kl"]) == pytest.approx(observed, rel=1e-4, abs=1e-6)
    error = np.clip(observed / 0.14 - 1.0, -0.2, 0.2)
    assert abs(error) < 0.2  # not clipped, so β tells which KL the controller saw
    want = 0.1 * (1.0 + error * 8 / 8)
    got = update_kl_controller(kl_controller(cfg), kl_state(0.1), cfg, batch)
    assert float(got.kl_coef) == pytest.approx(want, rel=1e-5)


def test_remax_reads_the_greedy_rows_and_trains_on_the_samples_only(tiny_model, tiny_params, make_rollout):
    """Rows 0–3: two prompts × two samples; rows 4–5: each prompt's greedy response (KL in the reward, so
    the samples' rewards carry −β·Σk; the policy is its own reference here, so Σk = 0)."""
    cfg = RLOOConfig(group_size=2, advantage="remax", overlong_buffer=2, overlong_penalty=0.5,
                     missing_eos_penalty=1.0, temperature=T)
    rollout = make_rollout(2, b=6)
    scores = np.array([1.0, 0.0, 2.0, 3.0, 0.5, 1.0], np.float32)
    fn = jax.jit(make_group_experience_fn(tiny_model, tiny_model, cfg))
    policy = PolicyParams(tiny_params)
    batch, metrics = fn(policy, policy, None, rollout, scores, kl_state(0.05))
    assert batch.sequences.shape[0] == 4
    lengths = np.asarray(rollout.response_mask).sum(1)
    eos = np.asarray(rollout.stopped)
    # Soft over-long: 0 up to N − 2 = 4 tokens, then (4 − L)/2 (×0.5) up to N.
    overlong = np.where(lengths <= 4, 0.0, (4 - lengths) / 2) * 0.5
    shaped = scores - 1.0 * ~eos + overlong
    np.testing.assert_allclose(batch.scores, shaped[:4], rtol=1e-6)
    mask = np.asarray(rollout.response_mask[:4], np.float32)
    want = numpy_advantages("remax", shaped[:4], np.zeros((4, N)), mask, 0.0, 2, shaped[4:])
    np.testing.assert_allclose(batch.advantages, want, rtol=1e-5, atol=1e-6)
    assert float(metrics["remax/greedy_reward"]) == pytest.approx(shaped[4:].mean())
    assert float(metrics["reward"]) == pytest.approx(shaped[:4].mean())


def test_rows_that_do_not_form_groups_are_refused(tiny_model, tiny_params, make_rollout):
    fn = make_group_experience_fn(tiny_model, tiny_model, GRPOConfig(group_size=3, temperature=T))
    policy = PolicyParams(tiny_params)
    with pytest.raises(ValueError, match="group_size: a batch of 4 rows is not divisible into groups of 3"):
        fn(policy, policy, None, make_rollout(0), jnp.zeros(4), kl_state(0.0))
    with pytest.raises(ValueError, match=r"groups of 2 \+ 1 greedy response"):
        sample_rows(4, GRPOConfig(group_size=2, advantage="remax"))
    assert sample_rows(6, GRPOConfig(group_size=2, advantage="remax")) == 4
    with pytest.raises(ValueError, match="no critic_params"):
        fn(policy, policy, object(), make_rollout(0), jnp.zeros(4), kl_state(0.0))


def test_logprobs_from_rollout_and_tis(tiny_model, tiny_params, other_params):
    """logprobs_from: rollout takes the sampled log-probs as the old ones (no policy forward); the default
    recompute agrees with them up to float32 rounding, and with tis_cap carries
    w = min(π_old/π_sampler, C)."""
    from jaxrlhf.rollout.generate import GenerationConfig, generate

    prompts = jnp.asarray(np.random.RandomState(0).randint(3, 16, (2, 4)), jnp.int32)
    rollout = generate(tiny_model, tiny_params, prompts, jnp.ones((2, 4), jnp.int32), jax.random.key(0),
                       GenerationConfig(max_new_tokens=5, group_size=4))
    scores = jnp.arange(8, dtype=jnp.float32)
    kl_state = KLControllerState(jnp.float32(0.1))
    out = {}
    for name, cfg in (("rollout", GRPOConfig(group_size=4, logprobs_from="rollout")),
                      ("recompute", GRPOConfig(group_size=4, num_minibatches=2, tis_cap=1.5))):
        fn = jax.jit(make_group_experience_fn(tiny_model, tiny_model, cfg))
        out[name], _ = fn(PolicyParams(tiny_params), PolicyParams(other_params), None, rollout, scores,
                          kl_state)
    mask = np.asarray(rollout.response_mask)
    np.testing.assert_array_equal(out["rollout"].old_logprobs, np.asarray(rollout.logprobs) * mask)
    np.testing.assert_allclose(out["recompute"].old_logprobs, out["rollout"].old_logprobs, atol=1e-5)
    old, sampler = np.asarray(out["recompute"].old_logprobs), np.asarray(rollout.logprobs)
    expected = np.minimum(np.exp(old - sampler), 1.5)
    np.testing.assert_allclose(out["recompute"].tis_weights, expected * mask, rtol=1e-6)
    assert out["rollout"].tis_weights is None

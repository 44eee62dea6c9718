"""KL estimators (formulas, k3 ≥ 0, unbiasedness on sampled tokens), KL-penalised rewards, KL loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.kl import kl_estimate, kl_k1, kl_k2, kl_k3, kl_loss, kl_penalized_rewards


def test_estimators_against_formulas(maybe_jit):
    rng = np.random.default_rng(0)
    logp = rng.normal(-2.0, 1.0, (3, 5)).astype(np.float32)
    ref = rng.normal(-2.0, 1.0, (3, 5)).astype(np.float32)
    log_r = ref.astype(np.float64) - logp
    np.testing.assert_allclose(maybe_jit(kl_k1)(logp, ref), -log_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maybe_jit(kl_k2)(logp, ref), 0.5 * log_r**2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maybe_jit(kl_k3)(logp, ref), np.exp(log_r) - 1 - log_r, rtol=1e-4, atol=1e-6)
    for name, fn in [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)]:
        est = maybe_jit(kl_estimate, static_argnames="estimator")(logp, ref, estimator=name)
        np.testing.assert_array_equal(est, fn(logp, ref))
    # hand: logp = log 0.5, ref = log 0.25 → log r = −log 2; k1 = log 2, k2 = ½(log 2)², k3 = −½ + log 2
    lp, rp = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    np.testing.assert_allclose(kl_k1(lp, rp), [np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(kl_k2(lp, rp), [0.5 * np.log(2) ** 2], rtol=1e-6)
    np.testing.assert_allclose(kl_k3(lp, rp), [np.log(2) - 0.5], rtol=1e-5)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="'k4'"):
        kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")


def test_k3_non_negative_everywhere():
    log_r = np.concatenate([np.linspace(-30.0, 30.0, 2001), [0.0, 1e-8, -1e-8, 1e-4, -1e-4]])
    log_r = log_r.astype(np.float32)
    k3 = jax.jit(kl_k3)(np.zeros_like(log_r), log_r)
    assert bool(jnp.all(k3 >= 0)) and bool(jnp.all(jnp.isfinite(k3)))


def test_k1_and_k3_are_unbiased_on_sampled_tokens():
    rng = np.random.default_rng(1)
    vocab, samples = 12, 200_000
    logits = rng.normal(size=vocab)
    ref_logits = logits + rng.normal(0.0, 0.7, size=vocab)
    logp_all = logits - np.log(np.exp(logits).sum())
    ref_all = ref_logits - np.log(np.exp(ref_logits).sum())
    exact = float(np.sum(np.exp(logp_all) * (logp_all - ref_all)))  # KL(π ‖ π_ref)
    tokens = rng.choice(vocab, size=samples, p=np.exp(logp_all))
    logp, ref = logp_all[tokens].astype(np.float32), ref_all[tokens].astype(np.float32)
    for fn in (kl_k1, kl_k3):
        est = np.asarray(jax.jit(fn)(logp, ref), np.float64)
        stderr = est.std() / np.sqrt(samples)
        assert abs(est.mean() - exact) < 4 * stderr, (fn.__name__, est.mean(), exact, stderr)
    # k3's variance is smaller than k1's here (the reason to prefer it), and k2 is non-negative
    assert np.var(jax.jit(kl_k3)(logp, ref)) < np.var(jax.jit(kl_k1)(logp, ref))
    assert np.all(np.asarray(jax.jit(kl_k2)(logp, ref)) >= 0)


def reference_rewards(score, kl, mask, beta, eos, penalty):
    non_score = -beta * kl * mask
    rewards = non_score.copy()
    for b in range(mask.shape[0]):
        idx = np.nonzero(mask[b])[0]
        if idx.size:
            rewards[b, idx[-1]] += score[b] - (0.0 if eos[b] else penalty)
    return rewards, non_score


def test_kl_penalized_rewards_hand_case():
    # row 0: 3 tokens, β = 0.5, kl = [0.2, 0.4, 1.0] → −β·kl = [−0.1, −0.2, −0.5]; score 2 at t = 2 → 1.5
    # row 1: 1 token, no EOS: score 1 − penalty 3 = −2 at t = 0, minus 0.5·0.2 → −2.1
    # row 2: no tokens: everything 0, score dropped
    score = jnp.array([2.0, 1.0, 5.0])
    kl = jnp.array([[0.2, 0.4, 1.0], [0.2, 7.0, 7.0], [9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    eos = jnp.array([True, False, True])
    rewards, non_score = jax.jit(kl_penalized_rewards)(score, kl, mask, 0.5, eos, missing_eos_penalty=3.0)
    np.testing.assert_allclose(rewards, [[-0.1, -0.2, 1.5], [-2.1, 0, 0], [0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(non_score, [[-0.1, -0.2, -0.5], [-0.1, 0, 0], [0, 0, 0]], atol=1e-6)


def test_kl_penalized_rewards_against_loop(maybe_jit):
    rng = np.random.default_rng(2)
    batch, time = 6, 8
    lengths = np.array([8, 0, 1, 5, 3, 7])
    mask = (np.arange(time)[None] < lengths[:, None]).astype(np.float32)
    score = rng.normal(size=batch).astype(np.float32)
    kl = rng.normal(size=(batch, time)).astype(np.float32)
    eos = rng.random(batch) < 0.5
    rewards, non_score = maybe_jit(kl_penalized_rewards)(score, kl, mask, 0.05, eos, 1.0)
    ref_rewards, ref_non_score = reference_rewards(score, kl, mask, 0.05, eos, 1.0)
    np.testing.assert_allclose(rewards, ref_rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(non_score, ref_non_score, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(rewards))


def test_kl_penalized_rewards_vmap_over_beta():
    score, kl = jnp.array([1.0]), jnp.array([[1.0, 2.0]])
    mask, eos = jnp.ones((1, 2)), jnp.array([True])
    betas = jnp.array([0.0, 0.1, 1.0])
    rewards, _ = jax.jit(jax.vmap(lambda beta: kl_penalized_rewards(score, kl, mask, beta, eos)))(betas)
    # [−β·1, 1 − β·2]
    np.testing.assert_allclose(rewards[:, 0], [[0.0, 1.0], [-0.1, 0.8], [-1.0, -1.0]], atol=1e-6)


def test_kl_loss(maybe_jit):
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.1]]))
    ref = jnp.log(jnp.array([[0.25, 0.5, 0.9]]))
    mask = jnp.array([[1.0, 1.0, 0.0]])
    # k2 (the default) over the two masked-in tokens: (½(log 2)² + 0)/2
    assert maybe_jit(kl_loss)(logp, ref, mask) == pytest.approx(0.25 * np.log(2) ** 2, rel=1e-5)
    # k3: (log 2 − ½ + 0)/2
    loss = maybe_jit(kl_loss, static_argnames="estimator")(logp, ref, mask, estimator="k3")
    assert loss == pytest.approx((np.log(2) - 0.5) / 2, rel=1e-5)
    g_logp, g_ref = jax.jit(jax.grad(lambda a, b: kl_loss(a, b, mask, "k3"), argnums=(0, 1)))(logp, ref)
    # d k3 / d logp = 1 − r = 1 − 0.5 on token 0, 0 on token 1; over 2 tokens → 0.25
    np.testing.assert_allclose(g_logp, [[0.25, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(g_ref, jnp.zeros_like(ref))
    # d k2 / d logp = logp − ref = log 2 on token 0; over 2 tokens → ½·log 2
    g_logp = jax.jit(jax.grad(lambda a: kl_loss(a, ref, mask)))(logp)
    np.testing.assert_allclose(g_logp, [[0.5 * np.log(2), 0.0, 0.0]], rtol=1e-5, atol=1e-7)


def test_kl_loss_rejects_k1():
    with pytest.raises(ValueError, match="'k1' has zero expected gradient"):
        kl_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), "k1")
    with pytest.raises(ValueError, match="'k4'"):
        kl_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), "k4")


def test_kl_loss_aggregation(maybe_jit):
    # row 0: log r = [1, 1] → k2 = [½, ½]; row 1: log r = [2, pad] → k2 = [2]
    logp = jnp.zeros((2, 2))
    ref = jnp.array([[1.0, 1.0], [2.0, 9.0]])
    mask = jnp.array([[1, 1], [1, 0]])
    agg = maybe_jit(kl_loss, static_argnames=("estimator", "loss_agg"))
    assert agg(logp, ref, mask, loss_agg="token_mean") == pytest.approx(3.0 / 3)
    assert agg(logp, ref, mask, loss_agg="sequence_mean") == pytest.approx((0.5 + 2.0) / 2)
    assert agg(logp, ref, mask, loss_agg="token_sum_norm") == pytest.approx(3.0 / 4)
    assert agg(logp, ref, mask, loss_agg="token_sum_norm", norm_constant=10.0) == pytest.approx(0.3)


# --- Which divergence each estimator's gradient follows, on a small categorical -------------------------

VOCAB = 5
THETA = jnp.array([0.3, -0.8, 1.2, 0.0, -0.4])  # π = softmax(θ)
REF_LOGP = jax.nn.log_softmax(jnp.array([-0.5, 0.4, 0.9, -1.1, 0.2]))  # π_ref, fixed


def kl_forward(theta):
    """KL(π ‖ π_ref), exact."""
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(logp) * (logp - REF_LOGP))


def kl_reverse(theta):
    """KL(π_ref ‖ π), exact."""
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(REF_LOGP) * (REF_LOGP - logp))


def expected_loss_gradient(estimator):
    """E_{y~π}[∇_θ k(y)] by enumeration: the weights π(y) are constants (a sample average of the loss,
    the sampling not differentiated)."""

    def surrogate(theta):
        logp = jax.nn.log_softmax(theta)
        weights = jax.lax.stop_gradient(jnp.exp(logp))
        return jnp.sum(weights * kl_estimate(logp, REF_LOGP, estimator))

    return jax.jit(jax.grad(surrogate))(THETA)


def test_expected_gradients_follow_the_stated_divergence():
    g_forward = np.asarray(jax.grad(kl_forward)(THETA))
    g_reverse = np.asarray(jax.grad(kl_reverse)(THETA))
    assert np.linalg.norm(g_forward - g_reverse) > 0.1  # the two directions really differ here
    np.testing.assert_allclose(expected_loss_gradient("k1"), np.zeros(VOCAB), atol=1e-6)
    np.testing.assert_allclose(expected_loss_gradient("k2"), g_forward, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expected_loss_gradient("k3"), g_reverse, rtol=1e-5, atol=1e-6)


def test_sampled_gradients_follow_the_stated_divergence():
    """Monte-Carlo: the gradient of the loss on M sampled tokens, mean over R repeats, within 4 standard
    errors of the exact gradient (and k3's within them of ∇KL(π_ref‖π), not of ∇KL(π‖π_ref))."""
    repeats, samples = 400, 500
    keys = jax.random.split(jax.random.PRNGKey(0), repeats)
    tokens = jax.vmap(lambda k: jax.random.categorical(k, THETA, shape=(samples,)))(keys)  # [R, M]
    mask = jnp.ones((samples,))

    def grads(estimator):
        def loss(theta, toks):
            logp = jax.nn.log_softmax(theta)[toks]
            if estimator == "k1":  # kl_loss refuses k1; its sample average is the same thing
                return jnp.mean(kl_estimate(logp, REF_LOGP[toks], "k1"))
            return kl_loss(logp, REF_LOGP[toks], mask, estimator)

        return np.asarray(jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(THETA, tokens))  # [R, V]

    g_forward = np.asarray(jax.grad(kl_forward)(THETA))
    g_reverse = np.asarray(jax.grad(kl_reverse)(THETA))
    for estimator, exact, other in [("k1", np.zeros(VOCAB), g_forward), ("k2", g_forward, g_reverse),
                                    ("k3", g_reverse, g_forward)]:
        g = grads(estimator)
        mean, stderr = g.mean(0), g.std(0) / np.sqrt(repeats) + 1e-7
        assert np.all(np.abs(mean - exact) < 4 * stderr), (estimator, mean, exact, stderr)
        assert np.any(np.abs(mean - other) > 8 * stderr), (estimator, "indistinguishable", mean, other)

"""Token log-probs, entropy, PPO / value / A2C losses: NumPy references and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.policy_losses import (
    a2c_policy_loss,
    a2c_value_loss,
    entropy_from_logits,
    gspo_policy_loss,
    ppo_policy_loss,
    token_logprobs,
    token_logprobs_and_entropy,
    value_loss,
)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_token_logprobs(maybe_jit):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(2, 3)).astype(np.int32)
    for temperature in (1.0, 0.7):
        got = maybe_jit(token_logprobs)(logits, tokens, temperature)
        expected = np.take_along_axis(np_log_softmax(logits / temperature), tokens[..., None], -1)[..., 0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the same inputs always give bit-identical values (PPO ratio exactly 1), also from bfloat16 logits
    first = token_logprobs(jnp.asarray(logits, jnp.bfloat16), tokens)
    assert first.dtype == jnp.float32
    np.testing.assert_array_equal(first, token_logprobs(jnp.asarray(logits, jnp.bfloat16), tokens))
    with pytest.raises(AssertionError):
        token_logprobs(logits, tokens.astype(np.float32))
    with pytest.raises(AssertionError):
        token_logprobs(logits, tokens[:, :2])


def test_entropy(maybe_jit):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6)).astype(np.float32)
    logp = np_log_softmax(logits)
    expected = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(maybe_jit(entropy_from_logits)(logits), expected, rtol=1e-5)


def test_entropy_special_cases():
    entropy = jax.jit(entropy_from_logits)
    assert entropy(jnp.zeros(5)) == pytest.approx(np.log(5))  # uniform: log V
    # −inf entries (top-k masking) drop out: same as the entropy over the finite entries
    masked = jnp.array([[1.0, -jnp.inf, 2.0, -jnp.inf]])
    assert entropy(masked)[0] == pytest.approx(float(entropy(jnp.array([1.0, 2.0]))))
    grad = jax.jit(jax.grad(lambda z: entropy_from_logits(z).sum()))(masked)
    assert bool(jnp.all(jnp.isfinite(grad))) and grad[0, 1] == 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_logprobs_and_entropy_values_and_gradients(maybe_jit, temperature):
    """The same values as the two functions (bit for bit under jit); gradients equal autodiff's of them
    and the closed form (1[v = y] − p)·g_lp − p·(log p + H)·g_H, over T, in float64 NumPy."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 2.0
    logits[1, 2, [0, 4]] = -np.inf  # masked entries: p = 0, no gradient
    tokens = rng.integers(1, 4, size=(2, 3)).astype(np.int32)
    g_lp, g_h = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)

    def separate(z):
        return token_logprobs(z, tokens, temperature), entropy_from_logits(z / temperature)

    def fused(z):
        return token_logprobs_and_entropy(z, tokens, temperature)

    for got, want in zip(jax.jit(fused)(logits), jax.jit(separate)(logits)):
        np.testing.assert_array_equal(got, want)  # one program each: the same values to the last bit
    for got, want in zip(maybe_jit(fused)(logits), maybe_jit(separate)(logits)):
        np.testing.assert_allclose(got, want, rtol=1e-6)  # eagerly the custom rule runs as its own program
    weigh = lambda f: lambda z: jnp.sum(g_lp * f(z)[0] + g_h * f(z)[1])
    grad = maybe_jit(jax.grad(weigh(fused)))(logits)
    np.testing.assert_allclose(grad, maybe_jit(jax.grad(weigh(separate)))(logits), rtol=1e-5, atol=1e-6)
    z = logits.astype(np.float64) / temperature
    logp = np_log_softmax(z)
    p = np.exp(logp)
    safe = np.where(p > 0, logp, 0.0)
    entropy = -(p * safe).sum(-1, keepdims=True)
    onehot = np.arange(7) == tokens[..., None]
    a, b = g_lp[..., None], g_h[..., None]
    expected = (onehot * a - p * (a + b * (safe + entropy))) / temperature
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    assert (np.asarray(grad)[1, 2, [0, 4]] == 0).all()


def test_ppo_policy_loss_hand_case(maybe_jit):
    # r = [1.5, 0.5, 1, 1.1], A = [1, 1, −2, −1], ε = 0.2:
    # t0: max(−1.5, −1.2) = −1.2 (clipped); t1: max(−0.5, −0.8) = −0.5;
    # t2: max(2, 2) = 2; t3: max(1.1, 1.1) = 1.1
    # loss = (−1.2 − 0.5 + 2 + 1.1)/4 = 0.35; clipfrac = 1/4; mean r = 4.1/4
    logp = jnp.log(jnp.array([1.5, 0.5, 1.0, 1.1]))
    old = jnp.zeros(4)
    adv = jnp.array([1.0, 1.0, -2.0, -1.0])
    mask = jnp.ones(4)
    loss, metrics = maybe_jit(ppo_policy_loss)(logp, old, adv, mask)
    assert loss == pytest.approx(0.35, rel=1e-5)
    assert metrics["clipfrac"] == pytest.approx(0.25)
    assert metrics["ratio"] == pytest.approx(1.025, rel=1e-6)
    assert metrics["ratio_var"] == pytest.approx(np.var([1.5, 0.5, 1.0, 1.1]), rel=1e-5)
    assert metrics["approxkl"] == pytest.approx(0.5 * np.mean(np.log([1.5, 0.5, 1.0, 1.1]) ** 2), rel=1e-5)


def test_ppo_dual_clip_hand_case(maybe_jit):
    # c = 3, ε = 0.2: (A = −1, r = 5): max(5, 1.2) = 5 → min(5, 3) = 3; (A = −1, r = 2): min(2, 3) = 2;
    # (A = 1, r = 5): max(−5, −1.2) = −1.2, no dual clip for A > 0 → loss = (3 + 2 − 1.2)/3
    logp = jnp.log(jnp.array([5.0, 2.0, 5.0]))
    adv = jnp.array([-1.0, -1.0, 1.0])
    loss, _ = maybe_jit(ppo_policy_loss)(logp, jnp.zeros(3), adv, jnp.ones(3), 0.2, 3.0)
    assert loss == pytest.approx(3.8 / 3, rel=1e-5)
    loss_plain, _ = ppo_policy_loss(logp, jnp.zeros(3), adv, jnp.ones(3))
    assert loss_plain == pytest.approx((5 + 2 - 1.2) / 3, rel=1e-5)


def reference_ppo(logp, old, adv, mask, eps):
    ratio = np.exp(logp - old)
    a, b = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
    m = mask.astype(bool)
    return np.maximum(a, b)[m].mean(), (b > a)[m].mean(), ratio[m].mean(), ratio[m].var()


def test_ppo_against_numpy_and_gradient(maybe_jit):
    rng = np.random.default_rng(2)
    shape = (3, 6)
    old = rng.normal(-1.5, 0.5, shape).astype(np.float32)
    logp = (old + rng.normal(0.0, 0.3, shape)).astype(np.float32)
    adv = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(shape) < 0.7
    loss, metrics = maybe_jit(ppo_policy_loss)(logp, old, adv, mask, 0.1)
    ref_loss, ref_clipfrac, ref_ratio, ref_var = reference_ppo(logp, old, adv, mask, 0.1)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["clipfrac"], ref_clipfrac, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio"], ref_ratio, rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_var"], ref_var, rtol=1e-4)
    # on-policy (ratio 1) the gradient is −A·m/n and none flows into the advantages
    grads = jax.jit(jax.grad(lambda lp, a: ppo_policy_loss(lp, old, a, mask)[0], argnums=(0, 1)))(old, adv)
    np.testing.assert_allclose(grads[0], -adv * mask / mask.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grads[1], np.zeros(shape))


def test_ppo_vmap_over_clip_eps():
    logp = jnp.log(jnp.array([1.5]))
    eps = jnp.array([0.1, 0.2, 0.6])
    sweep = jax.jit(jax.vmap(lambda e: ppo_policy_loss(logp, jnp.zeros(1), jnp.ones(1), jnp.ones(1), e)[0]))
    losses = sweep(eps)
    np.testing.assert_allclose(losses, [-1.1, -1.2, -1.5], rtol=1e-5)  # −A·min(r, 1 + ε)


def test_ppo_clip_higher_hand_case(maybe_jit):
    # ε_low = 0.2, ε_high = 0.28 (DAPO):
    # (r 1.25, A 1): inside [0.8, 1.28] → −1.25 (symmetric ε = 0.2 would clip it to −1.2)
    # (r 1.3, A 1): clipped high → −1.28; (r 0.7, A −1): max(0.7, 0.8) = 0.8, clipped low
    # (r 0.7, A 1): max(−0.7, −0.8) = −0.7; (r 1.5, A −1): max(1.5, 1.28) = 1.5
    # loss = (−1.25 − 1.28 + 0.8 − 0.7 + 1.5)/5 = −0.186
    ratio = jnp.array([1.25, 1.3, 0.7, 0.7, 1.5])
    adv = jnp.array([1.0, 1.0, -1.0, 1.0, -1.0])
    zeros, ones = jnp.zeros(5), jnp.ones(5)
    loss, metrics = maybe_jit(ppo_policy_loss)(jnp.log(ratio), zeros, adv, ones, 0.2, clip_eps_high=0.28)
    assert loss == pytest.approx(-0.186, rel=1e-5)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.2)  # token 1
    assert metrics["clip_ratio/low_mean"] == pytest.approx(0.2)  # token 2
    assert metrics["clip_ratio/region_mean"] == pytest.approx(0.4)
    assert metrics["clipfrac"] == pytest.approx(0.4)
    symmetric, metrics = ppo_policy_loss(jnp.log(ratio), zeros, adv, ones, 0.2)
    assert symmetric == pytest.approx((-1.2 - 1.2 + 0.8 - 0.7 + 1.5) / 5, rel=1e-5)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.4)


def test_ppo_clip_metrics_against_numpy():
    rng = np.random.default_rng(5)
    shape = (4, 7)
    log_ratio = rng.normal(0.0, 0.3, shape).astype(np.float32)
    adv = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(shape) < 0.7
    _, metrics = jax.jit(ppo_policy_loss)(log_ratio, np.zeros(shape, np.float32), adv, mask, 0.1,
                                          clip_eps_high=0.3)
    ratio = np.exp(log_ratio.astype(np.float64))
    low, high = (ratio < 0.9) & (adv < 0), (ratio > 1.3) & (adv > 0)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(low[mask].mean())
    assert metrics["clip_ratio/high_mean"] == pytest.approx(high[mask].mean())
    assert metrics["clip_ratio/region_mean"] == pytest.approx((low | high)[mask].mean())


def reference_gspo(logp, old, adv, mask, eps_low, eps_high):
    """GSPO in float64 NumPy: loss, per-sequence ratios."""
    mask = mask.astype(np.float64)
    lengths = mask.sum(1)
    rows = lengths > 0
    s = np.exp(((logp - old) * mask).sum(1) / np.maximum(lengths, 1))
    per_seq = np.maximum(-adv * s, -adv * np.clip(s, 1 - eps_low, 1 + eps_high))
    return per_seq[rows].mean(), s


def gspo_batch(seed=6):
    rng = np.random.default_rng(seed)
    batch, time = 6, 5
    lengths = np.array([5, 3, 1, 0, 4, 2])
    mask = np.arange(time)[None] < lengths[:, None]
    old = rng.normal(-1.5, 0.5, (batch, time))
    logp = old + rng.normal(0.0, 0.2, (batch, time))
    adv = np.array([1.0, -1.0, 0.5, 2.0, -0.7, 1.3])
    return logp, old, adv, mask


def test_gspo_against_numpy(maybe_jit):
    logp, old, adv, mask = gspo_batch()
    eps_low, eps_high = 0.04, 0.06
    ref_loss, s = reference_gspo(logp, old, adv, mask, eps_low, eps_high)
    f32 = [np.asarray(a, np.float32) for a in (logp, old, adv)]
    loss, metrics = maybe_jit(gspo_policy_loss)(*f32, mask, eps_low, eps_high)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    rows = mask.sum(1) > 0
    np.testing.assert_allclose(metrics["ratio"], s[rows].mean(), rtol=1e-5)
    low, high = (s < 1 - eps_low) & (adv < 0), (s > 1 + eps_high) & (adv > 0)
    assert 0 < low[rows].sum() + high[rows].sum() < rows.sum()  # some sequences clipped, some not
    assert metrics["clip_ratio/low_mean"] == pytest.approx(low[rows].mean())
    assert metrics["clip_ratio/high_mean"] == pytest.approx(high[rows].mean())
    # one token per row: GSPO is PPO on those tokens with a sequence mean
    one = np.zeros_like(mask)
    one[:, 0] = True
    first = [np.asarray(a, np.float32) for a in (logp[:, :1], old[:, :1], adv[:, None])]
    ppo, _ = ppo_policy_loss(*first, one[:, :1], eps_low, clip_eps_high=eps_high)
    np.testing.assert_allclose(gspo_policy_loss(*f32, one, eps_low, eps_high)[0], ppo, rtol=1e-5)


def test_gspo_gradient_matches_finite_differences():
    logp, old, adv, mask = gspo_batch()
    eps_low, eps_high = 0.04, 0.06
    _, s = reference_gspo(logp, old, adv, mask, eps_low, eps_high)
    # no sequence sits on a clip boundary (where the loss has a kink)
    assert np.min(np.abs(np.concatenate([s - (1 - eps_low), s - (1 + eps_high)]))) > 1e-3
    grad = jax.jit(jax.grad(lambda lp: gspo_policy_loss(lp, old.astype(np.float32), adv.astype(np.float32),
                                                        mask, eps_low, eps_high)[0]))
    got = np.asarray(grad(logp.astype(np.float32)))
    h = 1e-6
    numeric = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, down = logp.copy(), logp.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (reference_gspo(up, old, adv, mask, eps_low, eps_high)[0]
                        - reference_gspo(down, old, adv, mask, eps_low, eps_high)[0]) / (2 * h)
    np.testing.assert_allclose(got, numeric, rtol=1e-4, atol=1e-6)
    assert np.all(got[~mask] == 0)  # padding gets no gradient
    clipped = ((s < 1 - eps_low) & (adv < 0)) | ((s > 1 + eps_high) & (adv > 0))
    assert clipped.any() and np.all(got[clipped] == 0)  # a clipped sequence gets none either


def test_value_loss(maybe_jit):
    # v = [1, 2], v_old = [0.5, 2], R = [2, 1], ε = 0.2:
    # t0: (1 − 2)² = 1, clip(v) = 0.7 → (0.7 − 2)² = 1.69 (larger); t1: 1 and 1
    # loss = ½·(1.69 + 1)/2 = 0.6725; clipfrac = 1/2; unclipped: ½·(1 + 1)/2 = 0.5
    v, old, ret, mask = jnp.array([1.0, 2.0]), jnp.array([0.5, 2.0]), jnp.array([2.0, 1.0]), jnp.ones(2)
    loss, metrics = maybe_jit(value_loss)(v, old, ret, mask)
    assert loss == pytest.approx(0.6725, rel=1e-5)
    assert metrics["clipfrac"] == pytest.approx(0.5)
    loss, metrics = value_loss(v, old, ret, mask, clip_eps=None)
    assert loss == pytest.approx(0.5) and metrics["clipfrac"] == 0.0
    # random values against NumPy
    rng = np.random.default_rng(3)
    v, old, ret = (rng.normal(size=(2, 5)).astype(np.float32) for _ in range(3))
    mask = rng.random((2, 5)) < 0.6
    clipped = old + np.clip(v - old, -0.3, 0.3)
    per = np.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    loss, _ = maybe_jit(value_loss)(v, old, ret, mask, 0.3)
    np.testing.assert_allclose(loss, 0.5 * per[mask].mean(), rtol=1e-5)


def test_an_inactive_value_clip_is_exactly_no_clip(maybe_jit):
    # Values inside the band (|v − v_old| ≤ ε) must give the unclipped loss bit for bit and clipfrac 0, and
    # ε = ∞ (the studies' traced "off") must equal clip_eps=None: v_old + (v − v_old) rounds away from v.
    rng = np.random.default_rng(0)
    # values near 0 that change sign within the band: v − v_old is then inexact in float32
    old = rng.normal(scale=0.05, size=(64, 16)).astype(np.float32)
    v = (old + rng.uniform(-0.1, 0.1, size=old.shape)).astype(np.float32)
    ret = rng.normal(size=old.shape).astype(np.float32)
    mask = np.ones(old.shape, bool)
    assert np.any((old + (v - old)) != v)  # the rounding the old formula suffered from is present here
    none, _ = value_loss(v, old, ret, mask, None)
    for eps in (0.2, np.inf):
        loss, metrics = maybe_jit(value_loss)(v, old, ret, mask, eps)
        assert metrics["clipfrac"] == 0.0
        assert loss == none
        grad = jax.grad(lambda x, e=eps: value_loss(x, old, ret, mask, e)[0])(v)
        np.testing.assert_array_equal(grad, jax.grad(lambda x: value_loss(x, old, ret, mask, None)[0])(v))


def test_a2c_losses(maybe_jit):
    # logp = [−1, −2, −9], A = [2, −1, 5], mask = [1, 1, 0] → (2·1 + (−1)·2)/2 = (−(2·−1) − (−1·−2))/2 = 0
    logp, adv, mask = jnp.array([-1.0, -2.0, -9.0]), jnp.array([2.0, -1.0, 5.0]), jnp.array([1, 1, 0])
    assert maybe_jit(a2c_policy_loss)(logp, adv, mask) == pytest.approx(0.0)
    grads = jax.jit(jax.grad(a2c_policy_loss, argnums=(0, 1)))(logp, adv, mask)
    np.testing.assert_allclose(grads[0], [-1.0, 0.5, 0.0])  # −A·m/n
    np.testing.assert_array_equal(grads[1], [0.0, 0.0, 0.0])
    # V = [1, 3], R = [2, 0] → ((−1)² + 3²)/2 = 5 (no ½: RL4LMs convention)
    loss = maybe_jit(a2c_value_loss)(jnp.array([1.0, 3.0]), jnp.array([2.0, 0.0]), jnp.ones(2))
    assert loss == pytest.approx(5.0)

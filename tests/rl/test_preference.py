"""Reward-model losses and the DPO family: hand values, loop references, PL(k = 2) == BT."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.preference import (
    bradley_terry_loss,
    dpo_loss,
    pairwise_accuracy,
    plackett_luce_loss,
    rating_regression_loss,
)

LOG_SIG_1 = np.log1p(np.exp(-1.0))  # −log σ(1) = 0.3132617
LOG_SIG_M1 = np.log1p(np.exp(1.0))  # −log σ(−1) = 1.3132617


def test_bradley_terry_hand_case():
    # r_c − r_r = [1, −1] → loss = (0.31326 + 1.31326)/2; accuracy 1/2; margin 0
    # centring 0.1·mean((2 + 1)², (0 + 1)²) = 0.1·5 = 0.5
    bt = jax.jit(bradley_terry_loss)
    loss, metrics = bt(jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]))
    assert loss == pytest.approx((LOG_SIG_1 + LOG_SIG_M1) / 2, rel=1e-6)
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == 0.0
    loss, _ = bt(jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]), 0.0, 0.1)
    assert loss == pytest.approx((LOG_SIG_1 + LOG_SIG_M1) / 2 + 0.5, rel=1e-6)
    # margin 2 on the first pair: −log σ(1 − 2) = 1.31326
    loss, _ = bt(jnp.array([2.0]), jnp.array([1.0]), jnp.array([2.0]))
    assert loss == pytest.approx(LOG_SIG_M1, rel=1e-6)


def test_bradley_terry_weights_and_stability(maybe_jit):
    rng = np.random.default_rng(0)
    rc, rr = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    weights = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    loss, metrics = maybe_jit(bradley_terry_loss)(rc, rr, 0.0, 0.0, weights)
    d = rc[:5] - rr[:5]
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-d))), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(d > 0))
    # a huge negative difference gives a finite loss (log-sigmoid, not log(sigmoid)) and gradient
    big = jax.jit(jax.value_and_grad(lambda r: bradley_terry_loss(r, jnp.array([1000.0]))[0]))
    value, grad = big(jnp.array([0.0]))
    assert value == pytest.approx(1000.0) and grad[0] == pytest.approx(-1.0)


def reference_pl(rewards, mask):
    nll = []
    for row, valid in zip(rewards, mask):
        r = row[valid.astype(bool)].astype(np.float64)
        nll.append(sum(np.log(np.exp(r[i:]).sum()) - r[i] for i in range(len(r))))
    return np.mean(nll)


def test_plackett_luce_hand_case():
    # r = [2, 1, 0]: [log(e² + e + 1) − 2] + [log(e + 1) − 1] + 0 = log(1 + e⁻¹ + e⁻²) + log(1 + e⁻¹)
    loss, metrics = jax.jit(plackett_luce_loss)(jnp.array([[2.0, 1.0, 0.0]]))
    assert loss == pytest.approx(np.log(1 + np.exp(-1) + np.exp(-2)) + LOG_SIG_1, rel=1e-6)
    assert metrics["accuracy"] == 1.0


def test_plackett_luce_against_loop(maybe_jit):
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]], bool)
    loss, metrics = maybe_jit(plackett_luce_loss)(rewards, mask)
    np.testing.assert_allclose(loss, reference_pl(rewards, mask), rtol=1e-5)
    pairs = [
        (rewards[b, i] > rewards[b, j])
        for b in range(5)
        for i, j in itertools.combinations(range(4), 2)
        if mask[b, i] and mask[b, j]
    ]
    np.testing.assert_allclose(metrics["accuracy"], np.mean(pairs), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda r: plackett_luce_loss(r, mask)[0]))(rewards)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)


def test_plackett_luce_with_two_items_is_bradley_terry(maybe_jit):
    rng = np.random.default_rng(2)
    rc, rr = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    pl, pl_metrics = maybe_jit(plackett_luce_loss)(np.stack([rc, rr], axis=1))
    bt, bt_metrics = maybe_jit(bradley_terry_loss)(rc, rr)
    np.testing.assert_allclose(pl, bt, rtol=1e-6)
    np.testing.assert_allclose(pl_metrics["accuracy"], bt_metrics["accuracy"])


def test_rating_regression_and_pairwise_accuracy():
    # errors [1, −2, 9 (weight 0)] → mse (1 + 4)/2 = 2.5, mae 1.5
    loss, metrics = jax.jit(rating_regression_loss)(
        jnp.array([1.0, 0.0, 9.0]), jnp.array([0.0, 2.0, 0.0]), jnp.array([1.0, 1.0, 0.0])
    )
    assert loss == pytest.approx(2.5) and metrics["mae"] == pytest.approx(1.5)
    # ties count as wrong: [2 > 1, 1 = 1, 0 < 1] → 1/3
    assert pairwise_accuracy(jnp.array([2.0, 1.0, 0.0]), jnp.ones(3)) == pytest.approx(1 / 3)


def test_dpo_hand_values():
    # π_c = −1, π_r = −3, ref = −2, −2 → h = 1 − (−1) = 2; β = 0.5 → β·h = 1
    args = (jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))
    dpo = jax.jit(dpo_loss, static_argnames="variant")
    loss, metrics = dpo(*args, beta=0.5)
    assert loss == pytest.approx(LOG_SIG_1, rel=1e-6)  # −log σ(1)
    assert metrics["rewards/chosen"] == pytest.approx(0.5) and metrics["rewards/rejected"] == pytest.approx(
        -0.5
    )
    assert metrics["rewards/margins"] == pytest.approx(1.0) and metrics["rewards/accuracies"] == 1.0
    # cDPO, ε = 0.1: 0.9·0.31326 + 0.1·1.31326
    loss, _ = dpo(*args, beta=0.5, label_smoothing=0.1)
    assert loss == pytest.approx(0.9 * LOG_SIG_1 + 0.1 * LOG_SIG_M1, rel=1e-6)
    # IPO: (h − 1/(2β))² = (2 − 1)² = 1
    assert dpo(*args, beta=0.5, variant="ipo")[0] == pytest.approx(1.0)
    # hinge: relu(1 − β·h) = relu(1 − 1) = 0; β = 0.1 → relu(1 − 0.2) = 0.8
    assert dpo(*args, beta=0.5, variant="hinge")[0] == pytest.approx(0.0)
    assert dpo(*args, beta=0.1, variant="hinge")[0] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="'kto'"):
        dpo_loss(*args, variant="kto")


def test_dpo_against_numpy_vmap_over_beta_and_gradient(maybe_jit):
    rng = np.random.default_rng(3)
    pc, pr, rc, rr = (rng.normal(-20.0, 3.0, 6).astype(np.float32) for _ in range(4))
    h = (pc - rc) - (pr - rr)
    loss, _ = maybe_jit(dpo_loss)(pc, pr, rc, rr, 0.1)
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-0.1 * h))), rtol=1e-5)
    betas = jnp.array([0.05, 0.1, 0.5])
    sweep = jax.jit(jax.vmap(lambda b: dpo_loss(pc, pr, rc, rr, b)[0]))(betas)
    np.testing.assert_allclose(
        sweep, [np.mean(np.log1p(np.exp(-b * h))) for b in (0.05, 0.1, 0.5)], rtol=1e-5
    )
    grads = jax.jit(jax.grad(lambda *a: dpo_loss(*a)[0], argnums=(0, 2)))(pc, pr, rc, rr)
    assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) == 0)  # raise chosen; ref frozen


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# dℓ/dh of each DPO-family loss per pair, h = (π_c − ref_c) − (π_r − ref_r): what each loss optimises.
DPO_LOSS_SLOPES = {
    # DPO: −log σ(βh) → −β·σ(−βh)
    "sigmoid": (dict(variant="sigmoid"), lambda h, b: -b * _sigmoid(-b * h)),
    # cDPO: −(1−ε)·log σ(βh) − ε·log σ(−βh) → −β·[(1−ε)·σ(−βh) − ε·σ(βh)]: zero at σ(βh) = 1 − ε
    "cdpo": (dict(variant="sigmoid", label_smoothing=0.2),
             lambda h, b: -b * (0.8 * _sigmoid(-b * h) - 0.2 * _sigmoid(b * h))),
    # IPO: (h − 1/(2β))² → 2·(h − 1/(2β)): regresses h onto 1/(2β)
    "ipo": (dict(variant="ipo"), lambda h, b: 2.0 * (h - 1.0 / (2.0 * b))),
    # SLiC hinge: relu(1 − βh) → −β while βh < 1, else 0
    "hinge": (dict(variant="hinge"), lambda h, b: np.where(b * h < 1.0, -b, 0.0)),
}


@pytest.mark.parametrize("name", sorted(DPO_LOSS_SLOPES))
def test_dpo_family_gradients_are_their_formulas(maybe_jit, name):
    """∂L/∂log π(y_c) = w·ℓ'(h)/Σw and ∂L/∂log π(y_r) = −w·ℓ'(h)/Σw; nothing flows into the reference."""
    kwargs, slope = DPO_LOSS_SLOPES[name]
    rng = np.random.default_rng(7)
    pc, pr, rc, rr = (rng.normal(-10.0, 4.0, 8).astype(np.float32) for _ in range(4))
    weights = np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32)  # one padded pair
    beta = 0.5
    h = ((pc - rc) - (pr - rr)).astype(np.float64)
    assert np.all(np.abs(beta * h - 1.0) > 1e-3)  # away from the hinge's kink

    def loss(*logps):
        return dpo_loss(*logps, beta=beta, weights=jnp.asarray(weights), **kwargs)[0]

    grads = maybe_jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(pc, pr, rc, rr)
    expected = weights * slope(h, beta) / weights.sum()
    np.testing.assert_allclose(grads[0], expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads[1], -expected, rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)
    assert np.asarray(grads[0])[3] == 0.0  # the padded pair

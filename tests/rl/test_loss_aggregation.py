"""Loss aggregation: token mean (DAPO), sequence mean (GRPO), token sum over a constant (Dr. GRPO), by hand
on responses of unequal length, in value and in the per-token weight the gradient sees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.loss_aggregation import aggregate_loss
from jaxrlhf.rl.policy_losses import a2c_policy_loss, ppo_policy_loss

# row 0: one token with loss 4; row 1: three tokens with loss 1; row 2: empty (a padded row)
PER_TOKEN = jnp.array([[4.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
MASK = jnp.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "loss_agg, norm_constant, expected",
    [
        ("token_mean", None, (4 + 3) / 4),  # every token 1/4
        ("sequence_mean", None, (4 / 1 + 3 / 3) / 2),  # the two non-empty rows weigh the same
        ("token_sum_norm", None, (4 + 3) / 12),  # mask.size = B·T = 3·4
        ("token_sum_norm", 7.0, 1.0),
    ],
)
def test_aggregations_by_hand(maybe_jit, loss_agg, norm_constant, expected):
    agg = maybe_jit(aggregate_loss, static_argnames="loss_agg")
    assert agg(PER_TOKEN, MASK, loss_agg=loss_agg, norm_constant=norm_constant) == pytest.approx(expected)


def token_weights(loss_agg, mask=MASK):
    """∂L/∂ℓ[b, t]: the weight each token's loss gets."""
    return np.asarray(jax.grad(lambda x: aggregate_loss(x, mask, loss_agg))(PER_TOKEN[: mask.shape[0]]))


def test_per_token_weights_differ_as_the_papers_say():
    # token_mean: every token 1/4, whatever its response's length (long responses weigh more in total)
    np.testing.assert_allclose(token_weights("token_mean"), MASK / 4)
    # sequence_mean (GRPO): row 0's single token 1/2, row 1's tokens 1/6 each: a token of the short
    # response weighs 3× one of the long response (the length bias Dr. GRPO removes)
    w = token_weights("sequence_mean")
    np.testing.assert_allclose(w, [[1 / 2, 0, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0], [0, 0, 0, 0]], rtol=1e-6)
    # token_sum_norm (Dr. GRPO): every token 1/C, and C does not depend on the lengths in the batch
    np.testing.assert_allclose(token_weights("token_sum_norm"), MASK / 12)
    longer = MASK.at[0, 1].set(1)  # row 0 grows by one token: the other tokens' weights do not change
    np.testing.assert_allclose(token_weights("token_sum_norm", longer), longer / 12)
    assert token_weights("token_mean", longer)[1, 0] == pytest.approx(1 / 5)  # ... unlike token_mean's
    assert token_weights("sequence_mean", longer)[0, 0] == pytest.approx(1 / 4)  # ... and GRPO's


def test_equal_lengths_make_token_and_sequence_mean_agree():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.ones((3, 5))
    token_mean = float(aggregate_loss(x, mask))
    assert aggregate_loss(x, mask, "sequence_mean") == pytest.approx(token_mean, rel=1e-5)
    assert aggregate_loss(x, mask, "token_sum_norm") == pytest.approx(token_mean, rel=1e-5)


def test_against_numpy_with_float_weights(maybe_jit):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    mask = (rng.random((4, 6)) < 0.6) * rng.uniform(0.5, 2.0, (4, 6))
    mask[2] = 0.0
    agg = maybe_jit(aggregate_loss, static_argnames="loss_agg")
    np.testing.assert_allclose(agg(x, mask, loss_agg="token_mean"), (x * mask).sum() / mask.sum(), rtol=1e-5)
    rows = mask.sum(1) > 0
    per_row = (x * mask).sum(1)[rows] / mask.sum(1)[rows]
    np.testing.assert_allclose(agg(x, mask, loss_agg="sequence_mean"), per_row.mean(), rtol=1e-5)
    np.testing.assert_allclose(agg(x, mask, loss_agg="token_sum_norm"), (x * mask).sum() / 24, rtol=1e-5)


def test_empty_mask_and_unknown_name():
    for name in ("token_mean", "sequence_mean", "token_sum_norm"):
        assert aggregate_loss(PER_TOKEN, jnp.zeros_like(MASK), name) == 0.0
    with pytest.raises(ValueError, match="'seq_mean'"):
        aggregate_loss(PER_TOKEN, MASK, "seq_mean")


def test_policy_losses_take_the_option(maybe_jit):
    # A2C with logp = −1 everywhere and A = ℓ gives per-token loss A (the same table as above)
    logp = -jnp.ones_like(PER_TOKEN)
    a2c = maybe_jit(a2c_policy_loss, static_argnames="loss_agg")
    assert a2c(logp, PER_TOKEN, MASK) == pytest.approx(7 / 4)  # default unchanged: token mean
    assert a2c(logp, PER_TOKEN, MASK, loss_agg="sequence_mean") == pytest.approx(2.5)
    assert a2c(logp, PER_TOKEN, MASK, loss_agg="token_sum_norm") == pytest.approx(7 / 12)
    # PPO on-policy (r = 1): per-token loss −A
    ppo = maybe_jit(ppo_policy_loss, static_argnames="loss_agg")
    zeros = jnp.zeros_like(PER_TOKEN)
    assert ppo(zeros, zeros, PER_TOKEN, MASK)[0] == pytest.approx(-7 / 4)
    assert ppo(zeros, zeros, PER_TOKEN, MASK, loss_agg="sequence_mean")[0] == pytest.approx(-2.5)
    loss, _ = ppo(zeros, zeros, PER_TOKEN, MASK, loss_agg="token_sum_norm", norm_constant=14.0)
    assert loss == pytest.approx(-0.5)

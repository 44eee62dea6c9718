"""Micro-batch splitting and gradient accumulation against the one-pass gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.masked import masked_mean
from jaxrlhf.steps.accumulate import accumulate_gradients, merge_microbatches, split_microbatches

WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


def test_split_is_strided_and_merge_inverts_it():
    x = jnp.arange(12).reshape(6, 2)
    parts = split_microbatches({"x": x}, 3)["x"]
    assert parts.shape == (3, 2, 2)
    np.testing.assert_array_equal(parts[0], x[np.array([0, 3])])  # rows i, i + A, …
    np.testing.assert_array_equal(merge_microbatches(parts), x)
    with pytest.raises(ValueError, match="not divisible"):
        split_microbatches({"x": x}, 4)


def weighted_loss(params, batch):
    """A token-masked mean with uneven token counts per row (the case where naive averaging is wrong)."""
    pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])  # [B, T]
    loss = masked_mean(jnp.square(pred - batch["y"]), batch["mask"])
    return loss, (jnp.sum(batch["mask"]), {"mean_pred": masked_mean(pred, batch["mask"])})


@WITH_AND_WITHOUT_JIT
@pytest.mark.parametrize("num_micro", [2, 4])
def test_accumulated_equals_one_pass(num_micro, transform):
    rng = np.random.RandomState(0)
    batch = {"x": rng.randn(8, 5, 3).astype(np.float32), "y": rng.randn(8, 5).astype(np.float32),
             "mask": (rng.rand(8, 5) < np.linspace(0.1, 1.0, 8)[:, None]).astype(np.float32)}
    batch["mask"][3] = 0.0  # an empty row
    params = {"w": jnp.asarray(rng.randn(3), jnp.float32), "b": jnp.float32(0.3)}
    run = transform(lambda p, b: accumulate_gradients(weighted_loss, p, b, num_micro))
    loss, grads, metrics = run(params, batch)
    (ref_loss, (_, ref_metrics)), ref_grads = jax.value_and_grad(weighted_loss, has_aux=True)(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["mean_pred"], ref_metrics["mean_pred"], rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


def row_loss_with_token_metrics(params, batch):
    """A loss averaged over rows with token-mean metrics, one of them a population variance."""
    pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])  # [B, T]
    mask = batch["mask"]
    per_row = masked_mean(jnp.square(pred - batch["y"]), mask, axis=-1)
    rows = jnp.sum((mask.sum(-1) > 0).astype(jnp.float32))
    loss = jnp.sum(per_row) / jnp.maximum(rows, 1.0)
    mean = masked_mean(pred, mask)
    metrics = {"loss": loss, "mean_pred": mean, "var_pred": masked_mean(jnp.square(pred - mean), mask)}
    tokens = jnp.sum(mask)
    return loss, (rows, metrics, {"mean_pred": tokens, "var_pred": tokens})


@WITH_AND_WITHOUT_JIT
@pytest.mark.parametrize("num_micro", [2, 4])
def test_metric_weights_and_variances_give_the_whole_batchs_values(num_micro, transform):
    rng = np.random.RandomState(1)
    batch = {"x": rng.randn(8, 6, 3).astype(np.float32), "y": rng.randn(8, 6).astype(np.float32),
             "mask": (np.arange(6)[None] < np.array([1, 6, 2, 6, 0, 5, 6, 3])[:, None]).astype(np.float32)}
    params = {"w": jnp.asarray(rng.randn(3), jnp.float32), "b": jnp.float32(0.3)}
    run = transform(lambda p, b: accumulate_gradients(row_loss_with_token_metrics, p, b, num_micro,
                                                      {"var_pred": "mean_pred"}))
    loss, _, metrics = run(params, batch)
    (_, (_, ref, _)), _ = jax.value_and_grad(row_loss_with_token_metrics, has_aux=True)(params, batch)
    pred = np.tanh(batch["x"] @ np.asarray(params["w"]) + 0.3)[batch["mask"] > 0]
    assert float(ref["var_pred"]) == pytest.approx(pred.var(), rel=1e-5)  # the reference is what it says
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-6)
    for k in ref:
        np.testing.assert_allclose(metrics[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
    with pytest.raises(ValueError, match=r"variances name metrics the loss does not return: \['nope'\]"):
        accumulate_gradients(row_loss_with_token_metrics, params, batch, num_micro, {"nope": "mean_pred"})

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

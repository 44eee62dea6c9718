"""SFT: the masked next-token cross-entropy against NumPy, memorisation, and accumulated gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.steps.optim import OptimizerConfig, make_optimizer
from jaxrlhf.steps.sft import SFTConfig, make_sft_step, sft_loss, target_mask
from jaxrlhf.steps.state import create_train_state

WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
B, P, N, V = 8, 4, 8, 16


def numpy_masked_ce(logits, tokens, mask):
    logits = logits[:, :-1].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return (nll * mask).sum() / mask.sum()


@WITH_AND_WITHOUT_JIT
def test_sft_loss_is_masked_next_token_cross_entropy(transform):
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 6, V).astype(np.float32) * 3
    tokens = rng.randint(0, V, (3, 6)).astype(np.int32)
    mask = (rng.rand(3, 5) < 0.7).astype(np.float32)
    mask[2] = 0.0  # a padded row
    loss, metrics = transform(sft_loss)(logits, tokens, mask)
    np.testing.assert_allclose(loss, numpy_masked_ce(logits, tokens, mask), rtol=1e-5)
    hits = (logits[:, :-1].argmax(-1) == tokens[:, 1:]) * mask
    np.testing.assert_allclose(metrics["accuracy"], hits.sum() / mask.sum(), rtol=1e-6)


def sft_batch(seed=0):
    """Prompt + response rows with varied response lengths; the last two rows are padding."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, V, (B, P + N)).astype(np.int32)
    mask = np.ones((B, P + N), np.int32)
    loss_mask = np.zeros((B, P + N), np.int32)
    for i in range(B):
        n = N - i % 3
        mask[i, P + n:] = 0
        tokens[i, P + n:] = 0
        loss_mask[i, P:P + n] = 1
    row_mask = np.ones(B, np.int32)
    row_mask[-2:] = 0
    tokens[-2:], mask[-2:], loss_mask[-2:] = 0, 0, 0
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "row_mask": row_mask}


def test_sft_step_memorises_a_batch(tiny_model, tiny_params):
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"), 100)
    step = jax.jit(make_sft_step(tiny_model, opt, SFTConfig()))
    state = create_train_state(tiny_params, opt)
    batch = sft_batch()
    history = []
    for _ in range(25):
        state, metrics = step(state, batch, jax.random.key(0))
        history.append({k: float(v) for k, v in metrics.items()})
    first, last = history[0], history[-1]
    assert first["loss/sft"] == pytest.approx(np.log(V), rel=0.1)  # near-uniform at init
    assert last["loss/sft"] < 0.25 * first["loss/sft"]
    assert last["train/accuracy"] > 0.9 > first["train/accuracy"]
    assert target_mask(batch).sum() == sum(N - i % 3 for i in range(6))
    assert all(h["train/skipped_updates"] == 0.0 and h["lr"] == pytest.approx(1e-2) for h in history)
    assert set(first) == {"loss/sft", "train/accuracy", "train/grad_norm", "train/skipped_updates", "lr"}
    assert int(state.step) == 25


def test_grad_accumulation_equals_one_pass(tiny_model, tiny_params):
    # Plain SGD: the parameter change is −lr·gradient, so equal updates mean equal gradients.
    opt = optax.sgd(1.0)
    state = create_train_state(tiny_params, opt)
    batch = sft_batch(seed=1)
    one_pass = jax.jit(make_sft_step(tiny_model, opt, SFTConfig(grad_accum_steps=1)))
    accumulated = jax.jit(make_sft_step(tiny_model, opt, SFTConfig(grad_accum_steps=2)))
    new_a, metrics_a = one_pass(state, batch, jax.random.key(0))
    new_b, metrics_b = accumulated(state, batch, jax.random.key(0))
    for name in ("loss/sft", "train/accuracy", "train/grad_norm"):
        np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=1e-5)
    delta = lambda new: jax.tree.map(jnp.subtract, new.params, tiny_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), delta(new_a), delta(new_b))
    assert float(metrics_a["train/grad_norm"]) > 0.1


def test_mixed_precision_keeps_float32_params_and_optimizer_state(tiny_model, tiny_params):
    bf16_model = LanguageModel(dataclasses.replace(tiny_model.config, dtype="bfloat16"))
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-3), 10)
    state, metrics = jax.jit(make_sft_step(bf16_model, opt, SFTConfig()))(
        create_train_state(tiny_params, opt), sft_batch(), jax.random.key(0))
    leaves = jax.tree.leaves((state.params, state.opt_state))
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert float(metrics["train/skipped_updates"]) == 0
    assert float(metrics["loss/sft"]) == pytest.approx(np.log(V), rel=0.1)

"""What the backward pass saves and how it multiplies: every ``ModelConfig.remat`` policy gives the
gradients of no policy (and the same forward, bit for bit), scanned or unrolled; the LM head's written-out
backward equals autodiff of its forward, tied or not, in float32 and bfloat16, and keeps the [tokens, V]
logits gradient in the layout it was produced in; so does every dense layer's weight gradient
(``matmul_tokens``)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.config import REMAT_POLICIES, gpt2_config, llama_config
from jaxrlhf.models.transformer import LanguageModel, head_logits, matmul_tokens, positions_from_mask
from jaxrlhf.train.model_setup import load_model
from jaxrlhf.train.run_config import ArchitectureConfig, ModelSection

CONFIGS = {
    "gpt2": gpt2_config(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=64),
    "llama-gqa": llama_config(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                              intermediate_size=48, max_position_embeddings=64),
}
WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


def _loss_and_grad(model: LanguageModel, params):
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 40, (3, 9)), jnp.int32)
    mask = jnp.ones((3, 9), jnp.int32).at[0, :3].set(0)  # one left-padded row
    weights = jnp.asarray(np.random.RandomState(1).normal(size=(3, 9, 40)), jnp.float32)

    def loss(p):
        logits, _, _ = model.apply(p, tokens, positions_from_mask(mask), mask)
        return jnp.sum(weights * jax.nn.log_softmax(logits)), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, logits, grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_every_remat_policy_gives_the_gradients_of_none(name, scan):
    cfg = dataclasses.replace(CONFIGS[name], scan_layers=scan)
    params = jax.tree.map(lambda p: 2.0 * p, LanguageModel(cfg).init(jax.random.key(0)))
    run = jax.jit(_loss_and_grad, static_argnums=0)
    base_value, base_logits, base_grads = run(LanguageModel(dataclasses.replace(cfg, remat="none")), params)
    assert float(jnp.max(jnp.abs(jax.flatten_util.ravel_pytree(base_grads)[0]))) > 1e-3  # not vacuous
    for policy in REMAT_POLICIES:
        value, logits, grads = run(LanguageModel(dataclasses.replace(cfg, remat=policy)), params)
        np.testing.assert_array_equal(logits, base_logits)  # the forward is the same program's values
        np.testing.assert_allclose(value, base_value, rtol=1e-6)
        # Recomputed activations may be fused differently: float32 rounding, relative to each leaf's scale.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                     grads, base_grads)


def test_remat_saves_less_than_autodiff():
    """The point of the default: the scanned blocks' backward keeps fewer stacked residuals."""
    cfg = CONFIGS["gpt2"]
    params = LanguageModel(cfg).init(jax.random.key(0))

    def temp_bytes(policy):
        model = LanguageModel(dataclasses.replace(cfg, remat=policy))
        compiled = jax.jit(_loss_and_grad, static_argnums=0).lower(model, params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("dots") < temp_bytes("none")
    assert temp_bytes("full") < temp_bytes("dots")


def test_an_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat must be one of none, dots, dots_no_batch, full, got 'some'"):
        dataclasses.replace(CONFIGS["gpt2"], remat="some")


def test_the_run_config_sets_the_policy(tmp_path):
    section = ModelSection(architecture=ArchitectureConfig(hidden_size=32, num_layers=2, num_heads=4),
                           tokenizer="char:abcdef", remat="full")
    loaded = load_model(section, jax.random.key(0))
    assert loaded.model.config.remat == "full"
    again = load_model(dataclasses.replace(section, remat="dots"), jax.random.key(0))
    assert again.model.config.remat == "dots"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied-table", "lm-head-kernel"])
@WITH_AND_WITHOUT_JIT
def test_head_backward_equals_autodiff_of_its_forward(dtype, vocab_major, transform):
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (3, 5, 16)).astype(dtype)
    weight = jax.random.normal(k[1], (40, 16) if vocab_major else (16, 40))
    cotangent = jax.random.normal(k[2], (3, 5, 40))

    def plain(h, w):  # the head as a plain matmul, differentiated by JAX
        kernel = (w.T if vocab_major else w).astype(h.dtype)
        return jnp.sum(cotangent * jnp.matmul(h, kernel, preferred_element_type=jnp.float32))

    def written_out(h, w):
        return jnp.sum(cotangent * head_logits(h, w, vocab_major))

    np.testing.assert_array_equal(transform(written_out)(hidden, weight), transform(plain)(hidden, weight))
    dh, dw = transform(jax.grad(written_out, (0, 1)))(hidden, weight)
    ref_dh, ref_dw = transform(jax.grad(plain, (0, 1)))(hidden, weight)
    assert dh.dtype == ref_dh.dtype == dtype and dw.dtype == ref_dw.dtype == jnp.float32
    # Same products, possibly summed in another order: float32 rounding at most.
    np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(ref_dh, np.float32),
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-6, atol=1e-5)
    # Against the gradient written by hand: dh = c·Wᵀ, dW = hᵀ·c (in float64).
    c, h = np.asarray(cotangent, np.float64), np.asarray(hidden, np.float64)
    kernel = np.asarray(weight.T if vocab_major else weight, np.float64)
    expect_dw = np.einsum("btd,btv->dv", h, c)
    low = dtype == jnp.bfloat16  # dW is rounded to bfloat16, as autodiff rounds it
    np.testing.assert_allclose(dw, expect_dw.T if vocab_major else expect_dw, rtol=1e-2 if low else 1e-5,
                               atol=1e-2 if low else 1e-5)
    tol = 0.1 if low else 1e-5
    np.testing.assert_allclose(np.asarray(dh, np.float64), c @ kernel.T, rtol=tol, atol=tol)


def _transposed_logit_gradients(fn, hidden, weight, tokens: int, vocab: int) -> list[str]:
    """Instructions of ``fn``'s optimised gradient program that write a [V, tokens] float32 array."""
    hlo = jax.jit(jax.grad(fn, (0, 1))).lower(hidden, weight).compile().as_text()
    return re.findall(rf"= f32\[{vocab},{tokens}\]\{{1,0\}} (\w+)", hlo)


def test_head_backward_does_not_transpose_the_logits_gradient():
    """Autodiff of a tied head lets XLA's CPU backend write the [tokens, V] gradient of the log-probs in a
    [V, tokens] layout for the weight gradient; the written-out backward transposes the small activations
    instead, and no [V, tokens] array is left in the program."""
    batch, length, vocab, d = 4, 64, 2048, 64
    k = jax.random.split(jax.random.key(0), 2)
    hidden, table = jax.random.normal(k[0], (batch, length, d)), jax.random.normal(k[1], (vocab, d))
    targets = jnp.arange(batch * length).reshape(batch, length) % vocab

    def nll(logits):  # as the RL losses read log-probs: a gather of the log-softmax
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))

    plain = lambda h, w: nll(jnp.matmul(h, w.T, preferred_element_type=jnp.float32))
    written_out = lambda h, w: nll(head_logits(h, w, True))
    if jax.default_backend() == "cpu":  # the layout this guards against (other backends may choose others)
        assert "fusion" in _transposed_logit_gradients(plain, hidden, table, batch * length, vocab)
    assert _transposed_logit_gradients(written_out, hidden, table, batch * length, vocab) == []


@WITH_AND_WITHOUT_JIT
def test_matmul_tokens_is_the_matmul_and_its_gradients(transform):
    k = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(k[0], (3, 7, 16)), jax.random.normal(k[1], (16, 24))
    cotangent = jax.random.normal(k[2], (3, 7, 24))
    loss = lambda x, w: jnp.sum(cotangent * matmul_tokens(x, w))
    np.testing.assert_allclose(transform(matmul_tokens)(x, w), x @ w, rtol=1e-6, atol=1e-6)
    assert transform(matmul_tokens)(x[0, 0], w).shape == (24,)  # one token: no leading axes
    dx, dw = transform(jax.grad(loss, (0, 1)))(x, w)
    c, x64, w64 = (np.asarray(a, np.float64) for a in (cotangent, x, w))
    np.testing.assert_allclose(dx, c @ w64.T, rtol=1e-5, atol=1e-5)  # dx = c·Wᵀ
    np.testing.assert_allclose(dw, np.einsum("btd,bto->do", x64, c), rtol=1e-5, atol=1e-5)  # dW = xᵀ·c


def test_dense_weight_gradient_does_not_transpose_the_cotangent():
    """Autodiff of ``x @ W`` with [B, T, din] activations contracts over two axes, and XLA's CPU backend
    writes the [B·T, dout] cotangent transposed for it (a strided copy, then Eigen packs it again: ~1.5× the
    time of a scanned MLP's backward); ``matmul_tokens`` contracts over one token axis, with no such copy."""
    batch, length, din, dout = 4, 32, 48, 80
    k = jax.random.split(jax.random.key(2), 3)
    x, w = jax.random.normal(k[0], (batch, length, din)), jax.random.normal(k[1], (din, dout))
    cotangent = jax.random.normal(k[2], (batch, length, dout))

    def transposed_cotangents(mm) -> list[str]:
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(cotangent * jnp.tanh(mm(x, w))), (0, 1)))
        hlo = grad.lower(x, w).compile().as_text()
        return re.findall(rf"= f32\[{dout},{batch * length}\]\{{1,0\}} (\w+)", hlo)

    if jax.default_backend() == "cpu":  # the layout this guards against (other backends may choose others)
        assert transposed_cotangents(lambda x, w: x @ w) != []
    assert transposed_cotangents(matmul_tokens) == []

"""``attention``'s written-out backward (test_attention.py checks values and gradients against float64 at
odd sizes): gradients by central differences of a float64 NumPy forward (independent of any gradient
formula), against autodiff of the plain softmax formula at the model's masking (a query that sees no key,
float32's min as the mask), no gradient to the mask, and bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.transformer import attention

MASKED = float(jnp.finfo(jnp.float32).min)
WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


def inputs(b=2, t=3, s=5, heads=4, kv_heads=2, hd=4, seed=0, blind_query=True):
    k = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(k[0], (b, t, heads, hd))
    keys = jax.random.normal(k[1], (b, kv_heads, hd, s))
    values = jax.random.normal(k[2], (b, kv_heads, s, hd))
    visible = jax.random.uniform(k[3], (b, t, s)) > 0.35
    visible = visible.at[:, :, 0].set(True)
    if blind_query:  # query (0, 0) sees nothing, as a left-padding position
        visible = visible.at[0, 0].set(False)
    bias = jnp.where(visible, 0.0, MASKED)
    cotangent = jax.random.normal(k[4], (b, t, heads * hd))
    return q, keys, values, bias, cotangent


def numpy_attention(q, k, v, bias):
    """float64: q [B,T,H,hd], k [B,K,hd,S], v [B,K,S,hd] → [B,T,H·hd]."""
    b, t, h, hd = q.shape
    group = h // k.shape[1]
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [B,H,hd,S], [B,H,S,hd]
    s = np.einsum("bthd,bhds->bhts", q, kk) / np.sqrt(hd) + bias[:, None]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", p, vv).reshape(b, t, h * hd)


def plain(q, k, v, bias):
    """The formula as jax autodiff sees it (the model's attention before the written-out backward)."""
    b, t, h, hd = q.shape
    qg = q.reshape(b, t, k.shape[1], h // k.shape[1], hd).transpose(0, 2, 3, 1, 4)
    s = jnp.einsum("bkgtd,bkds->bkgts", qg, k, preferred_element_type=jnp.float32) / hd**0.5
    p = jax.nn.softmax(s + bias[:, None, None], axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", p, v).reshape(b, t, h * hd)


@WITH_AND_WITHOUT_JIT
def test_values_and_gradients_match_float64_numpy(transform):
    # No blind query here: its scores are all absorbed by the mask's −3.4e38, so differences see nothing
    # move while the exact gradient (of a shift-invariant softmax) is not zero; see the test below.
    q, k, v, bias, c = inputs(blind_query=False)
    args64 = [np.asarray(a, np.float64) for a in (q, k, v, bias)]
    np.testing.assert_allclose(transform(attention)(q, k, v, bias), numpy_attention(*args64), rtol=1e-5,
                               atol=1e-5)
    grads = transform(jax.grad(lambda *a: jnp.sum(c * attention(*a, bias)), (0, 1, 2)))(q, k, v)
    c64, eps = np.asarray(c, np.float64), 1e-6
    for i, grad in enumerate(grads):  # central differences of Σ c ⊙ attention, every element
        expect = np.zeros(args64[i].shape)
        for idx in np.ndindex(*args64[i].shape):
            up, down = [a.copy() for a in args64[:3]], [a.copy() for a in args64[:3]]
            up[i][idx] += eps
            down[i][idx] -= eps
            expect[idx] = np.sum(c64 * (numpy_attention(*up, args64[3]) - numpy_attention(*down, args64[3])))
            expect[idx] /= 2 * eps
        assert np.abs(expect).max() > 1e-2  # not vacuous
        np.testing.assert_allclose(grad, expect, rtol=2e-4, atol=2e-5)


def test_gradients_equal_autodiff_of_the_softmax_formula_at_the_models_shapes():
    q, k, v, bias, c = inputs(b=4, t=16, s=16, heads=6, kv_heads=6, hd=16, seed=1)
    causal = jnp.where(jnp.tril(jnp.ones((16, 16), bool)), bias, MASKED)
    loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(c * f(*a, causal)), (0, 1, 2)))
    for got, want in zip(loss(attention)(q, k, v), loss(plain)(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_a_query_that_sees_no_key_gets_the_uniform_average_and_its_gradient():
    """A left-padding query masks every key: the softmax of equal scores is uniform, in value and in the
    backward (whose saved normaliser must not be rounded into float32's min)."""
    q, k, v, bias, c = inputs()
    out = attention(q, k, v, bias)
    np.testing.assert_allclose(out[0, 0].reshape(4, 4)[:2], jnp.broadcast_to(v[0, 0].mean(0), (2, 4)),
                               rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda *a: jnp.sum(c * attention(*a, bias)), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(c * plain(*a, bias)), (0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_gradient_flows_to_the_mask():
    q, k, v, bias, c = inputs()
    g_bias = jax.grad(lambda b: jnp.sum(c * attention(q, k, v, b)))(bias)
    assert not np.any(np.asarray(g_bias))


def test_bfloat16_keeps_its_dtypes_and_is_as_close_as_the_plain_formula():
    q, k, v, bias, c = inputs(b=2, t=8, s=8, hd=16, seed=2)
    low = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    exact = np.asarray(plain(q, k, v, bias))
    out = attention(*low, bias)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - exact).max()
    assert err <= 1.5 * np.abs(np.asarray(plain(*low, bias), np.float32) - exact).max()
    grads = jax.grad(lambda *a: jnp.sum(c * attention(*a, bias).astype(jnp.float32)), (0, 1, 2))(*low)
    want = jax.grad(lambda *a: jnp.sum(c * plain(*a, bias)), (0, 1, 2))(q, k, v)
    for g, w in zip(grads, want, strict=True):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0.05, atol=0.02 * scale)

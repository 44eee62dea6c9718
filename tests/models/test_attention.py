"""The attention core against a float64 NumPy reference, value and gradients, jitted and not, at sizes that
are not powers of two: XLA's CPU backend compiles its backward into dot–multiply–reduce library fusions,
the kind of fusion an upstream bug (jax#39103) made return wrong elements at some sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.transformer import attention


def reference(q, k, v, bias, w):
    """float64: out = softmax(q·kᵀ/√hd + bias)·v per head (GQA: head h reads kv head h // G), and the
    gradients of L = Σ out ∘ w with respect to q, k and v."""
    b, t, h, hd = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    kh = np.repeat(k, g, axis=1)  # [B, H, hd, S]
    vh = np.repeat(v, g, axis=1)  # [B, H, S, hd]
    qh = q.transpose(0, 2, 1, 3)  # [B, H, T, hd]
    s = qh @ kh / np.sqrt(hd) + bias[:, None]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ vh  # [B, H, T, hd]
    do = w.reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ do
    dp = do @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(hd)
    dq = (ds @ kh.transpose(0, 1, 3, 2)).transpose(0, 2, 1, 3)
    dk = qh.transpose(0, 1, 3, 2) @ ds  # [B, H, hd, S]
    fold = lambda x: x.reshape(b, kv_heads, g, *x.shape[2:]).sum(2)
    return out.transpose(0, 2, 1, 3).reshape(b, t, h * hd), dq, fold(dk), fold(dv)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("b,t,s,h,kv_heads,hd", [(3, 127, 129, 6, 6, 32), (2, 65, 65, 6, 2, 16)],
                         ids=["mha-odd", "gqa-odd"])
def test_attention_and_its_gradients_match_float64(jit, b, t, s, h, kv_heads, hd):
    rng = np.random.RandomState(0)
    q = rng.randn(b, t, h, hd).astype(np.float32)
    k = rng.randn(b, kv_heads, hd, s).astype(np.float32)
    v = rng.randn(b, kv_heads, s, hd).astype(np.float32)
    visible = np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)  # causal, the last t of s columns
    bias = np.where(visible[None] & (rng.rand(b, 1, s) > 0.1), 0.0, -1e9).astype(np.float32)  # 10% padding
    bias[:, np.arange(t), np.arange(t) + s - t] = 0.0  # every query sees itself
    w = rng.randn(b, t, h * hd).astype(np.float32)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, bias) * w)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
    fn = jax.jit(fn) if jit else fn
    value, grads = fn(q, k, v)
    out = np.asarray(attention(q, k, v, bias), np.float64)
    want = reference(*(x.astype(np.float64) for x in (q, k, v, bias, w)))
    np.testing.assert_allclose(out, want[0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(float(value), float(np.sum(want[0] * w)), rtol=1e-5)
    for got, ref, name in zip(grads, want[1:], ("dq", "dk", "dv")):
        scale = np.abs(ref).max()
        np.testing.assert_allclose(np.asarray(got, np.float64) / scale, ref / scale, rtol=0, atol=2e-5,
                                   err_msg=name)

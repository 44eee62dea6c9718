"""The decoder-only transformer (Flax NNX), covering GPT-2 and the Llama family.

The NNX modules below are only ever used through :class:`LanguageModel`, which splits them into a static
graph and a plain nested dict of float32 arrays (the *params* pytree) so that everything crossing a ``jit``
boundary is a pytree:

    hidden, cache = model.forward(params, tokens, positions, mask, cache)
    logits, hidden, cache = model.apply(params, tokens, positions, mask, cache)

Sequences may be left-padded: ``mask`` marks real tokens of the key/value columns and ``positions`` come
from the mask (:func:`positions_from_mask`), so a padded row computes exactly what the unpadded row would.

Layouts: q/k/v projections are fused into one ``qkv`` matrix ``[d, (H + 2·H_kv)·hd]`` and SwiGLU's gate
and up projections into one ``gate_up`` matrix ``[d, 2·f]`` (one large matmul each instead of three/two);
checkpoint I/O splits and joins them. The blocks' parameters are stacked: every leaf under
``params["layers"]`` has a leading ``num_layers`` axis (``params["layers"]["attn"]["qkv"]["kernel"]`` is
``[L, d, (H + 2·H_kv)·hd]``), so the blocks run as one ``lax.scan`` that XLA compiles once whatever the
depth (``ModelConfig.scan_layers``; the unrolled loop over the same params is kept for comparison).
:func:`unstack_layers` / :func:`stack_layers` convert to and from one subtree per layer.

The backward pass. Differentiated, the scanned blocks save per layer only what ``ModelConfig.remat`` says
(default: the matmul outputs) and recompute the elementwise work from it: autodiff's own choice stacks a
dozen [layers, B, T, ·] residual buffers, each zero-filled and written every step, which made the RL update
~1.5× slower on the CPU. The LM head's backward is written out (:func:`head_logits`) so the vocabulary-sized
gradient is never copied into a transposed layout, and so is attention's (:func:`attention`), whose forward
normalises after the value product.

Decoding is the exception. In a rolled layer loop every weight and KV-cache read is a dynamic slice of a
stack, and XLA (CPU, and GPU without dynamic-slice fusion) copies such a slice into a buffer of its own
before a matmul reads it: a decode step, which should read each weight and cache byte once, would copy them
all. A generation loop therefore takes :meth:`LanguageModel.decode_params` (weights cast to the compute
dtype once and split into one buffer per layer) and a cache of one buffer per layer
(:meth:`LanguageModel.prefill` builds it), and runs the blocks unrolled over them; each step writes one
column per layer in place and copies nothing (``jaxrlhf.rollout.loop_copies`` checks this in the compiled
program). ``ModelConfig.scan_decode`` scans there too: flat compile time, at the price of those copies.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.collective_order import needs_sequencing
from jaxrlhf.models.config import ModelConfig, rope_inverse_frequencies
from jaxrlhf.models.lora import Slot, has_lora, is_lora_leaf_name, projection_slots

Params = dict[str, Any]
_MASKED = float(jnp.finfo(jnp.float32).min)
_INIT_STD = 0.02


class KVCache(NamedTuple):
    """Preallocated keys ``[batch, kv_heads, head_dim, max_len]`` (transposed, see :func:`attention`) and
    values ``[batch, kv_heads, max_len, head_dim]`` of every layer: one array each with a leading
    ``num_layers`` axis when the blocks are scanned, a tuple of one array per layer when they are unrolled
    (:meth:`LanguageModel.init_cache` picks the layout).

    ``index`` is the number of columns already written; all rows share it, which is what left padding buys.
    """

    keys: jax.Array | tuple[jax.Array, ...]
    values: jax.Array | tuple[jax.Array, ...]
    index: jax.Array


class LayerCache(NamedTuple):
    """One layer's view of a :class:`KVCache`: the whole key/value buffers, the layer's index along their
    leading axis (None for a per-layer buffer) and the first column to write."""

    keys: jax.Array
    values: jax.Array
    layer: jax.Array | int | None
    index: jax.Array

    def write_and_read(self, k: jax.Array, v: jax.Array) -> tuple[LayerCache, jax.Array, jax.Array]:
        """Write the new columns k [B, K, hd, T] / v [B, K, T, hd] in place; return the updated cache and
        this layer's full keys [B, K, hd, S] and values [B, K, S, hd]."""
        keys, values, layer, index = self
        if layer is None:
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, 0, 0, index))
            values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, 0, index, 0))
            return self._replace(keys=keys, values=values), keys, values
        # Only the T new columns are written into the stacked buffer (an in-place dynamic-update-slice of
        # the loop-carried cache), never a whole layer's slice.
        keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), (layer, 0, 0, 0, index))
        values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), (layer, 0, 0, index, 0))
        read_k = jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False)
        read_v = jax.lax.dynamic_index_in_dim(values, layer, keepdims=False)
        return self._replace(keys=keys, values=values), read_k, read_v


class FreshKV(NamedTuple):
    """Stands in for a layer's cache in a pass without one (a prefill) and hands back the layer's new keys
    [B, K, hd, T] and values [B, K, T, hd], from which the caller builds a cache of any length."""

    keys: jax.Array | None = None
    values: jax.Array | None = None

    def write_and_read(self, k: jax.Array, v: jax.Array) -> tuple[FreshKV, jax.Array, jax.Array]:
        return FreshKV(k, v), k, v


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids of a left-padded batch: ``cumsum(mask) − 1``, clipped at 0 on the padding. [B, T]."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# ----------------------------------------------------------------------------------------------- modules


def matmul_tokens(x: jax.Array, w: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    """``x · w`` for activations ``x`` [..., din] and a weight ``w`` [din, dout], as one 2-D matmul over the
    flattened tokens.

    Same values as ``x @ w``; the reshape is for the backward pass: the weight gradient ``xᵀ·g`` then
    contracts over one token axis. With [B, T, din] activations it contracts over two, and XLA's CPU
    backend canonicalises that dot by copying the [B·T, dout] cotangent transposed and handing it to
    Eigen, whose packing of the strided operand made a scanned MLP stack's forward + backward at the PPO
    benchmark's shape 1.4–1.9× slower and the whole update ~1.2×
    (benchmarks/results/ppo_iteration_matmul_tokens_cpu2.json).
    """
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), w, preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:-1], w.shape[-1])


class Dense(nnx.Module):
    """``y = x·W + b`` with float32 master weights; the matmul runs in the input's dtype."""

    def __init__(self, din: int, dout: int, *, use_bias: bool, rngs: nnx.Rngs, std: float = _INIT_STD):
        init = jax.nn.initializers.normal(std) if std > 0 else jax.nn.initializers.zeros
        self.kernel = nnx.Param(init(rngs.params(), (din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul_tokens(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class LoRADense(Dense):
    """:class:`Dense` plus low-rank terms on some of its output slots (``jaxrlhf.models.lora``):
    ``y[..., slot] = x·W[:, slot] (+ b) + scale·(x·A_slot)·B_slot``. The sum W + scale·A·B is never formed."""

    def __init__(self, din: int, dout: int, *, use_bias: bool, slots: tuple[Slot, ...],
                 adapted: tuple[str, ...], rank: int, scale: float, rngs: nnx.Rngs):
        super().__init__(din, dout, use_bias=use_bias, rngs=rngs)
        self.slots, self.scale = slots, scale
        for target in adapted:
            width = next(s.width for s in slots if s.target == target)
            setattr(self, f"lora_{target}_a", nnx.Param(jnp.zeros((din, rank), jnp.float32)))
            setattr(self, f"lora_{target}_b", nnx.Param(jnp.zeros((rank, width), jnp.float32)))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        parts = []
        for slot in self.slots:
            part = y if len(self.slots) == 1 else y[..., slot.offset: slot.offset + slot.width]
            a = getattr(self, f"lora_{slot.target}_a", None)
            if a is not None:
                b = getattr(self, f"lora_{slot.target}_b")
                part = part + self.scale * matmul_tokens(matmul_tokens(x, a[...].astype(x.dtype)),
                                                         b[...].astype(x.dtype))
            parts.append(part)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32."""

    def __init__(self, dim: int, kind: str, eps: float):
        self.kind, self.eps = kind, eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if kind == "layernorm" else None

    @jax.named_scope("norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        if self.kind == "layernorm":
            h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        if self.kind == "layernorm":
            return (h * self.scale[...] + self.bias[...]).astype(x.dtype)
        # Llama casts the normalised activations back before the (float32) scale multiplies them.
        return (self.scale[...] * h.astype(x.dtype)).astype(x.dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in the half-split layout: ``x·cos + rotate_half(x)·sin``; cos/sin are [B, T, hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Grouped-query attention ``softmax(q·kᵀ/√hd + bias)·v`` with the softmax in float32.

    q: [B, T, H, hd]; k: [B, H_kv, hd, S]; v: [B, H_kv, S, hd]; bias: [B, T, S] additive mask (no gradient
    flows to it). Returns [B, T, H·hd]. Keys are stored transposed so both products are plain row-major
    matmuls: a decode step then reads the KV cache in place instead of transposing it every step.

    The softmax is normalised after the value product, o = (e·v) / l with e = exp(s − max s) and l = Σ e:
    the division then runs over [T, hd] instead of [T, S], and the [T, S] probabilities are never written
    (a forward at T = S = 128 on the CPU: 5.5–6.3 ms per layer instead of 8.4–9.1). The backward is written
    out (:func:`_attention_bwd`).
    """
    return _attention_fwd(q, k, v, bias)[0]


def _grouped(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, hd] → [B, K, G, T, hd] (G = H / K query heads per key/value head)."""
    b, t, h, hd = x.shape
    return x.reshape(b, t, kv_heads, h // kv_heads, hd).transpose(0, 2, 3, 1, 4)


def _scores(qg: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    """s = q·kᵀ/√hd + bias in float32: [B, K, G, T, S]."""
    s = jnp.einsum("bkgtd,bkds->bkgts", qg, k, preferred_element_type=jnp.float32)
    return s * (1.0 / qg.shape[-1] ** 0.5) + bias[:, None, None, :, :]


def _attention_fwd(q, k, v, bias):
    b, t, h, hd = q.shape
    with jax.named_scope("attention"):  # a region of jaxrlhf.op_profile
        qg = _grouped(q, k.shape[1])
        s = _scores(qg, k, bias)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        total = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bkgts,bksd->bkgtd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
        out = (o / total).astype(v.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)
        # The backward reads e and Σe rather than recomputing the scores (one matmul and an exp fewer).
        # The mask gets no gradient (None below), so it is not kept.
        return out, (q, k, v, out, e, total)


def _attention_bwd(residuals, g):
    """With p = e / Σe from the forward's saved e = exp(s − max s) and Σe, and D = Σ_d g·o per query
    (= Σ_s p·∂L/∂p): ∂L/∂v = pᵀ·g, ∂L/∂s = p ⊙ (g·vᵀ − D), ∂L/∂q = ∂L/∂s·k/√hd, ∂L/∂k = ∂L/∂sᵀ·q/√hd.
    D replaces autodiff's row sum over the keys by one over the head dimension."""
    q, k, v, out, e, total = residuals
    b, t, h, hd = q.shape
    kv_heads = k.shape[1]
    with jax.named_scope("attention"):
        qg, gg, og = (_grouped(x.reshape(b, t, h, hd), kv_heads) for x in (q, g, out))
        p = e * (1.0 / total)
        dv = jnp.einsum("bkgts,bkgtd->bksd", p.astype(v.dtype), gg, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgtd,bksd->bkgts", gg, v, preferred_element_type=jnp.float32)
        d = jnp.sum(gg.astype(jnp.float32) * og.astype(jnp.float32), axis=-1, keepdims=True)
        ds = (p * (dp - d) * (1.0 / hd**0.5)).astype(q.dtype)
        dq = jnp.einsum("bkgts,bkds->bkgtd", ds, k, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgts,bkgtd->bkds", ds, qg, preferred_element_type=jnp.float32)
        dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.qkv = Dense(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, use_bias=cfg.qkv_bias, rngs=rngs)
        self.out = Dense(cfg.q_size, cfg.hidden_size, use_bias=cfg.attn_out_bias, rngs=rngs)

    def __call__(self, x, rope, bias, layer_cache: LayerCache | FreshKV | None):
        cfg = self.cfg
        b, t, _ = x.shape
        with jax.named_scope("attn_proj"):
            qkv = self.qkv(x)
            q = qkv[..., : cfg.q_size].reshape(b, t, cfg.num_heads, cfg.head_dim)
            k = qkv[..., cfg.q_size : cfg.q_size + cfg.kv_size].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[..., cfg.q_size + cfg.kv_size :].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            if rope is not None:
                q, k = _rotate(q, *rope), _rotate(k, *rope)
            k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, K, hd, T], [B, K, T, hd]
        if layer_cache is not None:
            with jax.named_scope("kv_cache"):
                layer_cache, k, v = layer_cache.write_and_read(k, v)
        y = attention(q, k.astype(q.dtype), v.astype(q.dtype), bias)
        with jax.named_scope("attn_proj"):
            return self.out(y), layer_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind = cfg.mlp
        width = 2 * cfg.intermediate_size if cfg.mlp == "swiglu" else cfg.intermediate_size
        name = "gate_up" if cfg.mlp == "swiglu" else "up"
        setattr(self, name, Dense(cfg.hidden_size, width, use_bias=cfg.mlp_bias, rngs=rngs))
        self.down = Dense(cfg.intermediate_size, cfg.hidden_size, use_bias=cfg.mlp_bias, rngs=rngs)

    @jax.named_scope("mlp")
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
            return self.down(jax.nn.silu(gate) * up)
        return self.down(jax.nn.gelu(self.up(x), approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope, bias, layer_cache: LayerCache | FreshKV | None):
        a, layer_cache = self.attn(self.attn_norm(x), rope, bias, layer_cache)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), layer_cache


class Transformer(nnx.Module):
    """Token (and learned position) embeddings, ``num_layers`` pre-norm blocks, a final norm, an LM head.

    ``layers`` is one :class:`Block` whose parameters carry a leading ``num_layers`` axis.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(
            jax.nn.initializers.normal(_INIT_STD)(
                rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32
            )
        )
        if cfg.position_encoding == "learned":
            self.pos_embed = nnx.Param(
                jax.nn.initializers.normal(0.01)(
                    rngs.params(), (cfg.max_position_embeddings, cfg.hidden_size), jnp.float32
                )
            )
        # Built one by one from the same key stream as separate blocks would be, then stacked.
        blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]
        graphdef = nnx.graphdef(blocks[0])
        self.layers = nnx.merge(
            graphdef, jax.tree.map(lambda *ws: jnp.stack(ws), *[nnx.state(b) for b in blocks])
        )
        self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens, positions, mask, cache: KVCache | None, layers: Any = None,
                 collect_kv: bool = False, lora_alpha: float | None = None):
        """``layers``: the blocks' params, stacked (default: this module's) or a tuple of per-layer trees;
        with LoRA adapter leaves, the blocks add their low-rank terms at scale ``lora_alpha / rank``.
        ``collect_kv`` (without a cache): return every layer's keys and values in place of the cache, stacked
        when the blocks are scanned, as tuples when unrolled."""
        cfg = self.cfg
        check_positions(cfg, mask.shape[1], "LanguageModel.apply")
        dtype = jnp.dtype(cfg.dtype)
        with jax.named_scope("embed"):
            x = jnp.take(self.embed[...], tokens, axis=0)
            if cfg.position_encoding == "learned":
                x = x + jnp.take(self.pos_embed[...], positions, axis=0)
            x = x.astype(dtype)
        rope = _rope_tables(cfg, positions) if cfg.position_encoding == "rope" else None
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        bias = _attention_bias(cfg, mask, tokens.shape[1], index)
        if layers is None:
            layers = nnx.to_pure_dict(nnx.state(self.layers))
        kv = None if cache is None else (cache.keys, cache.values)
        collect = collect_kv and cache is None
        if isinstance(layers, (tuple, list)) or not cfg.scan_layers:
            x, kv = _unrolled_blocks(cfg, layers, x, rope, bias, kv, index, collect, lora_alpha)
        else:
            x, kv = _scanned_blocks(cfg, layers, x, rope, bias, kv, index, collect, lora_alpha)
        hidden = self.final_norm(x)
        if collect:
            return hidden, kv
        if cache is not None:
            cache = KVCache(kv[0], kv[1], cache.index + tokens.shape[1])
        return hidden, cache

    @jax.named_scope("lm_head")
    def logits(self, hidden: jax.Array) -> jax.Array:
        # Inputs in the compute dtype, accumulation and output in float32: bfloat16 logits would quantise
        # every log-prob by ~1e-2, enough to move the PPO ratio off 1 whenever two passes round differently.
        if self.cfg.tie_word_embeddings:
            return head_logits(hidden, self.embed[...], True)
        return head_logits(hidden, self.lm_head.kernel[...], False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_logits(hidden: jax.Array, weight: jax.Array, vocab_major: bool) -> jax.Array:
    """LM-head logits ``hidden · W`` with the inputs in ``hidden``'s dtype and float32 accumulation and
    output: [..., d] → [..., V]. ``weight`` is [V, d] (``vocab_major``: a tied embedding table, used
    transposed) or [d, V] (an LM-head kernel).

    The backward pass is written out for one reason: the weight gradient gᵀ·h (or hᵀ·g) contracts over
    the tokens, and left to itself XLA's CPU backend lays out the [tokens, V] logits gradient transposed
    for it, a strided copy of the largest tensor of the step (~10% of a small model's update). Here it is
    always computed as hᵀ·g, transposing the [tokens, d] activations instead, then the [d, V] result.
    """
    kernel = weight.astype(hidden.dtype)
    return jnp.matmul(hidden, kernel.T if vocab_major else kernel, preferred_element_type=jnp.float32)


def _head_logits_fwd(hidden, weight, vocab_major):
    return head_logits(hidden, weight, vocab_major), (hidden, weight)


@jax.named_scope("lm_head")
def _head_logits_bwd(vocab_major, residuals, g):
    hidden, weight = residuals
    kernel = weight.astype(hidden.dtype)
    h, g = hidden.reshape(-1, hidden.shape[-1]), g.reshape(-1, g.shape[-1])
    # As autodiff of the forward would: the float32 cotangent times the compute-dtype operands, float32
    # accumulation, each gradient rounded through the dtype its input was used in.
    # dh = g·Wᵀ (W the [d, V] kernel); dW = hᵀ·g, transposed to [V, d] for a table.
    dh = jax.lax.dot_general(g, kernel, (((1,), (0 if vocab_major else 1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(h, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dw = (dw.T if vocab_major else dw).astype(kernel.dtype).astype(weight.dtype)
    return dh.astype(hidden.dtype).reshape(hidden.shape), dw


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def check_positions(cfg: ModelConfig, length: int, where: str) -> None:
    """Raise (at trace time) when ``length`` columns need more rows than a learned position table has:
    ``jnp.take`` would read past the table and return NaN."""
    if cfg.position_encoding == "learned" and length > cfg.max_position_embeddings:
        raise ValueError(
            f"{where}: sequence length {length} exceeds the model's learned position table "
            f"(max_position_embeddings={cfg.max_position_embeddings})"
        )


@functools.lru_cache(maxsize=64)
def _block_graph(cfg: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))


LoRASpec = tuple[tuple[tuple[str, str], tuple[str, ...], int], ...]  # ((module, dense), targets, rank)


@functools.lru_cache(maxsize=64)
def _lora_block_graph(cfg: ModelConfig, spec: LoRASpec, alpha: float):
    """The graph of a :class:`Block` whose adapted projections are :class:`LoRADense`."""

    def build() -> Block:
        block = Block(cfg, nnx.Rngs(0))
        for (module, dense), adapted, rank in spec:
            parent = getattr(block, module)
            old = getattr(parent, dense)
            din, dout = old.kernel.shape
            slots = projection_slots(cfg)[(module, dense)]
            if adapted == ("qkv",):
                slots = (Slot("qkv", 0, dout),)
            lora = LoRADense(din, dout, use_bias=old.bias is not None, slots=slots, adapted=adapted,
                             rank=rank, scale=alpha / rank, rngs=nnx.Rngs(0))
            setattr(parent, dense, lora)
        return block

    return nnx.split(nnx.eval_shape(build))


def _lora_spec(layer_params: Params) -> LoRASpec:
    spec = []
    for module in ("attn", "mlp"):
        for dense, leaves in layer_params[module].items():
            adapted = tuple(k[len("lora_"):-2] for k in leaves if is_lora_leaf_name(k) and k.endswith("_a"))
            if adapted:
                spec.append(((module, dense), adapted, int(leaves[f"lora_{adapted[0]}_a"].shape[-1])))
    return tuple(spec)


def _block(cfg: ModelConfig, layer_params: Params, lora_alpha: float | None = None) -> Block:
    """A :class:`Block` holding one layer's params (a pure dict without the layer axis), adapters
    included (then at scale ``lora_alpha / rank``)."""
    if has_lora(layer_params):
        if lora_alpha is None:
            raise ValueError("the params hold LoRA adapters but the model has no lora_alpha "
                             "(LanguageModel(config, lora_alpha=α))")
        graphdef, abstract = _lora_block_graph(cfg, _lora_spec(layer_params), float(lora_alpha))
    else:
        graphdef, abstract = _block_graph(cfg)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, layer_params)
    return nnx.merge(graphdef, state)


def _remat(cfg: ModelConfig, fn, in_scan: bool = False):
    """``fn`` under ``cfg.remat``'s ``jax.checkpoint`` policy (see :class:`ModelConfig`); it only changes
    what a backward pass saves or recomputes. Inside a scan CSE cannot merge the recomputation into the
    forward, so ``prevent_cse`` (which would add optimisation barriers) is off there.

    Not on a CPU backend with several processes (``collective_order.needs_sequencing``): there XLA's CPU
    runtime may run a loop body's independent collectives in a different order on each device, and the
    recomputed forward adds such collectives (the FSDP all-gathers) beside the gradients' own inside the
    backward scan; two-process CPU runs then read mismatched messages (non-finite gradients,
    tests/parallel/test_multihost.py). Accelerators order collectives per device stream.
    """
    policy = {
        "none": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "full": jax.checkpoint_policies.nothing_saveable,
    }[cfg.remat]
    if policy is None or needs_sequencing():
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=not in_scan)


def _scanned_blocks(cfg: ModelConfig, layers: Params, x, rope, bias, kv, index, collect: bool = False,
                    lora_alpha: float | None = None):
    """The blocks as one ``lax.scan`` over the stacked params: XLA compiles a single block.

    The stacked cache is part of the scan's carry, not its inputs/outputs: each layer writes its new
    columns into the carried buffers with a dynamic-update-slice (in place) and reads its own slice. As
    scanned inputs and outputs instead, the whole cache would be copied into a fresh output buffer every
    call, i.e. every decode step. ``collect``: no cache; each layer's new keys/values are the scan's
    outputs (stacked), returned in place of the cache.
    """

    def body(carry, xs):
        x, kv = carry
        layer_params, i = xs
        layer_cache = FreshKV() if collect else None if kv is None else LayerCache(kv[0], kv[1], i, index)
        x, layer_cache = _block(cfg, layer_params, lora_alpha)(x, rope, bias, layer_cache)
        if collect:
            return (x, None), (layer_cache.keys, layer_cache.values)
        return (x, None if kv is None else (layer_cache.keys, layer_cache.values)), None

    (x, kv), fresh = jax.lax.scan(_remat(cfg, body, in_scan=True), (x, kv),
                                  (layers, jnp.arange(cfg.num_layers)))
    return x, fresh if collect else kv


def _unrolled_blocks(cfg: ModelConfig, layers: Params | tuple, x, rope, bias, kv, index,
                     collect: bool = False, lora_alpha: float | None = None):
    """The blocks as a Python loop (one copy of the block per layer in the program)."""
    stacked_cache = kv is not None and not isinstance(kv[0], (tuple, list))
    keys, values = ([], []) if kv is None or stacked_cache else (list(kv[0]), list(kv[1]))
    if collect:
        keys, values = [None] * cfg.num_layers, [None] * cfg.num_layers
    for i in range(cfg.num_layers):
        if isinstance(layers, (tuple, list)):
            layer_params = layers[i]
        else:
            layer_params = jax.tree.map(lambda w, i=i: w[i], layers)
        if collect:
            layer_cache = FreshKV()
        elif kv is None:  # no cache: a pass that may be differentiated, under the remat policy
            x = _remat(cfg, lambda p, x: _block(cfg, p, lora_alpha)(x, rope, bias, None)[0])(layer_params, x)
            continue
        elif stacked_cache:
            layer_cache = LayerCache(kv[0], kv[1], i, index)
        else:
            layer_cache = LayerCache(keys[i], values[i], None, index)
        x, layer_cache = _block(cfg, layer_params, lora_alpha)(x, rope, bias, layer_cache)
        if layer_cache is None:
            continue
        if stacked_cache:
            kv = (layer_cache.keys, layer_cache.values)
        else:
            keys[i], values[i] = layer_cache.keys, layer_cache.values
    if (kv is None or stacked_cache) and not collect:
        return x, kv
    return x, (tuple(keys), tuple(values))


def _rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv = jnp.asarray(rope_inverse_frequencies(cfg), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, hd/2]
    return jnp.cos(angles), jnp.sin(angles)


def _attention_bias(cfg: ModelConfig, mask: jax.Array, num_queries: int, index: jax.Array) -> jax.Array:
    """Additive mask [B, T, S]: key s is visible to query t when it is real, not in the future (by column,
    which is causal order under left padding) and, with a sliding window, within the window."""
    q_cols = index + jnp.arange(num_queries)[:, None]
    k_cols = jnp.arange(mask.shape[1])[None, :]
    visible = (k_cols <= q_cols)[None] & (mask[:, None, :] > 0)
    if cfg.sliding_window is not None:
        visible &= (q_cols - k_cols < cfg.sliding_window)[None]
    return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)


# ----------------------------------------------------------------------------------------- functional API


@functools.lru_cache(maxsize=64)
def _graph(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return nnx.split(abstract)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _layers_apart(layers: Any) -> bool:
    """Whether the blocks' params go to each call rather than into the bound module: per-layer trees
    (:meth:`LanguageModel.decode_params`) or stacked params carrying LoRA adapters."""
    return isinstance(layers, (tuple, list)) or has_lora(layers)


def unstack_layers(params: Params) -> Params:
    """``params`` with ``params["layers"]`` split into ``{0: layer-0 tree, 1: …}`` (the per-layer layout
    of checkpoints and of older params); numpy or jax arrays."""
    layers = params["layers"]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    per_layer = {i: jax.tree.map(lambda w, i=i: w[i], layers) for i in range(num_layers)}
    return {**params, "layers": per_layer}


def stack_layers(params: Params) -> Params:
    """Inverse of :func:`unstack_layers`: ``{0: tree, 1: …}`` under ``"layers"`` → one stacked tree."""
    layers = params["layers"]
    order = sorted(layers, key=int)
    stack = np.stack if all(isinstance(w, np.ndarray) for w in jax.tree.leaves(layers)) else jnp.stack
    return {**params, "layers": jax.tree.map(lambda *ws: stack(ws), *[layers[i] for i in order])}


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A transformer used functionally. Hashable, so it can be a static argument of ``jax.jit``.

    ``lora_alpha``: the α of LoRA adapters the params may hold (``jaxrlhf.models.lora``); params without
    adapters run the plain model whatever it is.
    """

    config: ModelConfig
    lora_alpha: float | None = None

    def init(self, key: jax.Array) -> Params:
        """Random float32 parameters (normal(0.02) weights, zero biases, unit norm scales)."""
        module = Transformer(self.config, nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.split(module)[1])

    def abstract_params(self) -> Params:
        """Shapes and dtypes of the params pytree (``jax.ShapeDtypeStruct`` leaves), without allocating."""
        return nnx.to_pure_dict(_graph(self.config)[1])

    def cast_params(self, params: Params) -> Params:
        """Floating-point params in the compute dtype (a no-op in float32). A loop that calls the model
        many times (decoding) casts once before the loop instead of once per call."""
        dtype = jnp.dtype(self.config.dtype)
        return jax.tree.map(lambda p: p.astype(dtype) if _is_float(p) and p.dtype != dtype else p, params)

    def decode_params(self, params: Params) -> Params:
        """The params a decode loop should close over: cast to the compute dtype once and, unless
        ``config.scan_decode``, split into one buffer per layer (``params["layers"]`` a tuple), so that no
        step slices (copies) a layer out of the stack."""
        params = self.cast_params(params)
        if not self.config.scan_decode:
            per_layer = unstack_layers(params)["layers"]
            params = {**params, "layers": tuple(per_layer[i] for i in range(self.config.num_layers))}
        return params

    def decode_cache(self, cache: KVCache) -> KVCache:
        """The cache in the layout of :meth:`decode_params`' forward: one buffer per layer unless
        ``config.scan_decode`` (a copy of a stacked cache, made once, e.g. after the prefill)."""
        if self.config.scan_decode or isinstance(cache.keys, (tuple, list)):
            return cache
        split = lambda x: tuple(x[i] for i in range(self.config.num_layers))
        return KVCache(split(cache.keys), split(cache.values), cache.index)

    def bind(self, params: Params) -> Transformer:
        """The NNX module holding ``params`` (cast to the compute dtype). Use inside a traced function.

        ``params["layers"]`` may be a tuple of per-layer trees (:meth:`decode_params`); the module's
        stacked layers are then left abstract and the tuple is passed to each call by :meth:`forward`.
        """
        graphdef, abstract = _graph(self.config)
        state = jax.tree.map(lambda x: x, abstract)
        params = self.cast_params(params)
        if _layers_apart(params["layers"]):
            params = {k: v for k, v in params.items() if k != "layers"}
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    def forward(
        self,
        params: Params,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, d] and the updated cache.

        tokens, positions: [B, T] int32. mask: [B, S] with S = T without a cache, S = cache length with one.
        Raises ValueError when S exceeds a learned position table.
        """
        return self._call(params, tokens, positions, mask, cache)[1:]

    def _call(self, params, tokens, positions, mask, cache):
        module = self.bind(params)
        layers = params["layers"]
        layers = self.cast_params(layers) if _layers_apart(layers) else None
        hidden, cache = module(tokens, positions, mask, cache, layers, lora_alpha=self.lora_alpha)
        return module, hidden, cache

    def prefill(
        self, params: Params, tokens: jax.Array, positions: jax.Array, mask: jax.Array, length: int
    ) -> tuple[jax.Array, KVCache]:
        """A cacheless pass over the prompts [B, P] (``mask`` [B, P]) that returns the hidden states and a
        cache of ``length`` ≥ P columns holding the prompt's keys and values, index P, already in the
        layout a decode loop carries (:meth:`decode_cache`).

        The same numbers as :meth:`forward` over :meth:`init_cache`, without its costs: the attention reads
        the P prompt columns rather than ``length``, no scanned layer reads its slice of a stacked cache, and
        each layer's buffer is written once (the prompt and zero columns) instead of zero-filled, updated and
        then split per layer.
        """
        cfg = self.config
        prompt_len = tokens.shape[1]
        if length < prompt_len:
            raise ValueError(f"LanguageModel.prefill: cache length {length} < prompt length {prompt_len}")
        check_positions(cfg, length, "LanguageModel.prefill")
        module = self.bind(params)
        layers = params["layers"]
        layers = self.cast_params(layers) if _layers_apart(layers) else None
        hidden, (keys, values) = module(tokens, positions, mask, None, layers, collect_kv=True,
                                        lora_alpha=self.lora_alpha)
        dtype = jnp.dtype(cfg.dtype)
        extra = length - prompt_len
        pad_k = lambda k: jnp.pad(k.astype(dtype), [(0, 0)] * (k.ndim - 1) + [(0, extra)])
        pad_v = lambda v: jnp.pad(v.astype(dtype), [(0, 0)] * (v.ndim - 2) + [(0, extra), (0, 0)])
        if cfg.scan_decode:
            keys, values = (jnp.stack(x) if isinstance(x, tuple) else x for x in (keys, values))
            keys, values = pad_k(keys), pad_v(values)
        else:
            split = lambda x: tuple(x) if isinstance(x, tuple) else tuple(x[i] for i in range(cfg.num_layers))
            keys, values = tuple(map(pad_k, split(keys))), tuple(map(pad_v, split(values)))
        return hidden, KVCache(keys, values, jnp.asarray(prompt_len, jnp.int32))

    def logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        """LM-head logits in float32, [..., vocab]."""
        return self.bind(params).logits(hidden)

    def apply(
        self,
        params: Params,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, jax.Array, KVCache | None]:
        """``(logits [B,T,V] float32, hidden [B,T,d], cache)``."""
        module, hidden, cache = self._call(params, tokens, positions, mask, cache)
        return module.logits(hidden), hidden, cache

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> KVCache:
        """An empty cache of ``length`` columns (prompt + new tokens), in the compute dtype by default:
        stacked ``[L, …]`` buffers when the blocks are scanned, one buffer per layer when unrolled."""
        cfg = self.config
        dtype = jnp.dtype(dtype or cfg.dtype)
        k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, length)
        v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        if cfg.scan_layers:
            stacked = lambda shape: jnp.zeros((cfg.num_layers, *shape), dtype)
            return KVCache(stacked(k_shape), stacked(v_shape), jnp.zeros((), jnp.int32))
        return KVCache(
            tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),
            tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)),
            jnp.zeros((), jnp.int32),
        )

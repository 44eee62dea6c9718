"""Architecture description of the one decoder-only transformer, and its mapping to Hugging Face configs.

GPT-2 and the Llama family (Llama 2/3, Mistral, Qwen2/2.5, SmolLM, TinyLlama) differ only in a handful of
switches: position encoding (learned vs RoPE), normalisation (LayerNorm vs RMSNorm), MLP (GELU vs SwiGLU),
projection biases, head grouping and embedding tying. ``ModelConfig`` names those switches explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")


# ModelConfig.remat's choices.
REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")


class UnsupportedModelError(ValueError):
    """A Hugging Face config describes an architecture or option this model does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind``: "linear" (positions ÷ factor) or "llama3" (per-band rescaling)."""

    kind: Literal["linear", "llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer. Frozen and hashable: a valid static jit argument."""

    model_type: Literal["gpt2", "llama", "mistral", "qwen2"] = "gpt2"
    vocab_size: int = 8192
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 6
    head_dim: int = 64
    intermediate_size: int = 1536
    max_position_embeddings: int = 1024
    position_encoding: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Further end-of-sequence ids, when the Hugging Face config lists several (Llama 3 Instruct: end of text,
    # end of message, end of turn); ``eos_token_id`` is the first.
    extra_eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Compute dtype; parameters are always stored in float32 (master weights).
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Run the blocks as one lax.scan (compiled once, whatever the depth) rather than unrolled. Either way the
    # params pytree is the same (stacked along a leading layer axis); only the program differs.
    scan_layers: bool = True
    # Decode steps (one token per call, inside generation's while_loop) run the blocks unrolled over one
    # buffer per layer unless this is set: a rolled loop must slice each layer's weights and KV cache out
    # of the stacks every step, and XLA's CPU and GPU matmuls copy such a slice before reading it.
    scan_decode: bool = False
    # What a block's backward pass keeps from its forward (a jax.checkpoint policy; the forward's values are
    # the same whichever). "dots": every matmul output (projections and attention products), so the
    # backward recomputes only the elementwise work (norms, GELU/SiLU, softmax) from them; "dots_no_batch":
    # the projections' outputs only (attention recomputed: less memory at long context); "full": nothing
    # but the block's input (a whole extra forward); "none": whatever autodiff saves. Measured on the RL
    # update (benchmarks/ppo_iteration.py): "dots" is the fastest there, ~1.3-2x "none", whose many stacked
    # elementwise residuals cost more memory traffic than recomputing them. Multi-process CPU runs keep
    # "none" whatever is set (jaxrlhf.models.transformer._remat says why).
    remat: Literal["none", "dots", "dots_no_batch", "full"] = "dots"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        # A list from a YAML or JSON file would make the frozen config unhashable.
        object.__setattr__(self, "extra_eos_token_ids", tuple(int(i) for i in self.extra_eos_token_ids))
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id: ``eos_token_id`` then ``extra_eos_token_ids`` (empty without one)."""
        first = () if self.eos_token_id is None else (self.eos_token_id,)
        return first + tuple(i for i in self.extra_eos_token_ids if i != self.eos_token_id)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self, include_embeddings: bool = True) -> int:
        """Number of parameters (the LM head counted once when tied)."""
        d, f = self.hidden_size, self.intermediate_size
        norm = 2 * d if self.norm == "layernorm" else d
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.attn_out_bias
        mlp = (3 if self.mlp == "swiglu" else 2) * d * f
        mlp += ((2 * f if self.mlp == "swiglu" else f) + d) * self.mlp_bias
        total = self.num_layers * (attn + mlp + 2 * norm) + norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
            if self.position_encoding == "learned":
                total += self.max_position_embeddings * d
        return total


def _preset(family: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    """``family``'s switches, then ``overrides``; head_dim and num_kv_heads follow the (overridden) shape."""
    base = {**family, **overrides}
    base.setdefault("head_dim", base.get("hidden_size", 384) // base.get("num_heads", 6))
    base.setdefault("num_kv_heads", base.get("num_heads", 6))
    return ModelConfig(**base)


def gpt2_config(**overrides: Any) -> ModelConfig:
    """A GPT-2-style config (learned positions, LayerNorm, GELU, biases, tied embeddings, MLP 4·d)."""
    family = dict(model_type="gpt2", position_encoding="learned", norm="layernorm", mlp="gelu", qkv_bias=True,
                  attn_out_bias=True, mlp_bias=True, tie_word_embeddings=True, norm_eps=1e-5)
    family["intermediate_size"] = 4 * overrides.get("hidden_size", 384)
    return _preset(family, overrides)


def llama_config(**overrides: Any) -> ModelConfig:
    """A Llama-style config (RoPE, RMSNorm, SwiGLU, no biases, untied embeddings by default)."""
    family = dict(model_type="llama", position_encoding="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False,
                  attn_out_bias=False, mlp_bias=False, tie_word_embeddings=False, norm_eps=1e-6)
    return _preset(family, overrides)


# --------------------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise UnsupportedModelError(f"{source}: config.json has no {key!r}")
    return hf[key]


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def eos_ids(value: Any, where: str) -> tuple[int, ...]:
    """A Hugging Face ``eos_token_id`` (None, an id or a list of ids) as a tuple of distinct ids, in order."""
    values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UnsupportedModelError(f"{where}: {value!r} is not a token id or a list of token ids")
        if v not in out:
            out.append(v)
    return tuple(out)


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`ModelConfig`.

    Raises :class:`UnsupportedModelError` naming the option for anything this model would compute
    differently, and naming ``source`` for sizes that do not fit together (e.g. heads not a multiple of the
    kv heads).
    """

    def build(**fields: Any) -> ModelConfig:
        try:
            return ModelConfig(**fields)
        except (ValueError, TypeError, ZeroDivisionError) as e:  # ModelConfig.__post_init__'s checks
            raise UnsupportedModelError(f"{source}: {e}") from None

    def positive(value: Any, key: str) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise UnsupportedModelError(f"{source}: {key} must be an integer, got {value!r}") from None
        if n < 1:
            raise UnsupportedModelError(f"{source}: {key} must be >= 1, got {n}")
        return n

    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    ids = dict(bos_token_id=_first_id(hf.get("bos_token_id")), pad_token_id=_first_id(hf.get("pad_token_id")))
    eos = eos_ids(hf.get("eos_token_id"), f"{source}: eos_token_id")
    ids["eos_token_id"], ids["extra_eos_token_ids"] = (eos[0], eos[1:]) if eos else (None, ())
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"{source}: gpt2 activation_function {act!r} is not supported")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise UnsupportedModelError(f"{source}: gpt2 option {flag}=true is not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise UnsupportedModelError(f"{source}: gpt2 option scale_attn_weights=false is not supported")
        d = int(_require(hf, "n_embd", source))
        heads = positive(_require(hf, "n_head", source), "n_head")
        return build(
            model_type="gpt2",
            vocab_size=int(_require(hf, "vocab_size", source)),
            hidden_size=d,
            num_layers=int(_require(hf, "n_layer", source)),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=d // heads,
            intermediate_size=int(hf.get("n_inner") or 4 * d),
            max_position_embeddings=int(_require(hf, "n_positions", source)),
            position_encoding="learned",
            norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            mlp="gelu",
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            **ids,
        )
    # Llama family.
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    d = int(_require(hf, "hidden_size", source))
    heads = positive(_require(hf, "num_attention_heads", source), "num_attention_heads")
    rope = hf.get("rope_scaling") or None
    rope_params = hf.get("rope_parameters") or None
    theta = hf.get("rope_theta")
    if rope_params is not None and isinstance(rope_params, dict):
        # transformers >= 5 folds rope_theta and the scaling dict into "rope_parameters".
        theta = rope_params.get("rope_theta", theta)
        if rope_params.get("rope_type", "default") != "default":
            rope = rope_params
    scaling = None
    if rope is not None:
        kind = rope.get("rope_type", rope.get("type"))
        if kind == "llama3":
            scaling = RopeScaling(
                kind="llama3",
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif kind == "linear":
            scaling = RopeScaling(kind="linear", factor=float(rope["factor"]))
        elif kind not in (None, "default"):
            raise UnsupportedModelError(f"{source}: rope_scaling type {kind!r} is not supported")
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if (model_type == "mistral" or hf.get("use_sliding_window")) else None
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: qwen2 use_sliding_window=true is not supported")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
    return build(
        model_type=model_type,
        vocab_size=int(_require(hf, "vocab_size", source)),
        hidden_size=d,
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=positive(hf.get("num_key_value_heads") or heads, "num_key_value_heads"),
        head_dim=int(hf.get("head_dim") or d // heads),
        intermediate_size=int(_require(hf, "intermediate_size", source)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        position_encoding="rope",
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        qkv_bias=qkv_bias,
        attn_out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window else None,
        **ids,
    )


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict that makes ``transformers`` build the same model."""
    # Written even when None: transformers would otherwise fill in GPT-2's 50256 for a missing id.
    ids = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if config.extra_eos_token_ids:  # a list, as the source had it: transformers' generate stops at each
        ids["eos_token_id"] = list(config.eos_token_ids)
    if config.model_type == "gpt2":
        return dict(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            vocab_size=config.vocab_size,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            n_positions=config.max_position_embeddings,
            layer_norm_epsilon=config.norm_eps,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=config.tie_word_embeddings,
            torch_dtype="float32",
            **ids,
        )
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    out: dict[str, Any] = dict(
        model_type=config.model_type,
        architectures=[arch[config.model_type]],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        hidden_act="silu",
        attention_dropout=0.0,
        tie_word_embeddings=config.tie_word_embeddings,
        torch_dtype="float32",
        **ids,
    )
    if config.model_type == "llama":
        out["attention_bias"] = config.qkv_bias
        out["mlp_bias"] = False
    if config.model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    if config.model_type == "qwen2":
        out["use_sliding_window"] = False
    if config.rope_scaling is not None:
        s = config.rope_scaling
        if s.kind == "llama3":
            out["rope_scaling"] = dict(
                rope_type="llama3",
                factor=s.factor,
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
        else:
            out["rope_scaling"] = dict(rope_type="linear", factor=s.factor)
    return out


def rope_inverse_frequencies(config: ModelConfig) -> list[float]:
    """RoPE inverse frequencies θ^(−2i/d), rescaled per ``config.rope_scaling`` (host-side, float64)."""
    d = config.head_dim
    inv = [1.0 / (config.rope_theta ** (2 * i / d)) for i in range(d // 2)]
    s = config.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return [f / s.factor for f in inv]
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out

"""Low-rank adapters (LoRA) as a pytree beside the frozen base parameters.

A targeted projection ``y = x·W (+ b)`` gains ``(α/r)·(x·A)·B`` with ``A`` [d_in, r] and ``B`` [r, d_out];
``B`` starts at zero, so a fresh adapter leaves the model unchanged. The adapters live in their own
nested dict shaped like the params it attaches to, e.g.

    {"layers": {"attn": {"qkv": {"lora_q_a": [L, d, r], "lora_q_b": [L, r, q_size], ...}}}}

stacked with the blocks' leading layer axis, so they ride along the blocks' ``lax.scan`` (and the unrolled
decode loop) with the weights they adapt. :func:`join_params` puts them into the base's dict without
copying a weight (it only re-nests references); the model (``LanguageModel.lora_alpha`` set) then computes
the low-rank term inside each layer and never materialises ``W + (α/r)·A·B``: a training step holds one copy
of the weights, and a decode step adds two rank-r matmuls per adapted projection.

Targets name the projections as Hugging Face does: ``q``, ``k``, ``v`` (slices of our fused ``qkv``
matrix), ``qkv`` (one adapter over the fused matrix: GPT-2's ``c_attn``), ``o``, ``gate`` and ``up`` (the
halves of SwiGLU's fused ``gate_up``; ``up`` is GPT-2's ``c_fc``) and ``down``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.models.config import ModelConfig

Params = dict[str, Any]
TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters: ``W + (alpha/rank)·A·B`` on each target projection; only A and B are trained.

    targets: among q, k, v, qkv (the fused q/k/v projection as one adapter), o, gate, up, down.
    dropout: only 0 (every model here runs without dropout).
    """

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets: expected distinct names among {', '.join(TARGETS)}, got "
                             f"{list(self.targets)}")
        if "qkv" in self.targets and set(self.targets) & {"q", "k", "v"}:
            raise ValueError("lora.targets: qkv (one fused adapter) excludes q, k and v")
        if self.dropout != 0.0:
            raise ValueError(f"lora.dropout: only 0 is supported (models run without dropout), got "
                             f"{self.dropout}")

    @property
    def scale(self) -> float:
        """α / r, the factor of the low-rank term."""
        return self.alpha / self.rank


class Slot(NamedTuple):
    """One target's column range of a projection's output: ``y[..., offset:offset + width]``."""

    target: str
    offset: int
    width: int


def projection_slots(cfg: ModelConfig) -> dict[tuple[str, str], tuple[Slot, ...]]:
    """Each projection (module, dense) → the targets its output columns are split into, in order."""
    q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    slots = {
        ("attn", "qkv"): (Slot("q", 0, q), Slot("k", q, kv), Slot("v", q + kv, kv)),
        ("attn", "out"): (Slot("o", 0, cfg.hidden_size),),
        ("mlp", "down"): (Slot("down", 0, cfg.hidden_size),),
    }
    if cfg.mlp == "swiglu":
        slots[("mlp", "gate_up")] = (Slot("gate", 0, f), Slot("up", f, f))
    else:
        slots[("mlp", "up")] = (Slot("up", 0, f),)
    return slots


def _in_features(cfg: ModelConfig, dense: str) -> int:
    return {"qkv": cfg.hidden_size, "out": cfg.q_size, "gate_up": cfg.hidden_size, "up": cfg.hidden_size,
            "down": cfg.intermediate_size}[dense]


def target_slots(cfg: ModelConfig, targets: tuple[str, ...]) -> dict[tuple[str, str], tuple[Slot, ...]]:
    """The adapted slots of each projection for ``targets`` (``qkv``: the whole fused projection)."""
    if "gate" in targets and cfg.mlp != "swiglu":
        raise ValueError(f"lora.targets: gate needs a SwiGLU MLP; a {cfg.model_type} model has none")
    out: dict[tuple[str, str], tuple[Slot, ...]] = {}
    for proj, slots in projection_slots(cfg).items():
        if proj == ("attn", "qkv") and "qkv" in targets:
            out[proj] = (Slot("qkv", 0, cfg.q_size + 2 * cfg.kv_size),)
            continue
        chosen = tuple(s for s in slots if s.target in targets)
        if chosen:
            out[proj] = chosen
    return out


def init_lora(key: jax.Array, model_config: ModelConfig, cfg: LoRAConfig) -> Params:
    """Fresh adapters: A ~ U(−1/√d_in, 1/√d_in) (the Kaiming-uniform bound PEFT uses), B = 0, stacked
    [L, …] like the blocks. The adapted model equals the base until B moves."""
    L, r = model_config.num_layers, cfg.rank
    slots = target_slots(model_config, cfg.targets)
    keys = iter(jax.random.split(key, sum(len(s) for s in slots.values())))
    layers: dict[str, dict[str, dict[str, jax.Array]]] = {}
    for (module, dense), chosen in slots.items():
        d_in = _in_features(model_config, dense)
        bound = 1.0 / math.sqrt(d_in)
        leaves = {}
        for slot in chosen:
            leaves[f"lora_{slot.target}_a"] = jax.random.uniform(next(keys), (L, d_in, r), jnp.float32,
                                                                 -bound, bound)
            leaves[f"lora_{slot.target}_b"] = jnp.zeros((L, r, slot.width), jnp.float32)
        layers.setdefault(module, {})[dense] = leaves
    return {"layers": layers}


def is_lora_leaf_name(name: Any) -> bool:
    return isinstance(name, str) and name.startswith("lora_") and name[-2:] in ("_a", "_b")


def has_lora(tree: Any) -> bool:
    """Whether a params dict (or one layer's) holds adapter leaves."""
    if not isinstance(tree, dict):
        return False
    return any(is_lora_leaf_name(k) or has_lora(v) for k, v in tree.items())


def join_params(frozen: Any, trainable: Any) -> Any:
    """The tree the model runs on: ``frozen`` with ``trainable``'s leaves put beside its own (dicts merge key
    by key, NamedTuples field by field, None stands for "nothing here"). Copies no array.

    E.g. ``join_params(base_lm, adapters)`` is the adapted LM's params, and
    ``join_params(PolicyParams(base_lm), PolicyParams(adapters, value_head))`` the adapted policy's.
    Raises ValueError when both trees hold a leaf at the same place.
    """
    if frozen is None:
        return trainable
    if trainable is None:
        return frozen
    if isinstance(frozen, dict) and isinstance(trainable, dict):
        keys = list(frozen) + [k for k in trainable if k not in frozen]
        return {k: join_params(frozen.get(k), trainable.get(k)) for k in keys}
    if isinstance(frozen, tuple) and hasattr(frozen, "_fields") and type(frozen) is type(trainable):
        return type(frozen)(*(join_params(f, t) for f, t in zip(frozen, trainable, strict=True)))
    raise ValueError(f"join_params: a frozen {type(frozen).__name__} and a trained "
                     f"{type(trainable).__name__} at the same place (the trained tree must only add leaves)")


def strip_lora(params: Params) -> Params:
    """``params`` without adapter leaves (the base: what the model runs with the adapters off)."""
    if not isinstance(params, dict):
        return params
    return {k: strip_lora(v) for k, v in params.items() if not is_lora_leaf_name(k)}


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale·A·B`` [..., d_in, width] (for merging and export; the model itself never forms it)."""
    return scale * jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)


def merge_lora(base: Params, adapters: Params, model_config: ModelConfig, cfg: LoRAConfig) -> Params:
    """Plain params with every adapter folded in: ``W[:, slot] += (α/r)·A·B``; same layout as ``base``."""
    slots = projection_slots(model_config)
    layers = dict(base["layers"])
    for module, denses in adapters["layers"].items():
        layers[module] = dict(layers[module])
        for dense, leaves in denses.items():
            kernel = jnp.asarray(layers[module][dense]["kernel"])
            all_slots = slots[(module, dense)]
            if "lora_qkv_a" in leaves:
                all_slots = (Slot("qkv", 0, kernel.shape[-1]),)
            for slot in all_slots:
                if f"lora_{slot.target}_a" not in leaves:
                    continue
                a, b = leaves[f"lora_{slot.target}_a"], leaves[f"lora_{slot.target}_b"]
                delta = lora_delta(a, b, cfg.scale)
                kernel = kernel.at[..., slot.offset: slot.offset + slot.width].add(delta.astype(kernel.dtype))
            layers[module][dense] = {**layers[module][dense], "kernel": kernel}
    return {**base, "layers": layers}


def num_lora_params(adapters: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))

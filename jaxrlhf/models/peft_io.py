"""LoRA adapters in the PEFT adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a tensor ``base_model.model.<HF module>.lora_A.weight`` ([r, d_in]) / ``lora_B.weight``
([d_out, r]) and adds ``(lora_alpha/r)·B·A·x`` to the module's output, the same term as ours with
A_peft = Aᵀ, B_peft = Bᵀ. Our targets map one-to-one onto Llama-family modules (q/k/v/o/gate/up/down
``_proj``); a fused ``qkv`` adapter there is written as q, k and v adapters sharing its A, each with its
columns of B. GPT-2 has one fused ``c_attn`` for q, k and v: adapters on n of them are written as one adapter
of rank n·r on ``c_attn`` (A stacked, B block-diagonal, α scaled by n through PEFT's ``rank_pattern`` /
``alpha_pattern``), which is the same function.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lora import LoRAConfig, projection_slots

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_GPT2 = {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}


def peft_tensors(model_config: ModelConfig, adapters: Any, cfg: LoRAConfig) -> tuple[dict[str, np.ndarray],
                                                                                      dict[str, int]]:
    """PEFT-named float32 tensors of ``adapters`` and the per-module ranks that differ from ``cfg.rank``."""
    gpt2 = model_config.model_type == "gpt2"
    prefix = "base_model.model." + ("transformer.h." if gpt2 else "model.layers.")
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for (module, dense), slots in projection_slots(model_config).items():
        leaves = adapters["layers"].get(module, {}).get(dense, {})
        if not leaves:
            continue
        names_here = ("qkv", *[s.target for s in slots])
        a_of = {t: np.asarray(leaves[f"lora_{t}_a"], np.float32)
                for t in names_here if f"lora_{t}_a" in leaves}
        b_of = {t: np.asarray(leaves[f"lora_{t}_b"], np.float32) for t in a_of}
        if gpt2 and dense == "qkv" and "qkv" not in a_of:
            # q/k/v adapters as one block adapter on c_attn: A = [A_q A_k A_v], B = diag(B_q, B_k, B_v).
            chosen = [s for s in slots if s.target in a_of]
            a = np.concatenate([a_of[s.target] for s in chosen], axis=-1)  # [L, d, n·r]
            width = model_config.q_size + 2 * model_config.kv_size
            b = np.zeros((a.shape[0], a.shape[-1], width), np.float32)
            for j, s in enumerate(chosen):
                r = cfg.rank
                b[:, j * r:(j + 1) * r, s.offset:s.offset + s.width] = b_of[s.target]
            a_of, b_of = {"qkv": a}, {"qkv": b}
            if len(chosen) > 1:
                ranks["c_attn"] = len(chosen) * cfg.rank
        if not gpt2 and dense == "qkv" and "qkv" in a_of:
            # One fused adapter, ΔW = A·B, on separate q/k/v modules: each gets the same A and its columns of
            # B (ΔW_q = A·B[:, q]), the same function.
            a, b = a_of.pop("qkv"), b_of.pop("qkv")
            for s in slots:
                a_of[s.target], b_of[s.target] = a, b[..., s.offset:s.offset + s.width]
        names = _GPT2 if gpt2 else _LLAMA
        for target, a in a_of.items():
            if target not in names:
                raise ValueError(f"PEFT export: target {target!r} has no {model_config.model_type} module")
            for i in range(a.shape[0]):
                name = f"{prefix}{i}.{names[target]}"
                tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
                tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_of[target][i].T)
    return tensors, ranks


def save_peft_adapters(path: str | os.PathLike, model_config: ModelConfig, adapters: Any, cfg: LoRAConfig,
                       base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` under ``path``, which
    ``peft.PeftModel.from_pretrained(base, path)`` loads onto the base model (``base_model``: its path,
    recorded as ``base_model_name_or_path``, absolute when it is a local directory so the adapter loads
    from anywhere)."""
    from safetensors.numpy import save_file

    if base_model is not None and Path(base_model).is_dir():
        base_model = str(Path(base_model).resolve())

    tensors, ranks = peft_tensors(model_config, adapters, cfg)
    gpt2 = model_config.model_type == "gpt2"
    # "attn.c_proj", not "c_proj": PEFT matches a name's suffix, and GPT-2's MLP has a c_proj too.
    modules = sorted({".".join(n.split(".")[-4:-2]) for n in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": modules, "bias": "none", "fan_in_fan_out": gpt2,
        "rank_pattern": ranks, "alpha_pattern": {k: cfg.alpha * v / cfg.rank for k, v in ranks.items()},
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "base_model_name_or_path": base_model, "inference_mode": True,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out

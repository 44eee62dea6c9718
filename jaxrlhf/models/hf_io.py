"""Hugging Face checkpoint I/O: ``config.json`` + safetensors in, the same out.

``load(path)`` reads a local directory (single ``model.safetensors`` or a sharded
``model.safetensors.index.json``) and its tokenizer; ``save(path, ...)`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads and that gives the same logits. Safetensors only:
no pickle, never ``trust_remote_code``. Extra heads (value/reward) go to ``jaxrlhf_heads.safetensors`` beside
the model, which ``transformers`` ignores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxrlhf.models.config import ModelConfig, UnsupportedModelError, from_hf_config, to_hf_config
from jaxrlhf.models.transformer import LanguageModel, Params, stack_layers, unstack_layers

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEADS_FILE = "jaxrlhf_heads.safetensors"


class CheckpointFormatError(ValueError):
    """A checkpoint directory is missing a file, a tensor, or holds one of the wrong shape or name."""


# --------------------------------------------------------------------------------------- name mapping
# Each rule maps one of our leaves to one or more Hugging Face tensors. ``split`` cuts our leaf into the HF
# tensors; ``join`` builds our leaf from them. Linear weights are transposed for torch's [out, in] layout,
# except GPT-2's Conv1D which already stores [in, out].

_Rule = tuple[tuple[Any, ...], list[str], Callable[..., np.ndarray], Callable[[np.ndarray], list[np.ndarray]]]


def _one(transpose: bool):
    join = (lambda w: w.T) if transpose else (lambda w: w)
    return join, lambda x: [x.T if transpose else x]


def _cat(sizes: list[int], transpose: bool):
    def join(*ws):
        parts = [w.T if transpose else w for w in ws]
        return np.concatenate(parts, axis=-1)

    def split(x):
        parts = np.split(x, np.cumsum(sizes)[:-1], axis=-1)
        return [p.T if transpose else p for p in parts]

    return join, split


def _rules(cfg: ModelConfig) -> list[_Rule]:
    rules: list[_Rule] = []

    def add(path, names, fns):
        rules.append((path, names, fns[0], fns[1]))

    if cfg.model_type == "gpt2":
        add(("embed",), ["transformer.wte.weight"], _one(False))
        add(("pos_embed",), ["transformer.wpe.weight"], _one(False))
        for i in range(cfg.num_layers):
            h = f"transformer.h.{i}."
            L = ("layers", i)
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                add((*L, ours, "scale"), [h + theirs + ".weight"], _one(False))
                add((*L, ours, "bias"), [h + theirs + ".bias"], _one(False))
            for mod, sub, theirs in (
                ("attn", "qkv", "attn.c_attn"),
                ("attn", "out", "attn.c_proj"),
                ("mlp", "up", "mlp.c_fc"),
                ("mlp", "down", "mlp.c_proj"),
            ):
                add((*L, mod, sub, "kernel"), [h + theirs + ".weight"], _one(False))
                add((*L, mod, sub, "bias"), [h + theirs + ".bias"], _one(False))
        add(("final_norm", "scale"), ["transformer.ln_f.weight"], _one(False))
        add(("final_norm", "bias"), ["transformer.ln_f.bias"], _one(False))
        if not cfg.tie_word_embeddings:
            add(("lm_head", "kernel"), ["lm_head.weight"], _one(True))
        return rules

    add(("embed",), ["model.embed_tokens.weight"], _one(False))
    qkv_sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
    for i in range(cfg.num_layers):
        h = f"model.layers.{i}."
        L = ("layers", i)
        add((*L, "attn_norm", "scale"), [h + "input_layernorm.weight"], _one(False))
        add((*L, "mlp_norm", "scale"), [h + "post_attention_layernorm.weight"], _one(False))
        qkv = [h + f"self_attn.{p}_proj" for p in "qkv"]
        add((*L, "attn", "qkv", "kernel"), [n + ".weight" for n in qkv], _cat(qkv_sizes, True))
        if cfg.qkv_bias:
            add((*L, "attn", "qkv", "bias"), [n + ".bias" for n in qkv], _cat(qkv_sizes, False))
        add((*L, "attn", "out", "kernel"), [h + "self_attn.o_proj.weight"], _one(True))
        if cfg.attn_out_bias:
            add((*L, "attn", "out", "bias"), [h + "self_attn.o_proj.bias"], _one(False))
        f = cfg.intermediate_size
        add(
            (*L, "mlp", "gate_up", "kernel"),
            [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
            _cat([f, f], True),
        )
        add((*L, "mlp", "down", "kernel"), [h + "mlp.down_proj.weight"], _one(True))
    add(("final_norm", "scale"), ["model.norm.weight"], _one(False))
    if not cfg.tie_word_embeddings:
        add(("lm_head", "kernel"), ["lm_head.weight"], _one(True))
    return rules


# Tensors some checkpoints carry that hold no parameters (buffers of older transformers versions).
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def _normalise_name(name: str, cfg: ModelConfig) -> str:
    # Original GPT-2 checkpoints (and GPT2Model) omit the "transformer." prefix.
    if cfg.model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def _get(tree: Params, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------------------ load


def _tensor_files(path: Path) -> Iterator[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFormatError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointFormatError(f"{index}: lists shard {f!r}, which is missing from {path}")
            yield path / f
    elif (path / SINGLE_FILE).is_file():
        yield path / SINGLE_FILE
    else:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" (found {', '.join(pickles)}: pickle checkpoints are not read, convert to safetensors)"
            if pickles
            else ""
        )
        raise CheckpointFormatError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def read_safetensors(files: list[Path] | Iterator[Path]) -> dict[str, tuple[np.ndarray, str]]:
    """All tensors of the given safetensors files as float32/int numpy arrays, with each one's file name."""
    from safetensors import safe_open

    out: dict[str, tuple[np.ndarray, str]] = {}
    for f in files:
        # The "flax" framework reads bfloat16 too; the result is converted to numpy float32 here.
        with safe_open(str(f), framework="flax") as st:
            for name in st.keys():
                arr = st.get_tensor(name)
                out[name] = (
                    np.asarray(arr, dtype=np.float32)
                    if arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"
                    else np.asarray(arr),
                    f.name,
                )
    return out


def load_config(path: str | os.PathLike, dtype: str | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face directory (``config.json``)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointFormatError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{cfg_file}: invalid JSON ({e})") from None
    cfg = from_hf_config(hf, source=str(cfg_file))
    if dtype is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg


def params_from_hf_tensors(
    cfg: ModelConfig, tensors: dict[str, tuple[np.ndarray, str]], source: str = "checkpoint"
) -> Params:
    """Our params pytree from Hugging Face tensors (float32), checking names and shapes."""
    tensors = {_normalise_name(k, cfg): v for k, v in tensors.items() if not _IGNORED.search(k)}
    model = LanguageModel(cfg)
    abstract = model.abstract_params()
    params: dict = {}
    used: set[str] = set()
    for path, names, join, _ in _rules(cfg):
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CheckpointFormatError(
                f"{source}: missing tensor {missing[0]!r} for a {cfg.model_type} model"
            )
        arr = join(*[tensors[n][0] for n in names])
        # Our blocks are stacked along a leading layer axis; the rules address one layer ("layers", i, ...).
        want = (
            tuple(_get(abstract, (path[0], *path[2:])).shape[1:])
            if path[0] == "layers"
            else tuple(_get(abstract, path).shape)
        )
        if arr.shape != want:
            got = {n: tensors[n][0].shape for n in names}
            raise CheckpointFormatError(
                f"{source}: shape mismatch for {', '.join(names)} in {tensors[names[0]][1]}: "
                f"got {got}, config.json implies {want} for {'/'.join(map(str, path))}"
            )
        _set(params, path, np.ascontiguousarray(arr, dtype=np.float32))
        used.update(names)
    # A tied checkpoint may still carry lm_head.weight (a copy of the embeddings).
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        used.add("lm_head.weight")
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise CheckpointFormatError(
            f"{source}: unexpected tensor {unexpected[0]!r} in {tensors[unexpected[0]][1]} "
            f"({len(unexpected)} unexpected in all) for a {cfg.model_type} model"
        )
    return stack_layers(params)


def load(
    path: str | os.PathLike,
    dtype: str | None = None,
    tokenizer: bool = True,
) -> tuple[LanguageModel, Params, Any]:
    """Load ``(model, params, tokenizer)`` from a local Hugging Face directory.

    ``dtype``: compute dtype override ("float32" or "bfloat16"); params are float32 either way.
    ``tokenizer``: also load ``transformers.AutoTokenizer`` from the directory (None if it has none).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    cfg = load_config(path, dtype)
    tensors = read_safetensors(list(_tensor_files(path)))
    params = params_from_hf_tensors(cfg, tensors, source=str(path))
    tok = load_tokenizer(path) if tokenizer else None
    return LanguageModel(cfg), params, tok


def load_tokenizer(path: str | os.PathLike) -> Any:
    """``AutoTokenizer`` from local files only (no download, no remote code); None if there is none."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def load_heads(path: str | os.PathLike) -> dict[str, Any]:
    """Heads saved beside a model (``{"value_head": {...}, "reward_head": {...}}``); {} when none."""
    f = Path(path) / HEADS_FILE
    if not f.is_file():
        return {}
    heads: dict = {}
    for name, (arr, _) in read_safetensors([f]).items():
        _set(heads, tuple(name.split(".")), arr)
    return heads


# ------------------------------------------------------------------------------------------------ save


def hf_tensors_from_params(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 numpy tensors of our params."""
    out: dict[str, np.ndarray] = {}
    params = unstack_layers(params)
    for path, names, _, split in _rules(cfg):
        parts = split(np.asarray(_get(params, path), dtype=np.float32))
        for n, p in zip(names, parts, strict=True):
            out[n] = np.ascontiguousarray(p)
    return out


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    return flat


def save(
    path: str | os.PathLike,
    model: LanguageModel,
    params: Params,
    tokenizer: Any = None,
    heads: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a Hugging Face directory (config.json, safetensors, tokenizer) atomically.

    The directory is assembled under a temporary name and renamed into place, so an interrupted save never
    leaves a half-written model at ``path``; an existing ``path`` is replaced only once the new one is
    complete.
    ``max_shard_bytes`` splits the weights into shards with a ``model.safetensors.index.json``.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg = model.config
        (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg), indent=2) + "\n")
        tensors = hf_tensors_from_params(cfg, jax_to_numpy(params))
        meta = {"format": "pt"}
        if max_shard_bytes is None:
            save_file(tensors, str(tmp / SINGLE_FILE), metadata=meta)
        else:
            shards: list[dict[str, np.ndarray]] = [{}]
            size = 0
            for name, arr in tensors.items():
                if shards[-1] and size + arr.nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][name] = arr
                size += arr.nbytes
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(a.nbytes for a in tensors.values())
            (tmp / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
            )
        if heads:
            save_file(_flatten(jax_to_numpy(heads)), str(tmp / HEADS_FILE), metadata=meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def jax_to_numpy(tree: Any) -> Any:
    """Fetch a (possibly sharded) pytree of arrays to host numpy, keeping its dict structure."""
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


__all__ = [
    "CheckpointFormatError",
    "UnsupportedModelError",
    "hf_tensors_from_params",
    "load",
    "load_config",
    "load_heads",
    "load_tokenizer",
    "params_from_hf_tensors",
    "read_safetensors",
    "save",
]

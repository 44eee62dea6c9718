"""Hugging Face checkpoint I/O: ``config.json`` + safetensors in, the same out.

``load(path)`` reads a local directory (single ``model.safetensors`` or a sharded
``model.safetensors.index.json``) and its tokenizer; ``save(path, ...)`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads and that gives the same logits. Safetensors only:
no pickle, never ``trust_remote_code``.

Scalar heads. A model saved with a reward head (or, on request, a critic's value head) is written as
Hugging Face's ``*ForSequenceClassification`` (``GPT2…``, ``Llama…``, ``Qwen2…``, ``Mistral…``): the backbone
plus ``score.weight`` [1, d] (``num_labels`` 1, no LM head), so ``AutoModelForSequenceClassification`` — and
TRL, and any tool built on it — loads it and reads the score at the last token that is not
``config.pad_token_id``, the token jaxrlhf's head reads (:func:`classifier_pad_token`). HF's score layer
has no bias: where the final norm has one (GPT-2's LayerNorm) a head's bias ``b`` is folded into it
(δ = b·w/‖w‖², so ``transformers`` scores equal jaxrlhf's); where it has none (RMSNorm: Llama, Qwen2,
Mistral) ``b`` is kept in ``config.json`` (``jaxrlhf_score``) and restored when jaxrlhf loads the model, while
``transformers`` gives ``h·w``, i.e. jaxrlhf's score minus ``b`` (``b`` is 0 unless the head was trained to an
absolute target: ratings, values). Checkpoints of that architecture written elsewhere
(TRL's ``RewardTrainer``) load as reward models too. Other heads go to ``jaxrlhf_heads.safetensors`` beside
the model, which ``transformers`` ignores (the layout of older reward-model exports, which still loads).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxrlhf.config import ConfigError
from jaxrlhf.files import OutputWriteError, make_temp_dir, umask
from jaxrlhf.models.config import ModelConfig, UnsupportedModelError, eos_ids, from_hf_config, to_hf_config
from jaxrlhf.models.transformer import LanguageModel, Params, stack_layers, unstack_layers

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
HEADS_FILE = "jaxrlhf_heads.safetensors"
SCORE_TENSOR = "score.weight"  # HF's sequence-classification head: Linear(d, num_labels, bias=False)
SCORE_METADATA = "jaxrlhf_score"  # config.json: {"head": which of our heads, "bias": its bias}
_CLASSIFIER_SUFFIX = "ForSequenceClassification"


class CheckpointFormatError(ValueError):
    """A checkpoint directory is missing a file, a tensor, or holds one of the wrong shape or name."""


class VocabularyMismatchError(ConfigError):
    """A tokenizer can produce token ids that the model's embedding table does not have."""


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
    out: dict[str, tuple[np.ndarray, str]] = {}
    for f in files:
        with _open_safetensors(f) as st:
            for name in st.keys():
                out[name] = (_get_tensor(st, name, f), f.name)
    return out


def _open_safetensors(f: Path) -> Any:
    """``safe_open``; a truncated or corrupt file is a one-line ``CheckpointFormatError`` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        # The "flax" framework reads bfloat16 too; tensors are converted to numpy float32 by _get_tensor.
        return safe_open(str(f), framework="flax")
    except SafetensorError as e:
        raise CheckpointFormatError(
            f"{f}: not a readable safetensors file, truncated or corrupt ({e})"
        ) from None


def _get_tensor(st: Any, name: str, f: Path) -> np.ndarray:
    from safetensors import SafetensorError

    try:
        arr = st.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointFormatError(f"{f}: cannot read tensor {name!r}, truncated or corrupt ({e})") from None
    if arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16":
        return np.asarray(arr, dtype=np.float32)
    return np.asarray(arr)


def _read_json_object(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; a CheckpointFormatError naming the file otherwise."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_hf_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointFormatError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    return _read_json_object(cfg_file)


def _with_generation_eos(cfg: ModelConfig, file: Path) -> ModelConfig:
    """``cfg`` with the eos ids of ``generation_config.json`` added after its own: transformers' ``generate``
    stops at those, and some models list only one of them in config.json (Llama 3 Instruct's first
    release: end of turn there, end of text and end of turn in generation_config.json)."""
    if not file.is_file():
        return cfg
    try:
        extra = eos_ids(_read_json_object(file).get("eos_token_id"), f"{file}: eos_token_id")
    except UnsupportedModelError as e:
        raise CheckpointFormatError(str(e)) from None
    ids = cfg.eos_token_ids + tuple(i for i in extra if i not in cfg.eos_token_ids)
    if ids == cfg.eos_token_ids:
        return cfg
    return dataclasses.replace(cfg, eos_token_id=ids[0], extra_eos_token_ids=ids[1:])


def is_sequence_classifier(hf_config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes a ``*ForSequenceClassification`` model (a score head)."""
    return any(str(a).endswith(_CLASSIFIER_SUFFIX) for a in hf_config.get("architectures") or ())


def load_config(path: str | os.PathLike, dtype: str | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face directory (``config.json``).

    A sequence-classification checkpoint has no LM head; its config is read as tied (the LM head, which
    reward and value scoring never use, is then the embedding table).
    """
    path = Path(path)
    hf = _read_hf_config(path)
    cfg = from_hf_config(hf, source=str(path / "config.json"))
    if is_sequence_classifier(hf) and not cfg.tie_word_embeddings and not _has_tensor(path, "lm_head.weight"):
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    cfg = _with_generation_eos(cfg, path / GENERATION_CONFIG_FILE)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg


def _tensor_file(path: Path, name: str) -> Path | None:
    """The safetensors file of ``path`` that holds tensor ``name``, or None."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            shard = json.loads(index.read_text())["weight_map"].get(name)
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointFormatError(f"{index}: not a valid safetensors index ({e})") from None
        return None if shard is None else path / shard
    single = path / SINGLE_FILE
    if not single.is_file():
        return None
    with _open_safetensors(single) as st:
        return single if name in st.keys() else None


def _has_tensor(path: Path, name: str) -> bool:
    return _tensor_file(path, name) is not None


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
    if is_sequence_classifier(_read_hf_config(path)):
        # The score head is read by load_heads; here only the backbone is.
        tensors = {k: v for k, v in tensors.items() if not k.startswith("score.")}
    params = params_from_hf_tensors(cfg, tensors, source=str(path))
    tok = load_tokenizer(path) if tokenizer else None
    return LanguageModel(cfg), params, tok


_TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                         "added_tokens.json")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """``AutoTokenizer`` from local files only (no download, no remote code); None if there is none.

    A tokenizer that does not load (a truncated or invalid ``tokenizer.json``, …) is a one-line
    ``CheckpointFormatError`` naming the file when one of its JSON files is at fault, else the directory.
    """
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers / tokenizers raise anything from JSONDecodeError to bare Exception
        for name in _TOKENIZER_JSON_FILES:
            f = path / name
            if not f.is_file():
                continue
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as bad:  # JSONDecodeError is a ValueError
                raise CheckpointFormatError(f"{f}: invalid JSON ({bad})") from None
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointFormatError(
            f"{path}: cannot load the tokenizer ({type(e).__name__}{': ' + detail if detail else ''})"
        ) from e  # the cause, for --debug


def load_heads(path: str | os.PathLike) -> dict[str, Any]:
    """Heads saved with a model (``{"value_head": {...}, "reward_head": {...}}``); {} when none.

    A sequence-classification checkpoint's ``score.weight`` [1, d] is a head too: the one ``config.json``'s
    ``jaxrlhf_score.head`` names (a jaxrlhf export), else ``reward_head`` (e.g. TRL's ``RewardTrainer``),
    with the bias recorded there (else 0).
    """
    path = Path(path)
    heads: dict = {}
    f = path / HEADS_FILE
    if f.is_file():
        for name, (arr, _) in read_safetensors([f]).items():
            _set(heads, tuple(name.split(".")), arr)
    if (path / "config.json").is_file():
        hf = _read_hf_config(path)
        if is_sequence_classifier(hf):
            name, head = _score_head(path, hf)
            heads[name] = head
    return heads


def _score_head(path: Path, hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(head name, head params) of a sequence-classification checkpoint's score layer."""
    f = _tensor_file(path, SCORE_TENSOR)
    if f is None or not f.is_file():
        raise CheckpointFormatError(
            f"{path}: config.json says {hf['architectures'][0]} but the checkpoint has no {SCORE_TENSOR!r}"
        )
    with _open_safetensors(f) as st:
        weight = _get_tensor(st, SCORE_TENSOR, f)
        bias = _get_tensor(st, "score.bias", f) if "score.bias" in st.keys() else None
    if weight.ndim != 2 or weight.shape[0] != 1:
        raise CheckpointFormatError(
            f"{f}: {SCORE_TENSOR} has shape {weight.shape}; a reward model or critic has one output "
            "(num_labels 1, shape (1, hidden_size))"
        )
    meta = hf.get(SCORE_METADATA) or {}
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{path / 'config.json'}: {SCORE_METADATA} must be an object")
    name = meta.get("head", "reward_head")
    if name not in ("reward_head", "value_head"):
        raise CheckpointFormatError(f"{path / 'config.json'}: {SCORE_METADATA}.head {name!r} is not a head")
    b = np.float32(meta.get("bias", 0.0)) + (np.float32(bias[0]) if bias is not None else np.float32(0))
    return name, {"proj": {"kernel": np.ascontiguousarray(weight.T), "bias": np.asarray([b], np.float32)}}


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


class ClassifierPad(NamedTuple):
    """The pad token of a sequence-classification export (``token`` None: the tokenizer already pads with
    it) and whether Hugging Face then reads the token jaxrlhf's head reads (``exact``)."""

    id: int | None
    token: str | None
    exact: bool


def classifier_pad_token(tokenizer: Any, config: ModelConfig) -> ClassifierPad:
    """The ``pad_token_id`` to write into a sequence-classification export.

    HF's ``*ForSequenceClassification`` scores the rightmost token that is not ``config.pad_token_id``;
    jaxrlhf's heads read the last token of the attention mask, which ends a response with eos. The two agree
    when the pad id differs from eos (and is never the last real token). So: the tokenizer's pad if it is
    not eos; else a special token named like a pad (``<|finetune_right_pad_id|>``…), ``unk`` or ``bos``,
    which the exported tokenizer then pads with (its vocabulary is unchanged); else eos, which is not
    ``exact`` (HF would score the token before a final eos).
    """
    if tokenizer is None:
        eos = config.eos_token_id
        for candidate in (config.pad_token_id, config.bos_token_id):
            if candidate is not None and candidate != eos:
                return ClassifierPad(candidate, None, True)
        return ClassifierPad(eos if eos is not None else config.pad_token_id, None, False)
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return ClassifierPad(int(tokenizer.pad_token_id), None, True)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    named_pad = [(i, str(t)) for i, t in sorted(added.items()) if "pad" in str(t).lower() and i != eos]
    candidates = [*named_pad, (tokenizer.unk_token_id, tokenizer.unk_token), (tokenizer.bos_token_id,
                                                                               tokenizer.bos_token)]
    for token_id, token in candidates:
        if token_id is not None and token_id != eos and token_id < config.vocab_size:
            return ClassifierPad(int(token_id), str(token), True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return ClassifierPad(None if pad is None else int(pad), None, False)


# Final-norm biases a score bias can fold into (the classifier has no LM head, so only the score reads them).
_FINAL_NORM_BIASES = ("transformer.ln_f.bias", "gpt_neox.final_layer_norm.bias", "model.final_layernorm.bias",
                      "model.norm.bias")


def _fold_score_bias(tensors: dict[str, np.ndarray], w: np.ndarray, b: float) -> str | None:
    """Fold the score's bias into the final norm's bias, in place: with δ = b·w/‖w‖²,
    w·(h + δ) = w·h + b. Returns the tensor's name, or None where the model's final norm has no bias
    (RMSNorm: Llama, Qwen2, Mistral) or there is nothing to fold."""
    norm = np.dot(w.astype(np.float64), w.astype(np.float64))
    name = next((n for n in _FINAL_NORM_BIASES if n in tensors), None)
    if b == 0.0 or name is None or norm == 0.0:
        return None
    delta = (b * w.astype(np.float64) / norm).astype(np.float32)
    tensors[name] = (np.asarray(tensors[name], np.float32) + delta).astype(tensors[name].dtype)
    return name


def _classifier_layout(
    cfg: ModelConfig,
    hf_config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    head_name: str,
    head: Any,
    tokenizer: Any,
) -> Any:
    """Turn a causal-LM export into ``*ForSequenceClassification`` with ``head`` as the score (in place);
    returns the tokenizer to save (a copy padding with the export's pad token, when that changed)."""
    kernel = np.asarray(head["proj"]["kernel"], np.float32)
    if kernel.shape != (cfg.hidden_size, 1):
        raise ValueError(f"{head_name}: kernel shape {kernel.shape}, expected ({cfg.hidden_size}, 1)")
    bias = float(np.asarray(head["proj"]["bias"], np.float32).reshape(-1)[0])
    folded = _fold_score_bias(tensors, kernel[:, 0], bias)
    if folded is not None:
        log.info("%s export: the score's bias %g folded into %s, so transformers' scores (its score layer "
                 "has no bias) equal jaxrlhf's", head_name, bias, folded)
        bias = 0.0
    causal = hf_config["architectures"][0].replace("LMHeadModel", "ForCausalLM")  # GPT2LMHeadModel, …
    hf_config["architectures"] = [causal.replace("ForCausalLM", _CLASSIFIER_SUFFIX)]
    hf_config["id2label"], hf_config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    hf_config[SCORE_METADATA] = {"head": head_name, "bias": bias}
    tensors.pop("lm_head.weight", None)  # a classifier has no LM head
    tensors[SCORE_TENSOR] = np.ascontiguousarray(kernel.T)
    pad = classifier_pad_token(tokenizer, cfg)
    hf_config["pad_token_id"] = pad.id
    if not pad.exact:
        log.warning(
            "%s export: the tokenizer pads with eos and has no other special token to pad with, so "
            "transformers will score the token before a final eos, not the eos jaxrlhf scores; give the "
            "tokenizer a pad token distinct from eos for identical scores",
            head_name,
        )
    if bias != 0.0:
        log.info(
            "%s export: transformers' score layer has no bias; its scores are jaxrlhf's minus %g "
            "(kept in config.json as %s.bias, which jaxrlhf restores)",
            head_name, bias, SCORE_METADATA,
        )
    if tokenizer is not None and pad.token is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = pad.token
    return tokenizer


def save(
    path: str | os.PathLike,
    model: LanguageModel,
    params: Params,
    tokenizer: Any = None,
    heads: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
    score_head: str | None = "auto",
) -> Path:
    """Write a Hugging Face directory (config.json, safetensors, tokenizer) atomically.

    The directory is assembled under a temporary name and renamed into place, so an interrupted save never
    leaves a half-written model at ``path``; an existing ``path`` is replaced only once the new one is
    complete.
    ``max_shard_bytes`` splits the weights into shards with a ``model.safetensors.index.json``.
    ``score_head`` names the head written as the ``score`` of a ``*ForSequenceClassification`` checkpoint
    (``"value_head"`` for a separate critic); ``"auto"``: the reward head when ``heads`` has one; None: a
    causal LM with every head in ``jaxrlhf_heads.safetensors``.
    """
    from safetensors.numpy import save_file

    heads = dict(heads or {})
    if score_head == "auto":
        score_head = "reward_head" if "reward_head" in heads else None
    if score_head is not None and score_head not in heads:
        raise ValueError(f"score_head={score_head!r} is not among the heads given ({sorted(heads)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")  # readable as any other output, not 0700
    try:
        mask = umask()
        cfg = model.config
        hf_config = to_hf_config(cfg)
        tensors = hf_tensors_from_params(cfg, jax_to_numpy(params))
        if score_head is not None:
            score = jax_to_numpy(heads.pop(score_head))
            tokenizer = _classifier_layout(cfg, hf_config, tensors, score_head, score, tokenizer)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
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
        for f in tmp.rglob("*"):  # safetensors writes 0600 files: give every file open(..., "w")'s mode
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~mask)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # disk full, a size limit, …
            reason = " ".join(str(e).split()) or type(e).__name__
            raise OutputWriteError(f"cannot write the export {path}: {reason} (the previous export, if any, "
                                   "is intact)") from e
        raise
    return path


def check_vocabulary(
    tokenizer: Any, config: ModelConfig, tokenizer_source: str = "", model_source: str = ""
) -> None:
    """Raise :class:`VocabularyMismatchError` (one line, both sizes) when ``tokenizer`` can produce a token
    id ≥ ``config.vocab_size``, i.e. one the model's embedding table has no row for.

    A tokenizer smaller than the embedding is fine (checkpoints often pad their vocabulary to a multiple
    of 64 or 128); ``*_source`` name the two in the message (e.g. their directories).
    """
    vocab = tokenizer.get_vocab()
    needed = max(vocab.values()) + 1 if vocab else 0
    if needed <= config.vocab_size:
        return
    tok = f"the tokenizer {tokenizer_source}" if tokenizer_source else "the tokenizer"
    mod = f"the model {model_source}" if model_source else "the model"
    raise VocabularyMismatchError(
        f"{tok} has {len(vocab)} tokens (ids up to {needed - 1}) but {mod} has vocab_size "
        f"{config.vocab_size}: ids >= {config.vocab_size} have no embedding; use the model's own tokenizer "
        f"or one whose ids stay below {config.vocab_size}"
    )


def jax_to_numpy(tree: Any) -> Any:
    """Fetch a (possibly sharded) pytree of arrays to host numpy, keeping its dict structure."""
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


__all__ = [
    "CheckpointFormatError",
    "ClassifierPad",
    "UnsupportedModelError",
    "VocabularyMismatchError",
    "check_vocabulary",
    "classifier_pad_token",
    "hf_tensors_from_params",
    "is_sequence_classifier",
    "load",
    "load_config",
    "load_heads",
    "load_tokenizer",
    "params_from_hf_tensors",
    "read_safetensors",
    "save",
]

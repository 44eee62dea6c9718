"""Models and tokenizers for the trainers: load a Hugging Face directory or build from scratch; export.

Exports are Hugging Face directories written by :func:`jaxrlhf.models.hf_io.save` (atomic: a failed export
leaves the previous one intact). Heads go to ``jaxrlhf_heads.safetensors`` beside the LM; a reward model's
normalisation (``r' = gain·r + bias``) goes to ``reward_normalization.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf import parallel
from jaxrlhf.config import ConfigError
from jaxrlhf.data import make_char_tokenizer
from jaxrlhf.models import hf_io
from jaxrlhf.models.config import ModelConfig, gpt2_config, llama_config
from jaxrlhf.models.transformer import LanguageModel, Params
from jaxrlhf.rl import RewardNormalization
from jaxrlhf.steps.params import RewardModelParams
from jaxrlhf.train.checkpoint import NonFiniteCheckpointError, first_nonfinite_leaf
from jaxrlhf.train.run_config import ArchitectureConfig, ModelSection
from jaxrlhf.train.timing import transformer_flops_per_token

log = logging.getLogger(__name__)

NORMALIZATION_FILE = "reward_normalization.json"
CHAR_TOKENIZER_PREFIX = "char:"


class LoadedModel(NamedTuple):
    """A language model, its params (LM params; :class:`RewardModelParams` from :func:`load_reward_model`),
    its tokenizer and any heads saved beside it."""

    model: LanguageModel
    params: Params | RewardModelParams
    tokenizer: Any
    heads: dict[str, Any]


def load_tokenizer(spec: str) -> Any:
    """A tokenizer from a local directory, or a character-level one from ``"char:<alphabet>"``."""
    if spec.startswith(CHAR_TOKENIZER_PREFIX):
        return make_char_tokenizer(spec[len(CHAR_TOKENIZER_PREFIX) :])
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"{spec}: tokenizer directory not found")
    tokenizer = hf_io.load_tokenizer(spec)
    if tokenizer is None:
        raise FileNotFoundError(f"{spec}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return tokenizer


def architecture_config(arch: ArchitectureConfig, tokenizer: Any, dtype: str) -> ModelConfig:
    """The :class:`ModelConfig` of a from-scratch model whose vocabulary is the tokenizer's."""
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads or arch.num_heads,
        intermediate_size=arch.intermediate_size or 4 * arch.hidden_size,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    if arch.hidden_size % arch.num_heads:
        raise ConfigError(
            f"model.architecture: hidden_size {arch.hidden_size} is not a multiple of "
            f"num_heads {arch.num_heads}"
        )
    try:
        return (gpt2_config if arch.family == "gpt2" else llama_config)(**shape)
    except ValueError as e:
        raise ConfigError(f"model.architecture: {e}") from None


def load_model(section: ModelSection, key: jax.Array, what: str = "model") -> LoadedModel:
    """Load ``section.path`` or initialise ``section.architecture`` from ``key`` (deterministic per key)."""
    if section.path is not None:
        model, params, tokenizer = hf_io.load(section.path, dtype=section.dtype)
        heads = hf_io.load_heads(section.path)
        if section.tokenizer:
            own, tokenizer = tokenizer, load_tokenizer(section.tokenizer)
            if own is not None and own.get_vocab() != tokenizer.get_vocab():
                log.warning("%s.tokenizer %s replaces the tokenizer of %s (%d tokens instead of %d)",
                            what, section.tokenizer, section.path, len(tokenizer), len(own))
        if tokenizer is None:
            raise ConfigError(f"{what}.tokenizer: {section.path} holds no tokenizer; set {what}.tokenizer")
    else:
        assert section.architecture is not None and section.tokenizer  # checked by check_model
        tokenizer = load_tokenizer(section.tokenizer)
        model = LanguageModel(architecture_config(section.architecture, tokenizer, section.dtype))
        params, heads = model.init(key), {}
    if model.config.remat != section.remat:
        model = dataclasses.replace(model, config=dataclasses.replace(model.config, remat=section.remat))
    # A token id past the embedding table would index garbage (or clamp silently): refuse it up front.
    tokenizer_source = section.tokenizer or section.path or ""
    hf_io.check_vocabulary(tokenizer, model.config, tokenizer_source, section.path or "")
    params = jax.tree.map(jnp.asarray, params)
    log.info("%s: %s, %.3fM parameters, tokenizer of %d tokens (%s)", what, _describe(section),
             model.config.num_params() / 1e6, len(tokenizer), tokenizer_source)
    return LoadedModel(model, params, tokenizer, heads)


def _describe(section: ModelSection) -> str:
    if section.path is not None:
        return f"loaded from {section.path}"
    assert section.architecture is not None
    return f"{section.architecture.family} from scratch"


def check_length(
    config: ModelConfig, length: int, keys: str = "data.max_prompt_length + data.max_response_length"
) -> None:
    """Prompt + response lengths must fit the model's position table."""
    if length > config.max_position_embeddings:
        raise ConfigError(
            f"{keys} = {length} tokens exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )


def matmul_params(config: ModelConfig, lm_head: bool = True) -> int:
    """Parameters used in matmuls per token (all but the embedding lookups; the LM head once), for FLOPs."""
    return config.num_params(include_embeddings=False) + lm_head * config.vocab_size * config.hidden_size


def flops_per_token(config: ModelConfig, training: bool, lm_head: bool = True) -> Callable[[int], float]:
    """``seq_len -> model FLOPs per token`` (6·N + 12·L·d·T training, 2·N + 4·L·d·T forward); a reward
    model or critic computes no LM head (``lm_head=False``)."""
    n = matmul_params(config, lm_head)
    return lambda seq_len: transformer_flops_per_token(
        n, config.num_layers, config.hidden_size, seq_len, training
    )


def read_normalization(path: str | os.PathLike) -> RewardNormalization | None:
    """The (gain, bias) saved beside a reward model, or ``None`` when the directory has none."""
    f = Path(path) / NORMALIZATION_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        return RewardNormalization(jnp.float32(data["gain"]), jnp.float32(data["bias"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise hf_io.CheckpointFormatError(f"{f}: expected {{'gain': number, 'bias': number}} ({e})") from None


def load_reward_model(path: str, dtype: str = "float32") -> tuple[LoadedModel, RewardNormalization | None]:
    """A reward model directory: backbone + ``reward_head`` (params :class:`RewardModelParams`) and its
    normalisation."""
    loaded = load_model(ModelSection(path=path, dtype=dtype), jax.random.key(0), what="reward.model_path")
    if "reward_head" not in loaded.heads:
        raise hf_io.CheckpointFormatError(
            f"{path}: no reward_head in {hf_io.HEADS_FILE} (is this a reward model export?)"
        )
    params = RewardModelParams(loaded.params, jax.tree.map(jnp.asarray, loaded.heads["reward_head"]))
    return loaded._replace(params=params), read_normalization(path)


def export_model(
    path: str | os.PathLike,
    model: LanguageModel,
    lm_params: Params,
    tokenizer: Any,
    heads: dict[str, Any] | None = None,
    normalization: RewardNormalization | None = None,
    score_head: str | None = "auto",
    source: str | os.PathLike | None = None,
) -> Path:
    """Write a Hugging Face directory (LM, heads, tokenizer, reward normalisation) atomically.

    ``source``: the model directory the run started from; its ``generation_config.json`` (the sampling
    defaults ``generate`` and TRL read: do_sample, temperature, top_p, eos ids) is kept in the export.

    ``score_head`` (see :func:`jaxrlhf.models.hf_io.save`): the head written as a
    ``*ForSequenceClassification`` checkpoint's ``score`` — ``"auto"`` picks a reward head,
    ``"value_head"`` exports a separate critic that way. Every process takes part in gathering sharded
    parameters; only process 0 writes.
    """
    lm_params, heads = parallel.to_host((lm_params, heads))
    if not parallel.is_main_process():
        return Path(path)
    bad = first_nonfinite_leaf({"lm": lm_params, "heads": heads or {}})
    if bad is not None:
        raise NonFiniteCheckpointError(f"refusing to export to {path}: parameter {bad} is not finite")
    extra = {}
    if normalization is not None:
        gain, bias = float(normalization.gain), float(normalization.bias)
        extra[NORMALIZATION_FILE] = json.dumps({"gain": gain, "bias": bias}, indent=2) + "\n"
    gen_file = None if source is None else Path(source) / hf_io.GENERATION_CONFIG_FILE
    if gen_file is not None and gen_file.is_file():
        extra[hf_io.GENERATION_CONFIG_FILE] = gen_file.read_text()
    out = hf_io.save(path, model, lm_params, tokenizer=tokenizer, heads=heads or None,
                     extra_files=extra or None, score_head=score_head)
    log.info("exported %s", out)
    return out

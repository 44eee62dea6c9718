"""The run layer's LoRA: adapters beside the loaded base (``lora:`` in a run config) and their export."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

from jaxrlhf.models.lora import LoRAConfig, init_lora, merge_lora, num_lora_params
from jaxrlhf.models.peft_io import save_peft_adapters
from jaxrlhf.models.transformer import LanguageModel, Params

log = logging.getLogger("jaxrlhf")


def lora_model(cfg: LoRAConfig, model: LanguageModel, base: Params,
               key: jax.Array) -> tuple[LanguageModel, Params, Params | None]:
    """``(model, trained LM params, frozen LM params)``: with ``lora.enabled`` the model that runs
    adapters, fresh adapters and the base; otherwise ``(model, base, None)``."""
    if not cfg.enabled:
        return model, base, None
    adapters = init_lora(key, model.config, cfg)
    log.info("LoRA: rank %d, alpha %g, targets %s: %d trained parameters (the base's %d frozen)", cfg.rank,
             cfg.alpha, ",".join(cfg.targets), num_lora_params(adapters), model.config.num_params())
    return dataclasses.replace(model, lora_alpha=cfg.alpha), adapters, base


def merged_lm(cfg: LoRAConfig, model: LanguageModel, trained: Params, frozen: Params | None) -> Params:
    """The LM params to export: the base with the adapters folded in (or the trained params as they are)."""
    if frozen is None:
        return trained
    return merge_lora(frozen, trained, model.config, cfg)


def export_adapters(run_dir: str, cfg: LoRAConfig, model: LanguageModel, adapters: Params,
                    base_path: str | None) -> None:
    """``<run_dir>/export_adapter``: the adapters alone in PEFT's format (process 0 writes)."""
    if jax.process_index() != 0:
        return
    adapters = jax.tree.map(lambda x: jax.device_get(x), adapters)
    out = save_peft_adapters(os.path.join(run_dir, "export_adapter"), model.config, adapters, cfg, base_path)
    log.info("LoRA adapters (PEFT format) written to %s", out)

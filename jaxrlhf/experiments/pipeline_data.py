"""Host-side preparation of the pure pipeline: the task, its tokenizer and the fixed token arrays that
``train(key)`` closes over as constants.

Every pool is drawn once from the task seed, each from its own disjoint prompt split (see
:mod:`jaxrlhf.oracle.tasks.splits`): the demonstrations from ``sft``, the feedback queries' prompts from
``feedback``, the RL prompts from ``rl`` and the evaluation prompts from ``eval``. What a run then draws
from the pools (batches, queries, samples) comes from its key. Token layout as in the data layer
(:mod:`jaxrlhf.data.batching`): prompts left-padded to P, responses right-padded to N.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxrlhf.config import ConfigError
from jaxrlhf.data import (
    LengthBuckets,
    PromptExample,
    SequenceExample,
    TokenizeConfig,
    encode_completion,
    encode_prompt,
    pad_token_id,
    prompt_batch,
    sequence_batch,
)
from jaxrlhf.experiments.pipeline_config import PipelineConfig
from jaxrlhf.oracle import Task, get_task
from jaxrlhf.oracle.tasks.splits import PromptOverlapReport, prompt_overlap_report

# np.random.default_rng([task seed, stream]) of each pool: fixed, so every run of a config sees the same.
_STREAMS = {"sft": 0, "feedback": 1, "rl": 2, "eval": 3}


@dataclasses.dataclass(frozen=True, eq=False)
class PromptPool:
    """Left-padded prompts: ``tokens``, ``mask`` [n, P] int32, and their texts."""

    tokens: np.ndarray
    mask: np.ndarray
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineData:
    """The task and the fixed arrays of a pipeline.

    demonstrations: ``tokens, mask, loss_mask`` [D, P+N] (prompt | completion + eos), loss on the completion.
    prompts: a :class:`PromptPool` per split ("feedback", "rl", "eval"). overlap: the pools' pairwise overlap
    (0 for a task with disjoint splits).
    """

    task: Task
    prompt_length: int
    response_length: int
    pad_id: int
    eos_id: int
    demonstrations: dict[str, np.ndarray]
    prompts: dict[str, PromptPool]
    overlap: PromptOverlapReport

    @property
    def vocab_size(self) -> int:
        return len(self.task.tokenizer)


def configured_task(name: str, seed: int, options: dict[str, Any]) -> Task:
    """``get_task(name, seed=seed, **options)`` with its errors as ConfigErrors naming ``task.name`` or
    ``task.options`` (whose default is digit_sort's, which another task does not accept)."""
    try:
        return get_task(name, seed=seed, **options)
    except (TypeError, ValueError) as e:
        if str(e).startswith("unknown task"):
            raise ConfigError(f"task.name: {e}", key="task.name") from None
        hint = " (task.options default to digit_sort's: give the task's own, or task.options={})"
        raise ConfigError(f"task.options: {e}{hint if name != 'digit_sort' else ''}",
                          key="task.options") from None


def build_task(cfg: PipelineConfig) -> Task:
    """The configured task; its oracle must have a jittable array form."""
    task = configured_task(cfg.task.name, cfg.task.seed, cfg.task.options)
    if not task.oracle.jittable:
        raise ConfigError(f"task.name: {cfg.task.name!r} has no jittable oracle; the pure pipeline needs one")
    return task


def _prompt_pool(task: Task, texts: list[str], tokenize: TokenizeConfig, length: int, pad: int) -> PromptPool:
    rows = [PromptExample(encode_prompt(task.tokenizer, t, tokenize)[0]) for t in texts]
    batch = prompt_batch(rows, buckets=LengthBuckets((length,), (1,)), pad_id=pad)
    return PromptPool(batch["tokens"], batch["mask"], tuple(texts))


def prepare_data(cfg: PipelineConfig, task: Task | None = None) -> PipelineData:
    """Draw every pool of ``cfg`` from its task seed and encode it (see the module docstring)."""
    task = build_task(cfg) if task is None else task
    tokenizer = task.tokenizer
    p, n = task.max_prompt_tokens + int(cfg.task.add_bos), task.max_response_tokens
    if p + n > cfg.model.max_position_embeddings:
        raise ConfigError(f"model.max_position_embeddings: {cfg.model.max_position_embeddings} < prompt + "
                          f"response = {p} + {n} tokens of task {task.name!r}")
    pad = pad_token_id(tokenizer)
    tokenize = TokenizeConfig(max_prompt_length=p, max_length=p + n, add_bos=cfg.task.add_bos)
    rng = {split: np.random.default_rng([cfg.task.seed, stream]) for split, stream in _STREAMS.items()}

    demos = task.demonstrations(rng["sft"], cfg.sft.demonstrations, split="sft")
    rows = [SequenceExample(encode_prompt(tokenizer, d["prompt"], tokenize)[0],
                            encode_completion(tokenizer, d["completion"], n)[0]) for d in demos]
    batch = sequence_batch(rows, buckets=LengthBuckets((p,), (n,)), pad_id=pad)
    demonstrations = {k: batch[k] for k in ("tokens", "mask", "loss_mask")}

    sizes = {"feedback": cfg.feedback.prompt_pool, "rl": cfg.rl.prompt_pool, "eval": cfg.evaluation.prompts}
    prompts = {split: _prompt_pool(task, task.sample_prompts(rng[split], size, split=split), tokenize, p, pad)
               for split, size in sizes.items()}
    overlap = prompt_overlap_report({"sft": [d["prompt"] for d in demos],
                                     **{split: pool.texts for split, pool in prompts.items()}})
    return PipelineData(task, p, n, pad, int(tokenizer.eos_token_id), demonstrations, prompts, overlap)


def describe_data(data: PipelineData) -> dict[str, Any]:
    """Counts and overlaps for a report."""
    return {"task": data.task.describe(), "prompt_length": data.prompt_length,
            "response_length": data.response_length,
            "demonstrations": int(data.demonstrations["tokens"].shape[0]),
            "prompts": {k: len(v) for k, v in data.prompts.items()}, "overlap": data.overlap.lines(),
            "max_overlap": data.overlap.max_overlap}

"""``jaxrlhf task-data``: a built-in task's data as the trainers' JSONL files, for RL on a verifiable reward.

    jaxrlhf task-data --set task=arithmetic --set out_dir=data/arithmetic

writes, from disjoint parts of the task's prompt space (``Task.sample_prompts(..., split=...)``):

- ``<out_dir>/tokenizer/``: the task's tokenizer (``model.tokenizer`` of an SFT run from scratch);
- ``sft.jsonl``: ``{"prompt", "completion"}`` demonstrations of the task's imperfect behaviour policy
  (split ``sft``), and ``sft_eval.jsonl``: held-out ones (split ``eval``);
- ``prompts.jsonl``: ``{"prompt"}`` lines for RL (split ``rl``), and ``eval_prompts.jsonl``:
  ``{"prompt", "completion"}`` with an optimal answer (split ``eval``).

Every file is written atomically (a temporary file renamed into place) with the permissions the umask gives.
Output files already in ``out_dir`` are an error naming them, and nothing is written, unless
``overwrite=true``.

The task's gold reward is then the RL reward: ``--set reward.function=task:<task>[,option=value...]`` (the
same options as ``task_options``, which the oracle needs when they change the answer, e.g. ``answer_order``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jaxrlhf.config import ConfigError
from jaxrlhf.data.jsonl import record_to_json
from jaxrlhf.files import make_temp_dir, write_text_atomic
from jaxrlhf.oracle.tasks import get_task

log = logging.getLogger("jaxrlhf")


@dataclasses.dataclass(frozen=True)
class TaskDataConfig:
    """A built-in task's SFT demonstrations, RL prompts and held-out prompts as JSONL, and its tokenizer."""

    task: str = "arithmetic"  # arithmetic | digit_sort | random_walk (whose prompts cannot be split)
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the task's keyword arguments
    seed: int = 0
    out_dir: str = "data/arithmetic"
    sft_examples: int = 4096
    eval_examples: int = 256
    rl_prompts: int = 1024
    overwrite: bool = False  # replace existing output files in out_dir (else: an error naming them)


OUTPUTS = ("tokenizer/", "sft.jsonl", "sft_eval.jsonl", "prompts.jsonl", "eval_prompts.jsonl")


def _save_tokenizer_atomic(task: Any, path: Path) -> None:
    """The task's tokenizer in a temporary directory (mode 0777 less the umask) renamed to ``path``; an
    existing ``path`` is replaced only once the new one is complete."""
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
    try:
        task.save_tokenizer(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclasses.dataclass
class TaskDataResult:
    out_dir: str
    files: dict[str, str]
    summary: str


def write_task_data(cfg: TaskDataConfig) -> TaskDataResult:
    """Write the files (see the module docstring); prints and returns a summary."""
    for key in ("sft_examples", "eval_examples", "rl_prompts"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    try:
        task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"task: {e}") from None
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir: {out} exists and is not a directory")
    existing = [name for name in OUTPUTS if (out / name.rstrip("/")).exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(
            f"out_dir: {out} already has {', '.join(existing)}; nothing was written "
            "(set overwrite=true to replace them, or choose another out_dir)"
        )
    rng = lambda stream: np.random.default_rng([cfg.seed, stream])  # one stream per file
    files = {
        "sft.jsonl": task.demonstrations(rng(0), cfg.sft_examples, split="sft"),
        "sft_eval.jsonl": task.demonstrations(rng(1), cfg.eval_examples, split="eval"),
        "prompts.jsonl": [{"prompt": p} for p in task.sample_prompts(rng(2), cfg.rl_prompts, split="rl")],
        "eval_prompts.jsonl": [{"prompt": p, "completion": task.optimal_response(p)}
                               for p in task.sample_prompts(rng(3), cfg.eval_examples, split="eval")],
    }
    texts = {name: "".join(json.dumps(record_to_json(r), ensure_ascii=False) + "\n" for r in records)
             for name, records in files.items()}
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer_atomic(task, out / "tokenizer")
    for name, text in texts.items():
        write_text_atomic(out / name, text)
    if not task.disjoint_splits:
        log.warning("task %s: its prompt space is too small for disjoint splits; the files share prompts",
                    cfg.task)
    options = "".join(f",{k}={v}" for k, v in cfg.task_options.items())
    summary = (
        f"{task.describe()}\n"
        f"wrote {out}/: tokenizer/, " + ", ".join(f"{name} ({len(r)})" for name, r in files.items()) + "\n"
        f"RL reward: --set reward.function=task:{cfg.task}{options}"
    )
    print(summary, flush=True)
    return TaskDataResult(str(out), {name: str(out / name) for name in files}, summary)

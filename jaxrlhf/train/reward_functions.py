"""The RL reward from reward functions (``reward.function`` or ``reward.functions``): a score per sequence,
the weighted sum of the functions' scores, each function's logged as ``rewards/<name>/mean`` and ``/std``
(TRL's names)::

    score = RewardFunctions.from_section(cfg.reward, tokenizer, compile_step)
    batch = take_columns(score, batch)   # hands the prompt batch's host columns to TRL-style functions
    scores = score(rollout)               # [B] = Σ_i w_i·r_i (a TRL function's None counts 0, as in TRL)
    metrics = reward_metrics(score)       # {"rewards/<name>/mean": …, "rewards/<name>/std": …}

A function of any form :func:`jaxrlhf.oracle.get_reward` accepts may be one of them: a jittable token
function runs jitted on the devices; a host one (text, token or TRL form) runs on the host once per batch.
TRL-form functions get the prompts as the data wrote them and every other column of the prompt records as
keyword arguments (see :mod:`jaxrlhf.oracle.batch_rewards`). When a rollout holds several samples per
prompt (``k·B`` rows for ``B`` prompt rows) the columns repeat, each prompt's samples being consecutive rows.

Only a TRL-form function's ``None`` ("does not apply") is skipped in the sum; a NaN from any other function
stays NaN, so the trainer's non-finite policy sees it (never a silent 0).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.config import ConfigError
from jaxrlhf.data import DataError
from jaxrlhf.oracle import BatchFunctionOracle, Oracle, get_reward
from jaxrlhf.oracle.registry import is_import_path
from jaxrlhf.rollout.generate import Rollout
from jaxrlhf.train.data_setup import COLUMNS
from jaxrlhf.train.run import compile_step
from jaxrlhf.train.run_config import RewardFunctionSection, RewardSection

log = logging.getLogger("jaxrlhf")


class Component(NamedTuple):
    name: str
    weight: float
    oracle: Oracle


def component_name(spec: str, oracle: Oracle) -> str:
    """A function's metric name: for an import path its ``__name__`` (as TRL logs it), else the spec (a
    registered name, a built-in such as ``token_count:7``)."""
    fn = getattr(oracle, "fn", None)
    name = getattr(getattr(fn, "__wrapped__", fn), "__name__", "")
    return name if is_import_path(spec) and name.isidentifier() else spec


@dataclasses.dataclass
class TrainerState:
    """What TRL's reward functions get as ``trainer_state`` (the fields they read): ``global_step``, the
    optimiser updates done before this batch, and ``max_steps``, those of the whole run."""

    global_step: int = 0
    max_steps: int = 0


class RewardFunctions:
    """``score(rollout) -> [B]``: the weighted sum of reward functions (a :class:`~jaxrlhf.steps.
    rl_iteration.ScoreFn`). ``compile`` jits the device part (e.g. :func:`jaxrlhf.train.run.compile_step`)."""

    def __init__(self, components: Sequence[Component], tokenizer: Any,
                 compile: Callable[..., Any] = compile_step, mesh: Any = None):
        self.components, self.tokenizer, self.mesh = list(components), tokenizer, mesh
        self.jittable = all(c.oracle.jittable for c in self.components)
        device = [c for c in self.components if c.oracle.jittable]
        self._device = None
        if device:
            self._device = compile(lambda rollout: _device_parts(device, rollout), donate=False)
        self._columns: list[dict[str, Any]] | None = None
        self._metrics: dict[str, Any] = {}
        self._warned_unscored = False

    @classmethod
    def from_section(cls, reward: RewardSection, tokenizer: Any,
                     compile: Callable[..., Any] = compile_step, mesh: Any = None) -> RewardFunctions:
        """The functions ``reward.function`` or ``reward.functions`` name (errors name the key). Given
        ``mesh``, host functions of a multi-host run score each process's own rows of the rollout."""
        sections = reward.functions or (RewardFunctionSection(reward.function or ""),)
        components, names = [], set()
        for i, section in enumerate(sections):
            key = "reward.function" if not reward.functions else f"reward.functions[{i}].function"
            try:
                oracle = get_reward(section.function, tokenizer=tokenizer)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
            name = section.name or component_name(section.function, oracle)
            while name in names:
                name += "_"
            names.add(name)
            components.append(Component(name, section.weight, oracle))
        log.info("reward: %s", " + ".join(f"{c.weight:g}·{c.name}" for c in components))
        return cls(components, tokenizer, compile, mesh)

    @property
    def needs_columns(self) -> bool:
        return any(isinstance(c.oracle, BatchFunctionOracle) for c in self.components)

    def set_columns(self, columns: Sequence[Mapping[str, Any]] | None) -> None:
        """The prompt batch's columns (one dict per row), for the next call."""
        self._columns = None if columns is None else [dict(c) for c in columns]

    #: The rollout's rows after each prompt's samples: ReMax appends one greedy response per prompt, in
    #: prompt order ([P·G samples; P greedy]); the trainer sets it.
    greedy_baseline: bool = False
    #: Passed as ``trainer_state`` to the functions that name it; the RL trainer updates it every iteration.
    trainer_state: TrainerState = TrainerState()

    def _warn_unscored(self, parts: Mapping[str, np.ndarray]) -> None:
        """Log (once per run) when every function returned None ("does not apply") for some samples: their
        reward is then 0, which is rarely what a user meant (TRL warns likewise)."""
        if self._warned_unscored or not self.components:
            return
        unscored = np.ones(next(iter(parts.values())).shape[0], bool)
        for c in self.components:
            if not isinstance(c.oracle, BatchFunctionOracle):
                return  # a function that always scores
            unscored &= np.isnan(parts[c.name])
        if unscored.any():
            self._warned_unscored = True
            log.warning("reward: every reward function returned None for %d of %d samples; their reward is 0 "
                        "(logged once)", int(unscored.sum()), unscored.size)

    def metrics(self) -> dict[str, Any]:
        """``rewards/<name>/mean`` and ``/std`` of the last call (NaN scores left out)."""
        return dict(self._metrics)

    def __call__(self, rollout: Rollout) -> jax.Array:
        parts: dict[str, Any] = {}
        # A multi-host rollout has rows no single process holds: each process scores its own rows (the
        # rows its data loader gave it, so the host columns line up) and the scores form one global array.
        split = self.mesh is not None and jax.process_count() > 1
        if self._device is not None:
            total, device_parts, stats = self._device(rollout)
            if self.jittable:  # everything stayed on the devices
                self._metrics = stats
                return total
            if split:
                device_parts = parallel.process_rows(self.mesh, device_parts)
            parts.update({k: np.asarray(v) for k, v in device_parts.items()})
        if split:
            rollout = parallel.process_rows(self.mesh, rollout)
        texts = None
        for c in self.components:
            if c.oracle.jittable:
                continue
            if isinstance(c.oracle, BatchFunctionOracle):
                texts = texts or self._texts(rollout)
                parts[c.name] = c.oracle.score_batch(*texts, trainer_state=self.trainer_state)
            else:
                parts[c.name] = np.asarray(c.oracle.score_rollout(rollout), np.float32)
        total = np.zeros(rollout.response_tokens.shape[0], np.float32)
        self._metrics = {}
        self._warn_unscored(parts)
        for c in self.components:
            values = parts[c.name]
            if isinstance(c.oracle, BatchFunctionOracle):  # None ("does not apply") → NaN → left out
                given = values[~np.isnan(values)]
                values = np.nan_to_num(values, nan=0.0)
            else:
                given = values
            total = total + c.weight * values
            self._metrics[f"rewards/{c.name}/mean"] = float(given.mean()) if given.size else float("nan")
            # TRL's nanstd: Bessel-corrected over the samples the function scored
            self._metrics[f"rewards/{c.name}/std"] = (float(given.std(ddof=1)) if given.size > 1
                                                      else float("nan"))
        if split:
            return parallel.shard_batch(self.mesh, total.astype(np.float32))
        return jnp.asarray(total, jnp.float32)

    def _texts(self, rollout: Rollout) -> tuple[list[Any], list[str], dict[str, list[Any]], list[list[int]]]:
        """(prompts as written, completions, the other columns, completion ids) of a rollout's rows."""
        tokens, mask = np.asarray(rollout.response_tokens), np.asarray(rollout.response_mask) > 0
        rows, eos = tokens.shape[0], self.tokenizer.eos_token_id
        ids = [tokens[b][mask[b]].tolist() for b in range(rows)]
        completions = [self.tokenizer.decode(row[: row.index(eos)] if eos in row else row,
                                             skip_special_tokens=True) for row in ids]
        columns = self._row_columns(rows)
        if columns is None:  # no columns handed over: the prompts as the policy saw them
            p = rollout.sequences.shape[1] - rollout.response_mask.shape[1]
            seq, seq_mask = np.asarray(rollout.sequences[:, :p]), np.asarray(rollout.sequence_mask[:, :p]) > 0
            prompts = [self.tokenizer.decode(seq[b][seq_mask[b]].tolist(), skip_special_tokens=True)
                       for b in range(rows)]
            return prompts, completions, {}, ids
        prompts = [c.get("prompt", "") for c in columns]
        keys = sorted({k for c in columns for k in c} - {"prompt"})
        return prompts, completions, {k: [c.get(k) for c in columns] for k in keys}, ids

    def _row_columns(self, rows: int) -> list[dict[str, Any]] | None:
        if self._columns is None:
            return None
        n = len(self._columns)
        samples = rows - n if self.greedy_baseline else rows
        if n == 0 or samples <= 0 or samples % n:
            raise ValueError(f"reward functions: a rollout of {rows} rows for a prompt batch of {n} rows")
        # each prompt's samples are consecutive; ReMax's greedy responses follow, one per prompt in order
        rows_columns = [c for c in self._columns for _ in range(samples // n)]
        return rows_columns + (list(self._columns) if self.greedy_baseline else [])


def _device_parts(components: Sequence[Component], rollout: Rollout) -> tuple[jax.Array, dict, dict]:
    """The jittable functions' weighted sum, their scores and their mean and std."""
    parts = {c.name: jnp.asarray(c.oracle.score_rollout(rollout), jnp.float32) for c in components}
    total = sum(c.weight * parts[c.name] for c in components)
    stats = {}
    for name, values in parts.items():
        stats[f"rewards/{name}/mean"] = jnp.mean(values)
        stats[f"rewards/{name}/std"] = jnp.std(values, ddof=1)  # as TRL's (Bessel-corrected)
    return total, parts, stats


def take_columns(score: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` without its host columns (``COLUMNS``), which go to ``score`` when it reads them."""
    columns = batch.pop(COLUMNS, None)
    if isinstance(score, RewardFunctions):
        score.set_columns(columns)
    return batch


def reward_metrics(score: Any) -> dict[str, float]:
    """The per-function metrics of the last scoring (``rewards/<name>/mean``, ``/std``), as floats."""
    if not isinstance(score, RewardFunctions):
        return {}
    return {k: float(np.asarray(v)) for k, v in jax.device_get(score.metrics()).items()}


def check_prompt_columns(reward: RewardSection, tokenizer: Any, examples: Sequence[Any]) -> None:
    """Every prompt record has each column the configured TRL-style reward functions need: a
    :class:`~jaxrlhf.data.DataError` naming the file and line of the first that lacks one, before training
    (otherwise a record without it reaches the function as None whenever it is sampled, or never).
    ``examples``: the prompt examples (``source`` "path:line", ``columns``)."""
    if reward.model_path is not None:
        return
    sections = reward.functions or (RewardFunctionSection(reward.function or ""),)
    for section in sections:
        try:
            oracle = get_reward(section.function, tokenizer=tokenizer)
        except ValueError:
            continue  # reported with its key when the reward is built
        if not isinstance(oracle, BatchFunctionOracle):
            continue
        for column in oracle.required_columns:
            for example in examples:
                if column not in (example.columns or {}):
                    raise DataError(
                        f"{example.source}: reward {section.function!r} needs the column {column!r}, which "
                        f"this record lacks (give every prompt record a {column!r} key)")

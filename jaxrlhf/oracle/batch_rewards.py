"""Reward functions with TRL's signature, as oracles: ``fn(prompts, completions, **columns) -> list[float]``.

TRL's ``GRPOTrainer`` calls each reward function once per batch with keyword arguments: ``prompts`` (the
dataset's prompts as written: strings, or lists of ``{"role", "content"}`` messages), ``completions`` (the
decoded responses: strings, or for a conversational prompt ``[{"role": "assistant", "content": text}]``),
``completion_ids`` (the response token ids) and every other column of the dataset as a list (e.g.
``answer=[...]``). It returns one float per completion, or ``None`` where the function does not apply.
:class:`BatchFunctionOracle` does the same, so a function written for TRL works unchanged:

    def exact_answer(prompts, completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

Only the keyword arguments the function names are passed unless it takes ``**kwargs``. A column the
function requires but the data lacks is an error naming both. ``None`` scores become NaN here; a sum of
several functions skips them (TRL's ``nansum``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.oracle.base import Oracle, RewardFunctionError, check_text_batch, decode_batch

# The arguments TRL passes besides the dataset's columns.
_STANDARD = ("prompts", "completions", "completion_ids", "trainer_state")


def is_batch_reward(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has TRL's form: a parameter named ``completions``."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class BatchFunctionOracle(Oracle):
    """An oracle around a TRL-style reward function (see the module docstring); host only, once per batch.

    :meth:`score_batch` is the full call (columns included); ``score_texts`` and ``score_tokens`` call it
    without columns (the prompt then is the decoded text), which serves a function that needs none.
    """

    jittable = False

    def __init__(self, fn: Callable[..., Any], tokenizer: Any = None, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"BatchFunctionOracle needs a callable fn(prompts, completions, **kw), got "
                            f"{fn!r}")
        self.fn, self.tokenizer = fn, tokenizer
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        parameters = inspect.signature(fn).parameters.values()
        self._takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
        self._named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self._required = [p.name for p in parameters if p.default is p.empty
                          and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @property
    def required_columns(self) -> tuple[str, ...]:
        """The dataset columns the function needs (its parameters without a default, beyond TRL's own)."""
        return tuple(n for n in self._required if n not in _STANDARD)

    def score_batch(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        trainer_state: Any = None,
    ) -> np.ndarray:
        """float32 [B] scores (NaN where the function returned None) of ``completions`` to ``prompts``.

        A completion to a conversational prompt (a list of messages) is passed as one assistant message,
        as TRL does. ``columns``: the dataset's other columns, one list of B values each; ``trainer_state``
        (TRL's: ``global_step``, ``max_steps``) where the RL trainer gives one.
        """
        completions = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
                       for p, c in zip(prompts, completions)]
        offered: dict[str, Any] = {"prompts": list(prompts), "completions": completions}
        if completion_ids is not None:
            offered["completion_ids"] = [list(map(int, ids)) for ids in completion_ids]
        if trainer_state is not None:
            offered["trainer_state"] = trainer_state
        offered.update({k: list(v) for k, v in (columns or {}).items() if k not in offered})
        missing = [name for name in self._required if name not in offered]
        if "trainer_state" in missing:
            raise RewardFunctionError(f"reward {self.name!r} needs 'trainer_state', which only the RL "
                                      "trainer passes (give it a default to score elsewhere)")
        if missing:
            available = sorted(set(offered) - set(_STANDARD))
            raise RewardFunctionError(
                f"reward {self.name!r} needs the column {missing[0]!r}, which the prompt data does not "
                f"have (its columns: {', '.join(available) or 'none'}; give each prompt record a "
                f"{missing[0]!r} key)"
            )
        kwargs = offered if self._takes_any else {k: v for k, v in offered.items() if k in self._named}
        scores = self.fn(**kwargs)
        return self._check(scores, len(completions))

    def _check(self, scores: Any, batch: int) -> np.ndarray:
        if isinstance(scores, (str, bytes)) or not hasattr(scores, "__len__"):
            raise RewardFunctionError(f"reward {self.name!r} returned {type(scores).__name__} "
                                      f"{scores!r:.60}; expected a list of {batch} floats")
        if len(scores) != batch:
            raise RewardFunctionError(f"reward {self.name!r} returned {len(scores)} scores for {batch} "
                                      "completions")
        out = np.empty(batch, np.float32)
        for b, value in enumerate(scores):
            if value is None:
                out[b] = np.nan
                continue
            if isinstance(value, (str, bytes)):  # float("0.5") would pass: a score is a number
                raise RewardFunctionError(f"reward {self.name!r} returned {type(value).__name__} "
                                          f"{value!r:.60} for completion {b}; expected a float or None")
            try:
                out[b] = float(value)
            except (TypeError, ValueError):
                raise RewardFunctionError(f"reward {self.name!r} returned {type(value).__name__} "
                                          f"{value!r:.60} for completion {b}; expected a float or "
                                          "None") from None
            if not np.isfinite(out[b]):
                raise RewardFunctionError(f"reward {self.name!r} returned {value} for completion {b}")
        return out

    def score_texts(self, prompts, responses, finished=None) -> np.ndarray:
        check_text_batch(prompts, responses, finished)
        return self.score_batch(list(prompts), list(responses))

    def score_tokens(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> jax.Array:
        arrays = (prompt_tokens, prompt_mask, response_tokens, response_mask)
        if any(isinstance(a, jax.core.Tracer) for a in arrays):
            raise TypeError(f"reward {self.name!r} runs Python on the host and cannot be traced by jax.jit; "
                            "call it outside jit, once per batch")
        if self.tokenizer is None:
            raise ValueError(f"reward {self.name!r} needs a tokenizer to score token arrays")
        prompts, responses, _ = decode_batch(self.tokenizer, *arrays)
        return jnp.asarray(self.score_batch(prompts, responses))

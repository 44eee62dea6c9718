"""Oracles: deterministic gold rewards R*(prompt, response), in a host form and an array form.

An oracle is the project's one kind of reward function: the RL trainers' ``reward.function``, the demo's gold
reward and a built-in task's oracle are all :class:`Oracle` s (see ``jaxrlhf.oracle.registry``). It has two
forms:

* host form ``score_texts(prompts, responses, finished=None) -> np.ndarray[float32] [B]``. A response
  string is what the policy wrote *before* its end-of-sequence token; ``finished[b]`` says whether it
  did emit one (``None`` means every response finished, which is the case for a demonstration or a
  record in a feedback file).
* array form ``score_tokens(prompt_tokens [B,P], prompt_mask [B,P], response_tokens [B,N],
  response_mask [B,N]) -> [B] float32``. Prompts are left-padded, responses right-padded; the response
  mask covers the real tokens including the eos token if one was emitted. For the built-in tasks it is
  written in ``jnp`` and can be jitted; it agrees exactly with
  ``score_texts(*decode_batch(tokenizer, ...))``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


class RewardFunctionError(ValueError):
    """A user's reward function failed, or returned something that is not one score per sample."""


class Oracle(abc.ABC):
    """A deterministic gold reward. Subclasses implement both forms (see the module docstring)."""

    name: str = "oracle"
    #: True when ``score_tokens`` is pure ``jnp`` and may be called inside ``jax.jit``.
    jittable: bool = False

    @abc.abstractmethod
    def score_texts(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        finished: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """Gold rewards of ``responses`` to ``prompts``: float32 [B]."""

    @abc.abstractmethod
    def score_tokens(
        self,
        prompt_tokens: ArrayLike,
        prompt_mask: ArrayLike,
        response_tokens: ArrayLike,
        response_mask: ArrayLike,
    ) -> jax.Array:
        """Gold rewards from token arrays (prompts left-padded, responses right-padded): float32 [B]."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.score_texts(prompts, responses)

    def score_rollout(self, rollout) -> jax.Array | np.ndarray:
        """[B] float32 scores of a rollout (``jaxrlhf.rollout.generate.Rollout``) by the array form.

        Jittable oracle: jnp, traceable inside ``jax.jit``. Host oracle: the inputs are fetched to the host
        here and the scores come back as NumPy, so call it outside jit, once per batch.
        """
        inputs = rollout_reward_inputs(rollout)
        batch = rollout.sequences.shape[0]
        if self.jittable:
            scores = jnp.asarray(self.score_tokens(*inputs), jnp.float32)
        elif any(isinstance(x, jax.core.Tracer) for x in inputs):
            raise TypeError(f"reward {self.name!r} runs on the host and cannot be traced by jax.jit; call "
                            "score_rollout outside jit (once per batch)")
        else:
            scores = np.asarray(self.score_tokens(*(np.asarray(x) for x in inputs)), np.float32)
        if scores.shape != (batch,):
            raise ValueError(f"reward {self.name!r} returned shape {scores.shape}, expected ({batch},)")
        if isinstance(scores, np.ndarray) and not np.all(np.isfinite(scores)):
            # On the host it can be named here; inside jit a NaN score reaches the guarded update instead.
            b = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise RewardFunctionError(f"reward {self.name!r} returned {scores[b]} for batch row {b} (of "
                                      f"{batch}); scores must be finite")
        return scores


def rollout_reward_inputs(rollout) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The array form's inputs of a rollout: (prompt_tokens, prompt_mask [B, P], response_tokens,
    response_mask [B, N])."""
    p = rollout.sequences.shape[1] - rollout.response_mask.shape[1]
    return (rollout.sequences[:, :p], rollout.sequence_mask[:, :p], rollout.response_tokens,
            rollout.response_mask)


def check_text_batch(
    prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None
) -> list[bool]:
    """Validate a host-form batch and return ``finished`` as a list (all True when ``None``)."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be sequences of strings, not a single string")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if finished is None:
        return [True] * len(prompts)
    if len(finished) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(finished)} finished flags")
    return [bool(f) for f in finished]


def check_token_batch(
    prompt_tokens: ArrayLike, prompt_mask: ArrayLike, response_tokens: ArrayLike, response_mask: ArrayLike
) -> None:
    """Raise a ValueError naming the argument whose shape does not fit the array form."""
    shapes = {
        "prompt_tokens": np.shape(prompt_tokens),
        "prompt_mask": np.shape(prompt_mask),
        "response_tokens": np.shape(response_tokens),
        "response_mask": np.shape(response_mask),
    }
    for arg, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"{arg}: expected a [batch, length] array, got shape {shape}")
    if shapes["prompt_mask"] != shapes["prompt_tokens"]:
        raise ValueError(
            f"prompt_mask shape {shapes['prompt_mask']} != prompt_tokens {shapes['prompt_tokens']}"
        )
    if shapes["response_mask"] != shapes["response_tokens"]:
        raise ValueError(
            f"response_mask shape {shapes['response_mask']} != response_tokens {shapes['response_tokens']}"
        )
    if shapes["prompt_tokens"][0] != shapes["response_tokens"][0]:
        raise ValueError(
            f"batch sizes differ: prompt_tokens {shapes['prompt_tokens']}, "
            f"response_tokens {shapes['response_tokens']}"
        )


def response_body(
    response_tokens: ArrayLike, response_mask: ArrayLike, eos_id: int
) -> tuple[jax.Array, jax.Array]:
    """Length of each response before its first eos, and whether it emitted one: ([B] int32, [B] bool).

    Assumes the mask is contiguous from position 0 (right padding).
    """
    mask = jnp.asarray(response_mask, bool)
    is_eos = (jnp.asarray(response_tokens) == eos_id) & mask
    finished = is_eos.any(axis=1)
    length = mask.shape[1]
    first_eos = jnp.where(finished, jnp.argmax(is_eos, axis=1), length)
    positions = jnp.arange(length)[None, :]
    body_length = jnp.sum(mask & (positions < first_eos[:, None]), axis=1).astype(jnp.int32)
    return body_length, finished


def token_lookup(table: np.ndarray, token_ids: ArrayLike, fill_value: int | bool) -> jax.Array:
    """``table[token_ids]`` with ``fill_value`` for ids outside the table.

    A model's vocabulary is often padded beyond the tokenizer's, so a policy can emit ids the task does
    not know; plain indexing would clamp them onto the last real token.
    """
    return jnp.take(jnp.asarray(table), jnp.asarray(token_ids), mode="fill", fill_value=fill_value)


def decode_batch(
    tokenizer,
    prompt_tokens: ArrayLike,
    prompt_mask: ArrayLike,
    response_tokens: ArrayLike,
    response_mask: ArrayLike,
) -> tuple[list[str], list[str], list[bool]]:
    """Turn an array-form batch into the host form: ``(prompts, responses, finished)``.

    The prompt keeps its real tokens, special tokens dropped (a ``<bos>`` is framing, not content). The
    response keeps its real tokens before the first eos (or chat end-of-turn token), special tokens included
    (a policy that writes ``<pad>`` mid-response must be scored for it); ``finished`` says whether one was
    emitted. Ids the
    tokenizer does not know (a padded model vocabulary) are read as its unk token.
    """
    check_token_batch(prompt_tokens, prompt_mask, response_tokens, response_mask)
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    response_tokens, response_mask = np.asarray(response_tokens), np.asarray(response_mask, bool)
    vocab_size, unk_id = len(tokenizer), tokenizer.unk_token_id

    def known(ids: list[int]) -> list[int]:
        return [
            i if 0 <= i < vocab_size else unk_id for i in ids if unk_id is not None or 0 <= i < vocab_size
        ]

    from jaxrlhf.data.tokenize import chat_turn_end_ids

    # Where a response ends: eos, or the token that closes a chat template's assistant turn (what chat
    # completions are trained to end with, and where rollouts stop).
    stop_ids = {tokenizer.eos_token_id, *chat_turn_end_ids(tokenizer)} - {None}
    prompts, responses, finished = [], [], []
    for b in range(prompt_tokens.shape[0]):
        ids = known(prompt_tokens[b][prompt_mask[b]].tolist())
        prompts.append(tokenizer.decode(ids, skip_special_tokens=True))
        real = response_tokens[b][response_mask[b]].tolist()
        stop = next((t for t, i in enumerate(real) if i in stop_ids), None)
        responses.append(tokenizer.decode(known(real[:stop]), skip_special_tokens=False))
        finished.append(stop is not None)
    return prompts, responses, finished


class FunctionOracle(Oracle):
    """An oracle around a user's Python function ``fn(prompt: str, response: str) -> float``.

    Host form only: ``score_tokens`` decodes the batch with ``tokenizer`` (see :func:`decode_batch`) and
    calls ``fn`` once per row on the host, so it cannot run inside ``jax.jit``; call it between jitted
    phases, once per batch. If ``unfinished_score`` is given it replaces ``fn``'s score for responses
    that never emitted eos; otherwise ``fn`` sees the truncated text.
    """

    jittable = False

    def __init__(
        self,
        fn: Callable[[str, str], float],
        tokenizer=None,
        name: str | None = None,
        unfinished_score: float | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"FunctionOracle needs a callable fn(prompt, response) -> float, got {fn!r}")
        self.fn = fn
        self.tokenizer = tokenizer
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self.unfinished_score = unfinished_score

    def score_texts(self, prompts, responses, finished=None) -> np.ndarray:
        finished = check_text_batch(prompts, responses, finished)
        scores = np.empty(len(prompts), np.float32)
        for b, (prompt, response, done) in enumerate(zip(prompts, responses, finished)):
            if not done and self.unfinished_score is not None:
                scores[b] = self.unfinished_score
                continue
            value = float(self.fn(prompt, response))
            if not np.isfinite(value):
                raise RewardFunctionError(
                    f"oracle {self.name!r} returned {value} for batch row {b}: "
                    f"prompt={prompt!r:.200} response={response!r:.200}"
                )
            scores[b] = value
        return scores

    def score_tokens(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> jax.Array:
        arrays = (prompt_tokens, prompt_mask, response_tokens, response_mask)
        if any(isinstance(a, jax.core.Tracer) for a in arrays):
            raise TypeError(
                f"FunctionOracle {self.name!r} runs Python on the host and cannot be traced by jax.jit; "
                "call score_tokens outside jit (once per batch) or wrap it in jax.pure_callback"
            )
        if self.tokenizer is None:
            raise ValueError(f"FunctionOracle {self.name!r} needs a tokenizer to score token arrays")
        return jnp.asarray(self.score_texts(*decode_batch(self.tokenizer, *arrays)))

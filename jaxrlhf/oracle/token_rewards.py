"""Rewards written on token arrays, as oracles, and the built-in ones (``length``, ``token_count:<id>``).

A token reward is ``fn(prompt_tokens [B,P], prompt_mask [B,P], response_tokens [B,N], response_mask [B,N])
-> [B]``, called once per batch: a *jittable* one is written in ``jnp`` and runs inside the jitted RL step,
a *host* one gets NumPy arrays and returns NumPy. :class:`TokenFunctionOracle` gives it the oracle's text
form too (it encodes the texts with a tokenizer), so it serves as the demo's gold reward as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.oracle.base import Oracle, check_text_batch, check_token_batch

TokenRewardFn = Callable[[Any, Any, Any, Any], Any]


class TokenFunctionOracle(Oracle):
    """An oracle around a token reward ``fn`` (see the module docstring).

    ``jittable``: ``fn`` is pure ``jnp`` and may be traced by ``jax.jit``. ``tokenizer`` is needed only by
    the text form, which encodes each prompt (left-padded) and response (right-padded, with eos when it
    finished; no other special tokens) and calls ``fn`` on the batch.
    """

    def __init__(self, fn: TokenRewardFn, jittable: bool = False, tokenizer: Any = None,
                 name: str | None = None):
        if not callable(fn):
            raise TypeError(f"TokenFunctionOracle needs a callable fn(prompt_tokens, prompt_mask, "
                            f"response_tokens, response_mask) -> [B], got {fn!r}")
        self.fn, self.jittable, self.tokenizer = fn, bool(jittable), tokenizer
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def score_tokens(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> jax.Array:
        arrays = (prompt_tokens, prompt_mask, response_tokens, response_mask)
        if self.jittable:
            return jnp.asarray(self.fn(*arrays), jnp.float32)
        if any(isinstance(a, jax.core.Tracer) for a in arrays):
            raise TypeError(f"reward {self.name!r} is a host function and cannot be traced by jax.jit; mark "
                            "it jittable (written in jnp) or call it outside jit, once per batch")
        check_token_batch(*arrays)
        scores = np.asarray(self.fn(*(np.asarray(a) for a in arrays)), np.float32)
        if scores.shape != (np.shape(prompt_tokens)[0],):
            raise ValueError(f"reward {self.name!r} returned shape {scores.shape}, expected "
                             f"({np.shape(prompt_tokens)[0]},)")
        return scores

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str],
                    finished: Sequence[bool] | None = None) -> np.ndarray:
        finished = check_text_batch(prompts, responses, finished)
        if self.tokenizer is None:
            raise ValueError(f"reward {self.name!r} works on token arrays: scoring texts needs a tokenizer")
        tok = self.tokenizer
        encode = lambda text: list(tok.encode(text, add_special_tokens=False))
        prompt_ids = [encode(p) for p in prompts]
        response_ids = [encode(r) + ([tok.eos_token_id] if done else [])
                        for r, done in zip(responses, finished)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        p = max(1, *(len(ids) for ids in prompt_ids))
        n = max(1, *(len(ids) for ids in response_ids))
        arrays = [np.full((len(prompts), width), pad, np.int32) for width in (p, p, n, n)]
        arrays[1][:] = arrays[3][:] = 0
        for b, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
            if prompt:
                arrays[0][b, p - len(prompt):], arrays[1][b, p - len(prompt):] = prompt, 1
            arrays[2][b, :len(response)], arrays[3][b, :len(response)] = response, 1
        return np.asarray(self.score_tokens(*arrays), np.float32)


def length_reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
    """r = Σ_t m_t / N: the share of the maximum response length used. Jittable."""
    del prompt_tokens, prompt_mask, response_tokens
    m = jnp.asarray(response_mask).astype(jnp.float32)
    return jnp.sum(m, axis=1) / m.shape[1]


def token_count_reward(token_id: int) -> TokenRewardFn:
    """r = Σ_t m_t·[y_t = token_id] / Σ_t m_t: the share of response tokens equal to ``token_id`` (0 for an
    empty response). Jittable."""

    def reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
        del prompt_tokens, prompt_mask
        m = jnp.asarray(response_mask).astype(jnp.float32)
        hits = jnp.sum((jnp.asarray(response_tokens) == token_id) * m, axis=1)
        return hits / jnp.maximum(jnp.sum(m, axis=1), 1.0)

    return reward

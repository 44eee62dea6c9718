"""Jitted generation: one prefill over the left-padded prompts, then a ``lax.while_loop`` decode over a
preallocated KV cache. No Python runs per token.

The log-prob returned for each sampled token is ``log softmax(logits / T)[token]`` computed by
:func:`jaxrlhf.rl.token_logprobs`, the same function and the same positions/mask a fresh forward pass over
the finished sequence uses, so the PPO ratio is 1 before the first update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.models.transformer import LanguageModel, Params, positions_from_mask
from jaxrlhf.rl.policy_losses import token_logprobs
from jaxrlhf.rollout.sampling import SamplingConfig, sample_tokens


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Lengths, stopping and sampling of :func:`generate` (frozen: a static jit argument).

    Tokens are sampled until ``max_new_tokens`` or a token in ``stop_token_ids`` (kept in the response and
    its mask); stop tokens are suppressed before ``min_new_tokens``. Finished rows are filled with
    ``pad_token_id`` and masked out.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        self.sampling  # noqa: B018 - validates the sampling fields

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.greedy)


class Rollout(NamedTuple):
    """Output of :func:`generate`. P = prompt length, N = max_new_tokens.

    sequences [B, P+N]: prompt then response. sequence_mask [B, P+N]: real tokens (prompt and response).
    response_tokens / response_mask / logprobs [B, N]: the sampled tokens (pad after a stop token), 1 up to
    and including the stop token, and their log-probs under the tempered distribution (0 where masked).
    stopped [B]: whether a stop token was produced.
    """

    sequences: jax.Array
    sequence_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    stopped: jax.Array


class _Loop(NamedTuple):
    step: jax.Array
    token: jax.Array  # [B] last sampled token
    done: jax.Array  # [B]
    cache: object
    tokens: jax.Array  # [B, N]
    mask: jax.Array  # [B, N]
    logprobs: jax.Array  # [B, N]


@functools.partial(jax.jit, static_argnames=("model", "config"))
def generate(
    model: LanguageModel,
    params: Params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    config: GenerationConfig,
) -> Rollout:
    """Sample responses to a left-padded prompt batch ``prompt_tokens``/``prompt_mask`` [B, P].

    Compiles once per (B, P, config); new prompts and a new key reuse the compiled program.
    """
    batch, prompt_len = prompt_tokens.shape
    n = config.max_new_tokens
    sampling = config.sampling
    stop_ids = jnp.asarray(config.stop_token_ids or (-1,), jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    # Columns of future tokens are marked real; causality hides them until they are written.
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, n), jnp.int32)], axis=1)
    first_position = jnp.sum(prompt_mask, axis=1)  # [B] position of the first response token

    def choose(step, logits, key, done):
        """Sample the token at response index ``step`` from next-token ``logits`` [B, V]."""
        allowed = logits
        if config.min_new_tokens > 0 and config.stop_token_ids:
            blocked = jnp.zeros(logits.shape[-1], bool).at[stop_ids].set(True)
            allowed = jnp.where((step < config.min_new_tokens) & blocked, -jnp.inf, logits)
        token = sample_tokens(jax.random.fold_in(key, step), allowed, sampling)
        # The log-prob comes from the unfiltered tempered distribution, as in every training forward pass.
        logprob = token_logprobs(logits, token, sampling.temperature)
        token = jnp.where(done, config.pad_token_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        return token, logprob, done | jnp.isin(token, stop_ids)

    def record(loop: _Loop, step, token, logprob, done) -> _Loop:
        col = lambda arr, value: jax.lax.dynamic_update_slice(
            arr, value[:, None].astype(arr.dtype), (0, step)
        )
        return loop._replace(
            step=step,
            token=token,
            tokens=col(loop.tokens, token),
            mask=col(loop.mask, ~loop.done),
            logprobs=col(loop.logprobs, logprob),
            done=done,
        )

    # PREFILL: the whole prompt in one pass; only the last column's logits are needed.
    cache = model.init_cache(batch, prompt_len + n)
    hidden, cache = model.forward(params, prompt_tokens, positions_from_mask(prompt_mask), cache_mask, cache)
    logits = model.logits(params, hidden[:, -1])
    no = jnp.zeros((batch,), bool)
    token, logprob, done = choose(0, logits, key, no)
    loop = _Loop(
        jnp.int32(0),
        token,
        no,
        cache,
        jnp.full((batch, n), config.pad_token_id, jnp.int32),
        jnp.zeros((batch, n), jnp.int32),
        jnp.zeros((batch, n), jnp.float32),
    )
    loop = record(loop, 0, token, logprob, done)

    # DECODE: feed the last token, sample the next, until every row stopped or N tokens exist.
    def body(loop: _Loop) -> _Loop:
        step = loop.step + 1
        positions = (first_position + loop.step)[:, None]
        hidden, cache = model.forward(params, loop.token[:, None], positions, cache_mask, loop.cache)
        token, logprob, done = choose(step, model.logits(params, hidden[:, 0]), key, loop.done)
        return record(loop._replace(cache=cache), step, token, logprob, done)

    def cond(loop: _Loop) -> jax.Array:
        return (loop.step + 1 < n) & ~jnp.all(loop.done)

    loop = jax.lax.while_loop(cond, body, loop)
    response_mask = loop.mask
    return Rollout(
        sequences=jnp.concatenate([prompt_tokens.astype(jnp.int32), loop.tokens], axis=1),
        sequence_mask=jnp.concatenate([prompt_mask, response_mask], axis=1),
        response_tokens=loop.tokens,
        response_mask=response_mask,
        logprobs=loop.logprobs,
        stopped=loop.done if config.stop_token_ids else jnp.zeros((batch,), bool),
    )

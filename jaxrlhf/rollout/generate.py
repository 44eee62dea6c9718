"""Jitted generation: one prefill over the left-padded prompts, then a ``lax.while_loop`` decode over a
preallocated KV cache. No Python runs per token.

Log-probs. Each sampled token's log-prob is that of the distribution it was drawn from (the behaviour
policy's). Without filtering that is ``log softmax(logits / T)[token]``, computed by
:func:`jaxrlhf.rl.token_logprobs` (the same function, positions and mask a fresh forward pass over the
finished sequence uses), so the PPO ratio is 1 before the first update. With top-k, top-p or
``min_new_tokens`` the token was drawn from the tempered logits with the excluded tokens removed and the rest
renormalised, ``log softmax(filtered(logits / T))[token]``, which is *not* what a fresh forward pass
computes: it is larger by −log(kept mass). On-policy RL should therefore not sample with filters (its
ratio would read 1 while the update is off-policy).

Group sampling. With ``group_size`` n each prompt is prefilled once and its KV cache copied to n rows
(rows ``i·n … i·n + n − 1`` belong to prompt i), then the B·n rows decode as a batch of B·n: a group's
responses are independent samples, each row drawing its own uniforms, and equal, row for row, what
generating from the n-times repeated prompts with the same key gives.

Value guidance (``guidance``, :mod:`jaxrlhf.rollout.guidance`): every step's distribution is tilted by
learned Q values, π_β(a|s) ∝ π_base(a|s)·exp(β·Q(s, a)), π_base the tempered and filtered distribution the
unguided sampler would use; tokens are drawn (or, greedy, arg-maxed) from π_β inside the loop, their
log-probs are log π_β, and ``Rollout.kl`` sums the exact per-step KL(π_β ‖ π_base) over each response.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.config import is_whole_number
from jaxrlhf.models.heads import HeadParams, head_apply
from jaxrlhf.models.transformer import LanguageModel, Params, positions_from_mask
from jaxrlhf.rl.policy_losses import token_logprobs
from jaxrlhf.rollout.guidance import ValueGuidance, guided_step
from jaxrlhf.rollout.sampling import SamplingConfig, inverse_cdf_sample, sampling_logits


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Lengths, stopping, sampling and grouping of :func:`generate` (frozen: a static jit argument).

    Tokens are sampled until ``max_new_tokens`` or a token in ``stop_token_ids`` (kept in the response and
    its mask); stop tokens are suppressed before ``min_new_tokens``. Finished rows are filled with
    ``pad_token_id`` and masked out. ``group_size`` n: n responses per prompt from one prefill.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        for key, ids in (("stop_token_ids", self.stop_token_ids), ("pad_token_id", (self.pad_token_id,))):
            bad = [i for i in ids if not is_whole_number(i) or i < 0]
            if bad:
                raise ValueError(f"{key}: token ids must be whole numbers >= 0, got {bad[0]!r}")
        self.sampling  # noqa: B018 - validates the sampling fields

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.greedy)

    @property
    def filtered(self) -> bool:
        """Whether tokens are drawn from a filtered distribution (top-k, top-p, or stop tokens blocked
        by ``min_new_tokens``), so that the returned log-probs differ from a fresh forward pass's."""
        blocks_stops = self.min_new_tokens > 0 and bool(self.stop_token_ids)
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or blocks_stops)


class Rollout(NamedTuple):
    """Output of :func:`generate`. P = prompt length, N = max_new_tokens, R = B · group_size rows.

    sequences [R, P+N]: prompt then response. sequence_mask [R, P+N]: real tokens (prompt and response).
    response_tokens / response_mask / logprobs [R, N]: the sampled tokens (pad after a stop token), 1 up to
    and including the stop token, and their log-probs under the distribution they were sampled from
    (module docstring; 0 where masked). stopped [R]: whether a stop token was produced. kl [R]: with value
    guidance, Σ_t KL(π_β(·|s_t) ‖ π_base(·|s_t)) over the response's steps (exact per step); 0 without.
    """

    sequences: jax.Array
    sequence_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    stopped: jax.Array
    kl: jax.Array | None = None
    # With a value head (``generate(..., value_head=…)``): the value of the state before each response token
    # [R, N] (0 where masked) and of the state after the last column [R], read off the decode steps' hidden
    # states, so an actor-critic with a shared critic needs no separate forward pass for them.
    values: jax.Array | None = None
    bootstrap_values: jax.Array | None = None


class _Loop(NamedTuple):
    step: jax.Array
    token: jax.Array  # [R] last sampled token
    done: jax.Array  # [R]
    cache: object
    tokens: jax.Array  # [R, N]
    mask: jax.Array  # [R, N]
    logprobs: jax.Array  # [R, N]
    kl: jax.Array  # [R] KL to the base policy so far (value guidance)
    values: jax.Array | None  # [R, N] value of the state before each token (with a value head)


def check_lengths(model: LanguageModel, prompt_length: int, config: GenerationConfig) -> None:
    """Raise when prompt + new tokens need more positions than a learned position table holds, or a stop or
    pad id is not in the model's vocabulary."""
    cfg = model.config
    for key, ids in (("stop_token_ids", config.stop_token_ids), ("pad_token_id", (config.pad_token_id,))):
        outside = [i for i in ids if i >= cfg.vocab_size]
        if outside:
            raise ValueError(f"generate: {key} {outside[0]} is not a token of the model (vocab_size "
                             f"{cfg.vocab_size}), so it could never be produced")
    total = prompt_length + config.max_new_tokens
    if cfg.position_encoding == "learned" and total > cfg.max_position_embeddings:
        raise ValueError(
            f"generate: prompt length {prompt_length} + max_new_tokens {config.max_new_tokens} = {total} "
            f"exceeds the model's learned position table (max_position_embeddings="
            f"{cfg.max_position_embeddings})"
        )


def repeat_rows(tree, n: int):
    """Each row of every [B, ...] leaf repeated n times in place: rows i·n … i·n + n − 1 copy row i."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree) if n > 1 else tree


def _repeat_cache_rows(cache, n: int):
    """The cache's batch axis (axis 0 of a per-layer buffer, axis 1 of a stacked one) repeated n times."""
    if n == 1:
        return cache
    axis = 0 if isinstance(cache.keys, (tuple, list)) else 1
    rep = lambda x: jnp.repeat(x, n, axis=axis)
    return cache._replace(keys=jax.tree.map(rep, cache.keys), values=jax.tree.map(rep, cache.values))


class Prefill(NamedTuple):
    """What :func:`prefill` hands to the decode loop, for R = B · group_size rows."""

    logits: jax.Array  # [R, V] float32 next-token logits after the prompt
    cache: object  # KVCache with the prompt's P columns written, in the decode loop's layout
    cache_mask: jax.Array  # [R, P+N] the prompt mask, then ones for the response columns
    params: Params  # the params in the decode loop's layout (LanguageModel.decode_params)
    hidden: jax.Array | None = None  # [R, d] the last prompt column's hidden state (for value guidance)


def prefill(
    model: LanguageModel,
    params: Params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    config: GenerationConfig,
) -> Prefill:
    """One forward pass over each left-padded prompt [B, P]; its last-column logits and its KV cache are then
    copied to the prompt's ``group_size`` rows (rows i·n … i·n + n − 1 for prompt i). Jittable.

    FLOPs: a prefill of B rows, not B · n; the copies cost one write of the R-row cache.
    """
    num_prompts, prompt_len = prompt_tokens.shape
    check_lengths(model, prompt_len, config)
    group, n = config.group_size, config.max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.int32)
    # Columns of future tokens are marked real; causality hides them until they are written.
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((num_prompts, n), jnp.int32)], axis=1)
    # Weights in the compute dtype once, outside the decode loop.
    params = model.cast_params(params)
    hidden, cache = model.prefill(params, prompt_tokens.astype(jnp.int32), positions_from_mask(prompt_mask),
                                  prompt_mask, prompt_len + n)
    logits = repeat_rows(model.logits(params, hidden[:, -1]), group)
    # The prompt's cache, in the decode loop's layout, copied to the group's rows.
    cache = _repeat_cache_rows(cache, group)
    return Prefill(logits, cache, repeat_rows(cache_mask, group), model.decode_params(params),
                   repeat_rows(hidden[:, -1], group))


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _generate(
    model: LanguageModel,
    params: Params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    config: GenerationConfig,
    guidance: ValueGuidance | None = None,
    value_head: HeadParams | None = None,
) -> Rollout:
    """Sample ``config.group_size`` responses to each prompt of a left-padded batch
    ``prompt_tokens``/``prompt_mask`` [B, P]; returns B · group_size rows, prompt-major.

    ``guidance``: value-guided decoding (module docstring); its β is an array, so a new β reuses the
    compiled program. ``value_head``: a value head on the policy's backbone; the rollout then carries the
    values of every response state (``Rollout.values``, ``Rollout.bootstrap_values``), the head applied to
    the hidden states the decode steps compute anyway (plus one step over the last token for the final
    state). They equal a fresh forward pass's up to float rounding (the cache changes the summation order).

    Compiles once per (B, P, config); new prompts and a new key reuse the compiled program. Raises
    ValueError (while tracing) when P + max_new_tokens exceeds a learned position table.
    """
    num_prompts, prompt_len = prompt_tokens.shape
    group = config.group_size
    batch = num_prompts * group
    n = config.max_new_tokens
    sampling = config.sampling
    stop_ids = jnp.asarray(config.stop_token_ids or (-1,), jnp.int32)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    # PREFILL: each prompt once; only the last column's logits are needed.
    logits, cache, cache_mask, params, hidden = prefill(model, params, prompt_tokens, prompt_mask, config)
    first_position = jnp.sum(cache_mask[:, :prompt_len], axis=1)  # [R] position of the first response token

    @jax.named_scope("sampling")  # a region of jaxrlhf.op_profile
    def choose(step, logits, hidden, key, done):
        """Sample the token at response index ``step`` from next-token ``logits`` [R, V] (and, guided, the
        step's ``hidden`` [R, d]); returns (token, log-prob, done, KL to the base policy)."""
        allowed = logits
        if config.min_new_tokens > 0 and config.stop_token_ids:
            blocked = jnp.zeros(logits.shape[-1], bool).at[stop_ids].set(True)
            allowed = jnp.where((step < config.min_new_tokens) & blocked, -jnp.inf, logits)
        step_key = jax.random.fold_in(key, step)
        kl = jnp.zeros(logits.shape[:1], jnp.float32)
        if guidance is not None:
            # The base is what the unguided sampler draws from: tempered and filtered.
            guided, kl = guided_step(sampling_logits(allowed, sampling), hidden, guidance)
            if sampling.greedy:
                token = jnp.argmax(guided, axis=-1).astype(jnp.int32)
            else:
                token = inverse_cdf_sample(step_key, guided)
            logprob = token_logprobs(guided, token)
        elif sampling.greedy:
            token = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
            logprob = token_logprobs(logits, token, sampling.temperature)
        elif config.filtered:
            # The behaviour distribution: tempered, filtered, renormalised (see the module docstring).
            filtered = sampling_logits(allowed, sampling)
            token = inverse_cdf_sample(step_key, filtered)
            logprob = token_logprobs(filtered, token)
        else:
            token = inverse_cdf_sample(step_key, sampling_logits(logits, sampling))
            logprob = token_logprobs(logits, token, sampling.temperature)
        token = jnp.where(done, config.pad_token_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        kl = jnp.where(done, 0.0, kl)
        return token, logprob, done | jnp.isin(token, stop_ids), kl

    def record(loop: _Loop, step, token, logprob, done, kl, hidden) -> _Loop:
        col = lambda arr, value: jax.lax.dynamic_update_slice(
            arr, value[:, None].astype(arr.dtype), (0, step)
        )
        values = loop.values
        if value_head is not None:  # the state the token was sampled in; 0 once the row has stopped
            values = col(values, jnp.where(loop.done, 0.0, head_apply(value_head, hidden)))
        return loop._replace(
            step=step,
            token=token,
            tokens=col(loop.tokens, token),
            mask=col(loop.mask, ~loop.done),
            logprobs=col(loop.logprobs, logprob),
            done=done,
            kl=loop.kl + kl,
            values=values,
        )

    no = jnp.zeros((batch,), bool)
    token, logprob, done, kl = choose(0, logits, hidden, key, no)
    loop = _Loop(
        jnp.int32(0),
        token,
        no,
        cache,
        jnp.full((batch, n), config.pad_token_id, jnp.int32),
        jnp.zeros((batch, n), jnp.int32),
        jnp.zeros((batch, n), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        None if value_head is None else jnp.zeros((batch, n), jnp.float32),
    )
    loop = record(loop, 0, token, logprob, done, kl, hidden)

    def feed_last_token(loop: _Loop):
        """One decode step, the last sampled token at its position: (hidden [R, d], cache)."""
        positions = (first_position + loop.step)[:, None]
        hidden, cache = model.forward(params, loop.token[:, None], positions, cache_mask, loop.cache)
        return hidden[:, 0], cache

    # DECODE: feed the last token, sample the next, until every row stopped or N tokens exist.
    def body(loop: _Loop) -> _Loop:
        step = loop.step + 1
        hidden, cache = feed_last_token(loop)
        token, logprob, done, kl = choose(step, model.logits(params, hidden), hidden, key, loop.done)
        return record(loop._replace(cache=cache), step, token, logprob, done, kl, hidden)

    def cond(loop: _Loop) -> jax.Array:
        return (loop.step + 1 < n) & ~jnp.all(loop.done)

    with jax.named_scope("decode_loop"):  # found by name in the compiled program (rollout.loop_copies)
        loop = jax.lax.while_loop(cond, body, loop)
    response_mask = loop.mask
    bootstrap = None
    if value_head is not None:
        # The state after the last column: one more step, when some row ran to n tokens without stopping
        # (only those are bootstrapped); zeros when every row stopped, and for the rows that did.
        truncated = ~loop.done & (loop.step + 1 == n)
        values = jax.lax.cond(jnp.any(truncated), lambda: head_apply(value_head, feed_last_token(loop)[0]),
                              lambda: jnp.zeros(truncated.shape, jnp.float32))
        bootstrap = jnp.where(truncated, values, 0.0)
    return Rollout(
        sequences=jnp.concatenate([repeat_rows(prompt_tokens, group), loop.tokens], axis=1),
        sequence_mask=jnp.concatenate([repeat_rows(prompt_mask, group), response_mask], axis=1),
        response_tokens=loop.tokens,
        response_mask=response_mask,
        logprobs=loop.logprobs,
        stopped=loop.done if config.stop_token_ids else jnp.zeros((batch,), bool),
        kl=loop.kl,
        values=loop.values,
        bootstrap_values=bootstrap,
    )


def check_left_padded(prompt_mask: np.ndarray, where: str = "generate") -> None:
    """A ValueError naming the first row whose mask has a 0 after a 1 (right padding, or a hole): the
    rollout reads the last column as each prompt's last token, so such a row would be continued from
    padding, silently."""
    mask = np.asarray(prompt_mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"{where}: prompt_mask must be [batch, prompt_len], got shape {mask.shape}")
    holes = ~mask[:, 1:] & mask[:, :-1]  # a real token followed by padding
    if holes.any():
        row, col = (int(i[0]) for i in np.nonzero(holes))
        raise ValueError(f"{where}: prompt_mask row {row} is not left-padded (a 0 at column {col + 1} after "
                         "a 1): pad prompts on the left (a tokenizer's padding_side='left')")


class _Generate:
    """:func:`_generate` (jitted), checking a host (NumPy) ``prompt_mask`` for left padding first: free,
    unlike a device array's check, which would wait for the device. Traced calls (inside another jit or
    vmap) and ``generate.lower(...)`` go straight to the jitted function."""

    def __init__(self, jitted):
        self._jitted = jitted
        functools.update_wrapper(self, jitted)

    def __call__(self, model, params, prompt_tokens, prompt_mask, *args, **kwargs) -> Rollout:
        if isinstance(prompt_mask, np.ndarray):
            check_left_padded(prompt_mask)
        return self._jitted(model, params, prompt_tokens, prompt_mask, *args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jitted.lower(*args, **kwargs)

    def __getattr__(self, name: str):  # the rest of the jitted function's API (_cache_size, eval_shape, …)
        return getattr(self._jitted, name)


generate = _Generate(_generate)

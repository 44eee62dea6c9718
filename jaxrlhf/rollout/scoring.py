"""Scoring passes over finished sequences (prompt left-padded to P, response right-padded to N).

One full forward pass gives everything the RL losses need: the response tokens' log-probs (policy and
reference), per-token values, and a sequence reward. Column conventions, with c = P + j for response
token j:

- the token at column c is predicted by the logits at column c − 1;
- the value of the state *before* response token j is read at column c − 1, so ``values[:, j]`` pairs with
  ``logprobs[:, j]``; the state after the last column (``P + N − 1``) gives the bootstrap value of a
  truncated response.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.models.heads import HeadParams, head_apply, sequence_reward
from jaxrlhf.models.transformer import LanguageModel, Params, positions_from_mask
from jaxrlhf.rl.policy_losses import token_logprobs


def response_hidden(
    model: LanguageModel, params: Params, sequences: jax.Array, sequence_mask: jax.Array, prompt_length: int
) -> jax.Array:
    """Final hidden states at columns P−1 … P+N−1: the N states before each response token plus the final
    state. [B, N+1, d]."""
    hidden, _ = model.forward(params, sequences, positions_from_mask(sequence_mask), sequence_mask)
    return hidden[:, prompt_length - 1 :]


def response_logits(model: LanguageModel, params: Params, hidden: jax.Array) -> jax.Array:
    """Next-token logits for the N response tokens from :func:`response_hidden`'s output. [B, N, V]."""
    return model.logits(params, hidden[:, :-1])


def response_logprobs(
    model: LanguageModel,
    params: Params,
    sequences: jax.Array,
    sequence_mask: jax.Array,
    prompt_length: int,
    temperature: float = 1.0,
) -> jax.Array:
    """``log softmax(logits/T)`` of each response token, 0 where the response is masked. [B, N]."""
    hidden = response_hidden(model, params, sequences, sequence_mask, prompt_length)
    logits = response_logits(model, params, hidden)
    lp = token_logprobs(logits, sequences[:, prompt_length:], temperature)
    return jnp.where(sequence_mask[:, prompt_length:] > 0, lp, 0.0)


def response_values(value_head: HeadParams, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Values of the states before each response token [B, N], and of the final state [B] (bootstrap)."""
    v = head_apply(value_head, hidden)
    return v[:, :-1], v[:, -1]


def sequence_scores(
    model: LanguageModel,
    params: Params,
    reward_head: HeadParams,
    sequences: jax.Array,
    sequence_mask: jax.Array,
) -> jax.Array:
    """A reward model's score of each full sequence, read at its last real token. [B]."""
    hidden, _ = model.forward(params, sequences, positions_from_mask(sequence_mask), sequence_mask)
    return sequence_reward(reward_head, hidden, sequence_mask)

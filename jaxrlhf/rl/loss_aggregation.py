"""How a per-token loss ℓ[b, t] over a batch of responses becomes one scalar (a named option of every
policy loss).

With mask m[b, t] (1 on the response's tokens, 0 on padding), L_b = Σ_t m[b, t] (the length of row b):

- "token_mean" (DAPO, Yu et al. 2025; the default, as TRL's PPO): Σ_{b,t} m·ℓ / Σ_{b,t} m. Every token
  of the batch weighs the same, so a long response carries more weight than a short one.
- "sequence_mean" (GRPO, Shao et al. 2024): (1/B')·Σ_b (Σ_t m·ℓ / L_b) over the B' rows with L_b > 0.
  Every response weighs the same, so a token of a short response weighs more than one of a long
  response (the length bias Dr. GRPO points out: short correct answers are reinforced more strongly,
  long wrong ones penalised less per token).
- "token_sum_norm" (Dr. GRPO, Liu et al. 2025): Σ_{b,t} m·ℓ / C with a constant C (default the size of
  the mask, B·T, i.e. batch × maximum length). No per-response length normalisation: a token weighs
  1/C whatever the length of its response, and the normaliser does not depend on the batch's lengths.

"Sequence" is the last axis: ℓ and m are [..., T]; sequence_mean averages over every leading index.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from jaxrlhf.rl.masked import masked_mean, masked_sum

LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum_norm")


def check_loss_agg(loss_agg: str, where: str = "loss_agg") -> None:
    """ValueError naming `where` unless `loss_agg` is one of LOSS_AGGREGATIONS."""
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(
            f"{where}: unknown loss aggregation {loss_agg!r}; expected one of {LOSS_AGGREGATIONS}"
        )


def aggregate_loss(
    per_token: chex.Array,
    mask: chex.Array,
    loss_agg: str = "token_mean",
    norm_constant: chex.Numeric | None = None,
) -> chex.Array:
    """One scalar from a per-token loss [..., T] by `loss_agg` (see the module docstring).

    norm_constant: C for "token_sum_norm" (None → mask.size); ignored by the other two. An empty mask
    gives 0 under every aggregation.
    """
    check_loss_agg(loss_agg)
    chex.assert_equal_shape([per_token, mask])
    if loss_agg == "token_mean":
        return masked_mean(per_token, mask)
    if loss_agg == "sequence_mean":
        lengths = jnp.sum(jnp.asarray(mask).astype(jnp.float32), axis=-1)  # [...]
        per_sequence = masked_mean(per_token, mask, axis=-1)  # 0 for an empty row
        return masked_mean(per_sequence, lengths > 0)
    constant = mask.size if norm_constant is None else norm_constant
    return masked_sum(per_token, mask) / constant

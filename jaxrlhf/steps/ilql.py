"""ILQL as a training step: token-level Q and V heads on the LM backbone, learned offline from rated sequences
(Implicit Language Q-Learning, Snell et al. 2022; the losses are :func:`jaxrlhf.rl.ilql.ilql_loss`).

Batch (``jaxrlhf.data.rating_batch``): ``tokens, mask, loss_mask`` [B, L] (prompt left-padded, response
right-padded, loss_mask on the response's tokens), ``ratings`` [B] float32, optionally ``row_mask`` [B].
Time runs over the L − 1 next-token positions: the state s_t is the prefix up to column t (its hidden state
h_t), the action a_t = tokens[:, t+1], taken where loss_mask[:, t+1] is 1; the reward is the rating at the
last response token and 0 elsewhere, and the state after it is terminal.

State: a :class:`~jaxrlhf.steps.state.TrainState` over :class:`~jaxrlhf.steps.params.ILQLParams`, built by
:func:`create_ilql_state`. The optimiser given to :func:`make_ilql_step` and :func:`create_ilql_state` is
wrapped by :func:`ilql_optimizer` so that it updates the online Q heads, the V head and (unless
``freeze_backbone``) the backbone, and nothing else: the target Q heads move only by the Polyak update
θ̂ ← (1 − ρ)·θ̂ + ρ·θ that follows every applied update, inside the step (a skipped, non-finite update moves
neither).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.heads import head_apply, init_value_head
from jaxrlhf.models.q_heads import init_q_head, q_head_apply
from jaxrlhf.models.transformer import LanguageModel, Params, positions_from_mask
from jaxrlhf.rl.ilql import ilql_loss, polyak_update
from jaxrlhf.rl.masked import masked_count, masked_mean
from jaxrlhf.rl.policy_losses import token_logprobs
from jaxrlhf.steps.accumulate import accumulate_gradients
from jaxrlhf.steps.guard import all_finite, update_if
from jaxrlhf.steps.optim import current_learning_rate
from jaxrlhf.steps.params import ILQLParams
from jaxrlhf.steps.state import TrainState, apply_gradients, create_train_state

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
BATCH_KEYS = ("tokens", "mask", "loss_mask", "ratings")
ILQL_METRICS = ("loss/ilql", "loss/q", "loss/v", "loss/cql", "loss/bc", "q/mean", "q/target", "v/mean",
                "td/target", "td/error")


@dataclasses.dataclass(frozen=True)
class ILQLConfig:
    """ILQL's hyper-parameters (``ilql`` section of ``jaxrlhf ilql``; the loss terms are those of
    :func:`jaxrlhf.rl.ilql.ilql_loss`)."""

    gamma: float = 0.99  # γ: discount of V(s_{t+1}) in the TD target r_t + γ·V(s_{t+1})
    expectile: float = 0.7  # τ of V's expectile regression towards min_h Q̂_h(s, a): > ½ leans to max_a Q
    cql_weight: float = 0.01  # α: weight of the conservative term logsumexp_a Q(s, a) − Q(s, a_t)
    target_update_rate: float = 0.01  # ρ of the Polyak update θ̂ ← (1 − ρ)·θ̂ + ρ·θ after every update
    num_q_heads: int = 2  # online Q heads (and as many target heads); targets use their minimum
    freeze_backbone: bool = False  # true: only the heads learn; the LM's params and its policy stay as given
    # λ_BC: weight of the LM's cross-entropy on the data's response tokens while the backbone trains (trlx's
    # awac_scale): the Q/V/CQL losses alone wear down the LM that is both the policy and the base that
    # value-guided decoding tilts. Unused with freeze_backbone.
    bc_weight: float = 1.0
    grad_accum_steps: int = 1  # micro-batches per update (the batch size must be divisible by it)

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"ILQLConfig.gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 < self.expectile < 1.0:
            raise ValueError(f"ILQLConfig.expectile must be in (0, 1), got {self.expectile}")
        if not self.cql_weight >= 0.0:
            raise ValueError(f"ILQLConfig.cql_weight must be >= 0, got {self.cql_weight}")
        if not 0.0 <= self.bc_weight < float("inf"):
            raise ValueError(f"ILQLConfig.bc_weight must be a finite number >= 0, got {self.bc_weight}")
        if not 0.0 < self.target_update_rate <= 1.0:
            raise ValueError(
                f"ILQLConfig.target_update_rate must be in (0, 1], got {self.target_update_rate}")
        if self.num_q_heads < 1:
            raise ValueError(f"ILQLConfig.num_q_heads must be >= 1, got {self.num_q_heads}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"ILQLConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


def init_ilql_params(key: jax.Array, model: LanguageModel, lm: Params, cfg: ILQLConfig) -> ILQLParams:
    """ILQL's params on the backbone ``lm``: ``cfg.num_q_heads`` Q heads (W ~ N(0, 0.02²), independent
    keys), target heads equal to them, and a zero V head."""
    d, vocab = model.config.hidden_size, model.config.vocab_size
    q_heads = tuple(init_q_head(k, d, vocab) for k in jax.random.split(key, cfg.num_q_heads))
    return ILQLParams(lm, q_heads, init_value_head(d), jax.tree.map(jnp.copy, q_heads))


def ilql_optimizer(optimizer: optax.GradientTransformation, cfg: ILQLConfig) -> optax.GradientTransformation:
    """``optimizer`` on the trainable leaves (online Q heads, V head, and the backbone unless
    ``cfg.freeze_backbone``); a zero update, and no optimiser state, for the rest."""

    def labels(params: ILQLParams) -> ILQLParams:
        tag = lambda tree, label: jax.tree.map(lambda _: label, tree)
        lm = "frozen" if cfg.freeze_backbone else "train"
        return ILQLParams(tag(params.lm, lm), tag(params.q_heads, "train"), tag(params.v_head, "train"),
                          tag(params.target_q_heads, "frozen"))

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def create_ilql_state(params: ILQLParams, optimizer: optax.GradientTransformation,
                      cfg: ILQLConfig) -> TrainState:
    """A fresh :class:`TrainState` over ``params`` for :func:`make_ilql_step` (same optimizer and cfg)."""
    return create_train_state(params, ilql_optimizer(optimizer, cfg))


def ilql_inputs(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(actions a_t, mask m_t, rewards r_t), each [B, L − 1], of a rating batch (see the module docstring).

    a_t = tokens[:, t+1]; m_t = loss_mask[:, t+1]·row_mask; r_t = rating at the last t with m_t = 1, else 0.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"ILQL: batch has no {missing[0]!r}; keys are {sorted(batch)}")
    tokens, loss_mask, ratings = batch["tokens"], batch["loss_mask"], batch["ratings"]
    chex.assert_rank([tokens, loss_mask, ratings], [2, 2, 1])
    mask = loss_mask[:, 1:].astype(jnp.float32)
    if "row_mask" in batch:
        mask = mask * batch["row_mask"][:, None].astype(jnp.float32)
    cols = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, cols, -1), axis=1)  # −1: a row without response tokens
    rewards = jnp.where(cols[None, :] == last[:, None], ratings[:, None].astype(jnp.float32), 0.0)
    return tokens[:, 1:].astype(jnp.int32), mask, rewards


def ilql_outputs(model: LanguageModel, params: ILQLParams, tokens: jax.Array, mask: jax.Array,
                 freeze_backbone: bool = False
                 ) -> tuple[list[jax.Array], list[jax.Array], jax.Array, jax.Array]:
    """(online Q per head, target Q per head, V, hidden states), of the states s_0 … s_{L−2} of ``tokens``
    [B, L]: Q's [B, L − 1, V] float32, V [B, L − 1], hidden [B, L − 1, d]. The target heads are held
    constant (stop_gradient)."""
    hidden, _ = model.forward(params.lm, tokens, positions_from_mask(mask), mask)
    if freeze_backbone:
        hidden = jax.lax.stop_gradient(hidden)
    hidden = hidden[:, :-1]
    q = [q_head_apply(h, hidden) for h in params.q_heads]
    target_q = [q_head_apply(jax.lax.stop_gradient(h), hidden) for h in params.target_q_heads]
    return q, target_q, head_apply(params.v_head, hidden), hidden


def ilql_batch_loss(model: LanguageModel, cfg: ILQLConfig, params: ILQLParams,
                    batch: Batch) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
    """(L, (real tokens, metrics)) of one batch: ``ilql_loss`` over its response tokens, plus the LM's
    cross-entropy on them while the backbone trains: L = Σ_h L_TD,h + L_V + α·Σ_h L_CQL,h + λ_BC·L_BC,
    L_BC = mean_t −log π(a_t | s_t) (masked means over the response tokens; L_BC is reported as 0 when
    unused)."""
    actions, mask, rewards = ilql_inputs(batch)
    q, target_q, v, hidden = ilql_outputs(model, params, batch["tokens"], batch["mask"], cfg.freeze_backbone)
    loss, metrics = ilql_loss(q, target_q, v, actions, rewards, mask, gamma=cfg.gamma,
                              expectile=cfg.expectile, cql_weight=cfg.cql_weight)
    bc = jnp.zeros((), loss.dtype)
    if cfg.bc_weight > 0 and not cfg.freeze_backbone:
        bc = masked_mean(-token_logprobs(model.logits(params.lm, hidden), actions), mask)
        loss = loss + cfg.bc_weight * bc
    return loss, (masked_count(mask), {**metrics, "bc_loss": bc})


def _named(loss: jax.Array, m: Metrics, num_heads: int) -> Metrics:
    return {
        "loss/ilql": loss,
        "loss/q": m["td_loss"],
        "loss/v": m["v_loss"],
        "loss/cql": m["cql_loss"],
        "loss/bc": m["bc_loss"],
        "q/mean": m["q"],
        "q/target": m["target_q"],
        "v/mean": m["v"],
        "td/target": m["td_target"],
        # RMS of Q_h(s_t, a_t) − y_t over tokens and heads: L_TD is the sum over heads of mean squares.
        "td/error": jnp.sqrt(jnp.maximum(m["td_loss"], 0.0) / num_heads),
    }


def make_ilql_step(
    model: LanguageModel, optimizer: optax.GradientTransformation, cfg: ILQLConfig
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``step(state, batch, key) -> (state, metrics)``: one (guarded, optionally accumulated) update of
    ILQL's loss, then the Polyak update of the target Q heads. Pure and jittable.

    ``state`` comes from :func:`create_ilql_state` with the same ``optimizer`` and ``cfg``. Metrics: loss/ilql
    (L), loss/q (Σ_h TD loss), loss/v (expectile loss), loss/cql (Σ_h conservative term, before α), loss/bc
    (the LM's cross-entropy on the response tokens, before λ_BC; 0 when unused), q/mean
    (mean Q(s_t, a_t)), q/target (mean min_h Q̂_h(s_t, a_t)), v/mean, td/target (mean r_t + γ·V(s_{t+1})),
    td/error (RMS TD error per head, √(loss/q / H)), train/grad_norm (before clipping), train/skipped_updates
    (1 when the update was not finite and skipped), lr.
    """
    wrapped = ilql_optimizer(optimizer, cfg)

    def loss_fn(params: ILQLParams, batch: Batch):
        return ilql_batch_loss(model, cfg, params, batch)

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, Metrics]:
        del key  # no randomness: dropout is off in every model
        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, batch, cfg.grad_accum_steps)

        def update(state: TrainState) -> TrainState:
            state = apply_gradients(state, wrapped, grads)
            targets = polyak_update(state.params.target_q_heads, state.params.q_heads, cfg.target_update_rate)
            return state._replace(params=state.params._replace(target_q_heads=targets))

        ok = all_finite((loss, grads))
        state = update_if(ok, update, state)
        metrics = {
            **_named(loss, metrics, cfg.num_q_heads),
            "train/grad_norm": optax.tree.norm(grads),
            "train/skipped_updates": 1.0 - ok.astype(jnp.float32),
            "lr": current_learning_rate(state.opt_state),
        }
        return state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    return step


def make_ilql_eval(model: LanguageModel, cfg: ILQLConfig) -> Callable[[ILQLParams, Batch], Metrics]:
    """``eval(params, batch) -> metrics``: the step's loss metrics on a batch, no update, plus "tokens"
    (the real response tokens, to weigh batches)."""

    def evaluate(params: ILQLParams, batch: Batch) -> Metrics:
        loss, (tokens, metrics) = ilql_batch_loss(model, cfg, params, batch)
        out = {**_named(loss, metrics, cfg.num_q_heads), "tokens": tokens}
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)

    return evaluate

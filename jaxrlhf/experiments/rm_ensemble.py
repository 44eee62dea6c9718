"""Reward-model ensembles (Coste et al. 2024, "Reward model ensembles help mitigate overoptimization"):
K reward models trained as ONE vmapped computation, and their combinations as an RL reward.

Training: the K members share the SFT backbone's initial weights; member k gets its own reward-head
initialisation (key k) and, with ``bootstrap``, its own resample (with replacement) of the feedback records.
Every step stacks one batch per member ([K, B, ...]) and applies ``jax.vmap`` of the ordinary reward-model
step (:func:`jaxrlhf.steps.reward_model.make_reward_model_step`) to the stacked states: one jitted program,
not K runs.

Each member is normalised (r' = gain_k·r_k + bias_k, mean 0 and std 1) on the same fresh samples of the SFT
policy, so that min and variance compare members on one scale. For K normalised rewards r'_k of a response:

    mean:  R = (1/K)·Σ_k r'_k
    WCO:   R = min_k r'_k                                 (worst-case optimisation)
    UWO:   R = (1/K)·Σ_k r'_k − λ·(1/K)·Σ_k (r'_k − mean)²   (uncertainty-weighted optimisation)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.heads import init_reward_head
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl import RewardNormalization, fit_reward_normalization
from jaxrlhf.steps import RewardModelConfig, RewardModelParams, create_train_state, make_optimizer
from jaxrlhf.steps.reward_model import make_reward_model_eval, make_reward_model_step, make_reward_scorer

log = logging.getLogger("jaxrlhf")

COMBINATIONS = ("mean", "wco", "uwo")


def combine_rewards(rewards: chex.Array, combination: str, uwo_lambda: float = 0.5) -> chex.Array:
    """[K, B] normalised member rewards → [B] (formulas in the module docstring; the variance is the
    population one, ddof 0). Jittable."""
    chex.assert_rank(rewards, 2)
    if combination == "mean":
        return jnp.mean(rewards, axis=0)
    if combination == "wco":
        return jnp.min(rewards, axis=0)
    if combination == "uwo":
        return jnp.mean(rewards, axis=0) - uwo_lambda * jnp.var(rewards, axis=0)
    raise ValueError(f"combine_rewards: combination must be one of {COMBINATIONS}, got {combination!r}")


def stack_trees(trees: Sequence[Any]) -> Any:
    """K pytrees of one structure → one pytree with a leading [K] axis."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


@dataclasses.dataclass
class Ensemble:
    """K trained reward models: ``params`` stacked on a leading [K] axis, each member's normalisation
    (``gain`` [K], ``bias`` [K]) and its held-out metrics."""

    model: LanguageModel
    params: RewardModelParams
    gain: np.ndarray
    bias: np.ndarray
    eval_accuracy: list[float]
    seconds: float = 0.0

    @property
    def members(self) -> int:
        return int(self.gain.shape[0])

    def raw_scores(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """[K, B] raw rewards of [B, S] sequences (jittable)."""
        score = make_reward_scorer(self.model)
        return jax.vmap(score, in_axes=(0, None, None))(self.params, tokens, mask)

    def reward_function(self, combination: str, uwo_lambda: float) -> Callable[..., jax.Array]:
        """``fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]``: the combined
        normalised reward (a jittable token-array reward for ``reward.function`` / ``register_reward``)."""
        if combination not in COMBINATIONS:
            raise ValueError(f"ensemble combination must be one of {COMBINATIONS}, got {combination!r}")
        gain, bias = jnp.asarray(self.gain, jnp.float32), jnp.asarray(self.bias, jnp.float32)

        def reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
            tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
            mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
            normalized = gain[:, None] * self.raw_scores(tokens, mask) + bias[:, None]
            return combine_rewards(normalized, combination, uwo_lambda)

        reward.jittable = True
        return reward


def member_batches(
    num_examples: int, members: int, batch_size: int, steps: int, bootstrap: bool, seed: int
) -> np.ndarray:
    """[steps, K, batch_size] example indices: member k walks through its own shuffled resample (with
    replacement when ``bootstrap``, else a permutation of all examples), epoch after epoch."""
    rng = np.random.default_rng([seed, 17])
    out = np.empty((steps, members, batch_size), np.int64)
    for k in range(members):
        pool = rng.integers(0, num_examples, num_examples) if bootstrap else np.arange(num_examples)
        order = np.concatenate(
            [rng.permutation(pool) for _ in range(-(-steps * batch_size // num_examples) + 1)]
        )
        out[:, k] = order[: steps * batch_size].reshape(steps, batch_size)
    return out


def train_ensemble(
    model: LanguageModel,
    lm_params: Any,
    examples: Sequence[Any],
    held_out: Sequence[Any],
    collate: Callable[[Sequence[Any]], dict],
    members: int,
    steps: int,
    batch_size: int,
    optimizer_cfg: Any,
    rm_cfg: RewardModelConfig,
    bootstrap: bool,
    seed: int,
) -> Ensemble:
    """Train K = ``members`` reward models from ``lm_params`` as one vmapped computation (module
    docstring); normalisation left at gain 1, bias 0 (see :func:`normalize_members`)."""
    import time

    start = time.perf_counter()
    heads = [
        init_reward_head(jax.random.key(seed * 1000 + k), model.config.hidden_size) for k in range(members)
    ]
    params = stack_trees([RewardModelParams(lm_params, h) for h in heads])
    optimizer = make_optimizer(optimizer_cfg, steps)
    state = jax.vmap(lambda p: create_train_state(p, optimizer))(params)
    step = jax.jit(jax.vmap(make_reward_model_step(model, optimizer, rm_cfg)), donate_argnums=0)
    indices = member_batches(len(examples), members, batch_size, steps, bootstrap, seed)
    keys = jax.random.split(jax.random.key(seed), steps)
    metrics = {}
    for t in range(steps):
        batch = stack_trees([collate([examples[i] for i in indices[t, k]]) for k in range(members)])
        state, metrics = step(state, batch, jax.random.split(keys[t], members))
    accuracy = [float("nan")] * members
    if held_out:
        evaluate = jax.jit(jax.vmap(make_reward_model_eval(model, rm_cfg), in_axes=(0, None)))
        batch = {k: jnp.asarray(v) for k, v in collate(list(held_out)).items()}
        accuracy = [float(a) for a in np.asarray(evaluate(state.params, batch)["accuracy"])]
    log.info(
        "reward-model ensemble: %d members, %d steps, final train loss %s, held-out accuracy %s",
        members,
        steps,
        np.asarray(metrics.get("loss/reward", np.nan)).round(3),
        np.round(accuracy, 3),
    )
    return Ensemble(
        model, state.params, np.ones(members), np.zeros(members), accuracy, time.perf_counter() - start
    )


def normalize_members(
    ensemble: Ensemble, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 256
) -> Ensemble:
    """Each member's (gain, bias) from its raw rewards of the same [R, S] sequences (fresh samples of the
    SFT policy): mean 0, std 1 per member."""
    score = jax.jit(ensemble.raw_scores)
    raw = np.concatenate(
        [
            np.asarray(score(jnp.asarray(tokens[i : i + batch_size]), jnp.asarray(mask[i : i + batch_size])))
            for i in range(0, tokens.shape[0], batch_size)
        ],
        axis=1,
    )  # [K, R]
    norms = [fit_reward_normalization(jnp.asarray(r)) for r in raw]
    return dataclasses.replace(
        ensemble, gain=np.array([float(n.gain) for n in norms]), bias=np.array([float(n.bias) for n in norms])
    )


def member_normalization(ensemble: Ensemble, k: int) -> RewardNormalization:
    return RewardNormalization(jnp.float32(ensemble.gain[k]), jnp.float32(ensemble.bias[k]))

"""The pure stages of the pipeline, each a function of a key and of the stages before it:

    sft = stages.sft(key)                                        # SFTOutput
    feedback = stages.feedback(key, sft.params, hp.feedback)     # FeedbackData
    reward = stages.reward_model(key, sft.params, feedback)      # RewardOutput
    point = stages.evaluate(key, policy_lm, sft.params, reward)  # EvalPoint (per evaluation prompt)

Everything random comes from the key: the model's init and SFT batch order, which prompts the feedback
queries use, the SFT samples shown to the annotator and the annotator's noise, the reward model's head init
and batch order, the fresh samples its normalisation and its agreement with the oracle are measured on, and
the evaluation samples. The pools themselves are fixed arrays (:mod:`jaxrlhf.experiments.pipeline_data`).
Each stage is jittable and vmappable (over seeds, or over the traced hyper-parameters).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.experiments.pipeline_config import FeedbackHParams, PipelineConfig, reward_model_config
from jaxrlhf.experiments.pipeline_data import PipelineData
from jaxrlhf.models.heads import init_reward_head
from jaxrlhf.models.transformer import LanguageModel, Params
from jaxrlhf.oracle import (
    pairwise_preferences,
    plackett_luce_rankings,
    quantised_ratings,
    rollout_reward_inputs,
)
from jaxrlhf.rl import RewardNormalization, ensemble_reward, fit_reward_normalization, normalize_rewards
from jaxrlhf.rollout.generate import GenerationConfig, Rollout, generate
from jaxrlhf.rollout.scoring import response_logprobs
from jaxrlhf.steps import (
    RewardModelParams,
    SFTConfig,
    create_train_state,
    make_optimizer,
    make_reward_model_step,
    make_reward_scorer,
    make_sft_step,
    sequence_kl,
)
from jaxrlhf.steps.choice import choose

Metrics = dict[str, jax.Array]


class SFTOutput(NamedTuple):
    params: Params  # the SFT policy's LM
    metrics: Metrics  # per step [steps]: loss/sft, train/accuracy, train/grad_norm, ...


class FeedbackData(NamedTuple):
    """One row per query: ``batch`` holds the reward-model loss's keys (see ``steps.reward_model``);
    ``weights`` [Q] is 1 for a query the reward model may train on (0: a response without eos, two identical
    responses of a pair, a query beyond the budget used)."""

    batch: dict[str, jax.Array]
    weights: jax.Array
    metrics: Metrics  # feedback/finished, feedback/label_agreement, feedback/queries


class RewardOutput(NamedTuple):
    """K reward models (leading axis K = ``reward.ensemble``, also for K = 1), their normalisations, and
    metrics (per step [K, steps]; reward/oracle_agreement, the normalisation's gain and bias [K])."""

    params: RewardModelParams
    normalization: RewardNormalization
    metrics: Metrics


class EvalPoint(NamedTuple):
    """Per evaluation prompt [M] (means over its samples): gold and proxy reward, KL to the SFT policy
    (Σ over the response of log π − log π_sft, k1 on the policy's own samples), the share of optimal and
    of finished answers, and the response length in tokens."""

    gold: jax.Array
    proxy: jax.Array
    kl: jax.Array
    optimal: jax.Array
    finished: jax.Array
    length: jax.Array


def _rows(tree: Any, index: jax.Array) -> Any:
    return jax.tree.map(lambda x: x[index], tree)


def _order_agreement(gold: jax.Array, label_better: jax.Array, weight: jax.Array) -> jax.Array:
    """Share of the weighted comparisons (i judged above j) that the oracle orders the same way, pairs the
    oracle ties left out. gold_i, gold_j and weights broadcast to the pair shape."""
    untied = jnp.asarray(weight, jnp.float32) * (gold[..., 0] != gold[..., 1])
    agree = (gold[..., 0] > gold[..., 1]) == label_better
    total = jnp.sum(untied)
    return jnp.where(total > 0, jnp.sum(agree * untied) / jnp.where(total > 0, total, 1.0), jnp.nan)


class PipelineStages:
    """The stages of ``config`` over the fixed arrays of ``data`` (see the module docstring)."""

    def __init__(self, config: PipelineConfig, data: PipelineData, model: LanguageModel):
        self.config, self.data, self.model = config, data, model
        self.task = data.task
        self.oracle = data.task.oracle
        eos, pad, n = data.eos_id, data.pad_id, data.response_length
        self.eval_generation = GenerationConfig(max_new_tokens=n, temperature=config.rl.algorithm.temperature,
                                                stop_token_ids=(eos,), pad_token_id=pad)
        self.feedback_generation = GenerationConfig(max_new_tokens=n, temperature=config.feedback.temperature,
                                                    stop_token_ids=(eos,), pad_token_id=pad)
        self.reward_config = reward_model_config(config)
        self._score = make_reward_scorer(model)

    # ------------------------------------------------------------------------------------------ SFT
    def sft(self, key: jax.Array) -> SFTOutput:
        """A fresh LM (init from ``key``) trained on random batches of the demonstrations."""
        cfg = self.config.sft
        init_key, batch_key = jax.random.split(key)
        optimizer = make_optimizer(cfg.optimizer, cfg.steps)
        step = make_sft_step(self.model, optimizer, SFTConfig())
        demos = jax.tree.map(jnp.asarray, self.data.demonstrations)
        size = demos["tokens"].shape[0]

        def body(state, step_key):
            index = jax.random.choice(step_key, size, (cfg.batch_size,), replace=False)
            return step(state, _rows(demos, index), step_key)

        state = create_train_state(self.model.init(init_key), optimizer)
        state, metrics = jax.lax.scan(body, state, jax.random.split(batch_key, cfg.steps))
        return SFTOutput(state.params, metrics)

    # ------------------------------------------------------------------------------------- sampling
    def sample(self, params: Params, prompts: tuple[jax.Array, jax.Array], key: jax.Array,
               generation: GenerationConfig) -> tuple[Rollout, jax.Array]:
        """Samples of ``params`` on ``prompts`` (tokens, mask) and their gold rewards [B]."""
        rollout = generate(self.model, params, prompts[0], prompts[1], key, generation)
        return rollout, self.oracle.score_tokens(*rollout_reward_inputs(rollout))

    def _pool(self, split: str) -> tuple[jax.Array, jax.Array]:
        pool = self.data.prompts[split]
        return jnp.asarray(pool.tokens), jnp.asarray(pool.mask)

    def _queries(self, key: jax.Array, split: str, count: int, repeat: int) -> tuple[jax.Array, jax.Array]:
        """``count`` distinct prompts of the split's pool drawn by ``key``, each repeated ``repeat`` times."""
        tokens, mask = self._pool(split)
        index = jax.random.choice(key, tokens.shape[0], (count,), replace=count > tokens.shape[0])
        index = jnp.repeat(index, repeat)
        return tokens[index], mask[index]

    # ------------------------------------------------------------------------------------- feedback
    def feedback(self, key: jax.Array, sft_params: Params, hp: FeedbackHParams) -> FeedbackData:
        """``feedback.queries`` queries of k SFT samples each (k by the feedback kind) on feedback-split
        prompts, labelled by the simulated annotator (array form) with ``hp``'s noise; the first
        ⌊hp.responses / k⌋ queries are kept (``weights``)."""
        fb = self.config.feedback
        kind, k, q = fb.annotator.kind, fb.items_per_query, fb.queries
        prompt_key, sample_key, label_key = jax.random.split(key, 3)
        rollout, gold = self.sample(sft_params, self._queries(prompt_key, "feedback", q, k), sample_key,
                                    self.feedback_generation)
        seqs = rollout.sequences.reshape(q, k, -1)
        masks = rollout.sequence_mask.reshape(q, k, -1)
        finished = rollout.stopped.reshape(q, k)
        gold = gold.reshape(q, k)
        used = jnp.arange(q) < jnp.floor(jnp.asarray(hp.responses, jnp.float32) / k)
        if kind == "preference":
            first = pairwise_preferences(label_key, gold[:, 0], gold[:, 1], hp.annotator_temperature,
                                         hp.flip_prob)
            pick = lambda x, a, b: jnp.where(first[:, None], x[:, a], x[:, b])
            batch = {"chosen_tokens": pick(seqs, 0, 1), "chosen_mask": pick(masks, 0, 1),
                     "rejected_tokens": pick(seqs, 1, 0), "rejected_mask": pick(masks, 1, 0)}
            responses = rollout.response_tokens.reshape(q, k, -1)
            distinct = jnp.any(responses[:, 0] != responses[:, 1], axis=-1)
            valid = finished.all(axis=1) & distinct
            agreement = _order_agreement(gold, first, valid)
        elif kind == "ranking":
            order = plackett_luce_rankings(label_key, gold, hp.annotator_temperature)  # best first
            take = lambda x: jnp.take_along_axis(x, order.reshape(q, k, *([1] * (x.ndim - 2))), axis=1)
            items = take(finished)
            batch = {"tokens": take(seqs), "mask": take(masks), "item_mask": items.astype(jnp.int32)}
            valid = jnp.sum(items, axis=1) >= 2
            ranked = take(gold)
            above = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]
            pair_gold = jnp.stack(jnp.broadcast_arrays(ranked[:, :, None], ranked[:, None, :]), axis=-1)
            both = items[:, :, None] & items[:, None, :] & above & valid[:, None, None]
            agreement = _order_agreement(pair_gold, jnp.ones_like(both), both)
        else:
            a = fb.annotator
            ratings = quantised_ratings(label_key, gold[:, 0], hp.rating_noise, a.num_levels, a.rating_low,
                                        a.rating_high)
            batch = {"tokens": seqs[:, 0], "mask": masks[:, 0], "ratings": ratings.astype(jnp.float32)}
            valid = finished[:, 0]
            # Rating pairs among (at most) the first 256 queries: enough for the share, without a Q² array.
            g, r, v = gold[:256, 0], ratings[:256], valid[:256]
            pair_gold = jnp.stack(jnp.broadcast_arrays(g[:, None], g[None, :]), axis=-1)
            rated = v[:, None] & v[None, :] & (r[:, None] != r[None, :])
            agreement = _order_agreement(pair_gold, r[:, None] > r[None, :], rated)
        weights = (valid & used).astype(jnp.float32)
        metrics = {"feedback/finished": jnp.mean(finished.astype(jnp.float32)),
                   "feedback/label_agreement": agreement,
                   "feedback/queries": jnp.sum(weights)}
        return FeedbackData(batch, weights, metrics)

    # --------------------------------------------------------------------------------- reward model
    def reward_model(self, key: jax.Array, sft_params: Params, feedback: FeedbackData) -> RewardOutput:
        """K = ``reward.ensemble`` reward models, vmapped: the SFT backbone with a fresh head each, trained on
        batches drawn from the usable queries (a bootstrap resample of them per model with
        ``reward.bootstrap``; without any usable query the head stays untrained); each normalised on fresh
        SFT samples of RL prompts; their combination's agreement with the oracle on pairs of fresh SFT
        samples of evaluation prompts."""
        cfg = self.config.reward
        members_key, fresh_key = jax.random.split(key)
        optimizer = make_optimizer(cfg.optimizer, cfg.steps)
        step = make_reward_model_step(self.model, optimizer, self.reward_config)
        weights = feedback.weights
        size = weights.shape[0]

        def train_one(member_key: jax.Array) -> tuple[RewardModelParams, Metrics]:
            head_key, resample_key, batch_key = jax.random.split(member_key, 3)
            w = weights
            if cfg.bootstrap:
                draws = jax.random.choice(resample_key, size, (size,), p=_distribution(w))
                w = jnp.zeros(size).at[draws].add(1.0) * (w > 0)
            p, has_data = _distribution(w), jnp.sum(w) > 0

            def body(state, step_key):
                index = jax.random.choice(step_key, size, (cfg.batch_size,), p=p)
                new_state, metrics = step(state, _rows(feedback.batch, index), step_key)
                # No usable query (a budget below one query, or none finished): the fresh head stays as it
                # is, rather than training on uniformly drawn unusable rows; its step metrics are NaN.
                new_state = jax.tree.map(lambda a, b: jnp.where(has_data, a, b), new_state, state)
                metrics = jax.tree.map(lambda m: jnp.where(has_data, m, jnp.nan), metrics)
                return new_state, metrics

            params = RewardModelParams(sft_params, init_reward_head(head_key, self.model.config.hidden_size))
            state, metrics = jax.lax.scan(body, create_train_state(params, optimizer),
                                          jax.random.split(batch_key, cfg.steps))
            return state.params, metrics

        params, metrics = jax.vmap(train_one)(jax.random.split(members_key, cfg.ensemble))

        # FRESH SAMPLES of the SFT policy, one batch: RL prompts for the normalisation (Ziegler et al. 2019),
        # pairs on evaluation prompts for the agreement of the (combined) proxy with the oracle.
        n, pairs = cfg.normalization_samples, cfg.agreement_pairs
        norm_prompts_key, agree_prompts_key, samples_key = jax.random.split(fresh_key, 3)
        rl_prompts = self._queries(norm_prompts_key, "rl", n, 1)
        eval_prompts = self._queries(agree_prompts_key, "eval", pairs, 2)
        prompts = tuple(jnp.concatenate([a, b]) for a, b in zip(rl_prompts, eval_prompts))
        rollout, gold = self.sample(sft_params, prompts, samples_key, self.eval_generation)
        raw = self.raw_scores(params, rollout)  # [K, n + 2·pairs]
        normalization = jax.vmap(fit_reward_normalization)(raw[:, :n])
        combined = self.proxy(RewardOutput(params, normalization, {}), rollout)
        proxy, gold = combined[n:].reshape(pairs, 2), gold[n:].reshape(pairs, 2)
        untied = gold[:, 0] != gold[:, 1]
        agree = jnp.where(proxy[:, 0] == proxy[:, 1], 0.5,
                          ((proxy[:, 0] > proxy[:, 1]) == (gold[:, 0] > gold[:, 1])).astype(jnp.float32))
        metrics = {**metrics,
                   "reward/oracle_agreement": jnp.sum(agree * untied) / jnp.maximum(jnp.sum(untied), 1),
                   "reward/agreement_pairs": jnp.sum(untied).astype(jnp.float32),
                   "reward/normalization_gain": normalization.gain,
                   "reward/normalization_bias": normalization.bias}
        return RewardOutput(params, normalization, metrics)

    def raw_scores(self, params: RewardModelParams, rollout: Rollout) -> jax.Array:
        """Each reward model's raw score of each sequence: [K, B]."""
        return jax.vmap(lambda p: self._score(p, rollout.sequences, rollout.sequence_mask))(params)

    def proxy(self, reward: RewardOutput, rollout: Rollout, normalize: Any = True) -> jax.Array:
        """The proxy reward [B]: each model's score, normalised where ``normalize`` holds (a bool, or a
        traced 0./1.), combined over the ensemble by ``reward.combine``."""
        raw = self.raw_scores(reward.params, rollout)
        scores = choose(normalize, lambda: jax.vmap(normalize_rewards)(reward.normalization, raw),
                        lambda: raw)
        cfg = self.config.reward
        return ensemble_reward(scores, cfg.combine, cfg.uwo_coef)

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self, key: jax.Array, policy: Params, reference: Params, reward: RewardOutput) -> EvalPoint:
        """``policy`` on the evaluation prompts (``evaluation.samples_per_prompt`` samples each, drawn with
        ``key``): per-prompt means [M] of gold, normalised proxy, KL to ``reference``, optimal, finished,
        length."""
        ev = self.config.evaluation
        tokens, mask = self._pool("eval")
        k = ev.samples_per_prompt
        prompts = (jnp.repeat(tokens, k, axis=0), jnp.repeat(mask, k, axis=0))
        rollout, gold = self.sample(policy, prompts, key, self.eval_generation)
        p, temperature = self.data.prompt_length, self.eval_generation.temperature
        args = (rollout.sequences, rollout.sequence_mask, p, temperature)
        kl = sequence_kl(response_logprobs(self.model, policy, *args),
                         response_logprobs(self.model, reference, *args), rollout.response_mask)
        per_sample = EvalPoint(
            gold=gold,
            proxy=self.proxy(reward, rollout),
            kl=kl,
            optimal=self.task.is_optimal_tokens(*rollout_reward_inputs(rollout)).astype(jnp.float32),
            finished=rollout.stopped.astype(jnp.float32),
            length=jnp.sum(rollout.response_mask, axis=1).astype(jnp.float32),
        )
        return jax.tree.map(lambda x: jnp.mean(x.reshape(-1, k), axis=1), per_sample)


def _distribution(weights: jax.Array) -> jax.Array:
    """weights / Σ weights (uniform when every weight is 0, so that sampling stays defined)."""
    total = jnp.sum(weights)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 1.0 / weights.shape[0])

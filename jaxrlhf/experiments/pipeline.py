"""The whole RLHF pipeline as one pure function of a PRNG key (PureJaxRL style).

    train = make_train(config)                       # host-side preparation happens here, once
    out = jax.jit(train)(jax.random.key(0))          # SFT → feedback → reward model → RL → evaluation
    outs = jax.jit(jax.vmap(train))(jax.random.split(key, 16))          # 16 seeds, one program
    grid = stack_hparams([static_hparams(config, **{"rl.kl_coef": b}) for b in (0.02, 0.05, 0.1)])
    sweep = jax.jit(jax.vmap(train, in_axes=(None, 0)))(key, grid)      # a β sweep, one program

For models and rewards that fit one device and a jittable reward (the built-in tasks' oracles and the
annotators have array forms). Host-side (in :func:`make_train`): the task, its tokenizer and the fixed token
arrays of the prompt pools (:mod:`~jaxrlhf.experiments.pipeline_data`), closed over as constants. Inside
``train(key, hparams)`` everything random comes from the key (:mod:`~jaxrlhf.experiments.pipeline_stages`).

Keys: ``upstream_key, rl_key = split(key)``; ``sft, feedback, reward = split(upstream_key, 3)``;
``rl_key`` drives the RL method (:mod:`~jaxrlhf.experiments.pipeline_rl`) and the evaluation samples (the
same evaluation key at every point: common random numbers along the curve).

A study shares upstream work: :meth:`Pipeline.upstream` (SFT + feedback + reward model of one seed) once per
seed, then :meth:`Pipeline.downstream` (RL + evaluation) for every RL variant;
``train(key, hp) == downstream(rl_key, upstream(upstream_key, hp.feedback), hp.rl)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxrlhf.experiments.pipeline_config import (
    FeedbackHParams,
    HParams,
    PipelineConfig,
    RLHParams,
    check_hparams,
    static_hparams,
)
from jaxrlhf.experiments.pipeline_data import PipelineData, prepare_data
from jaxrlhf.experiments.pipeline_rl import RLContext, RLOutput, build_rl_method, run_rl
from jaxrlhf.experiments.pipeline_stages import (
    EvalPoint,
    FeedbackData,
    PipelineStages,
    RewardOutput,
    SFTOutput,
)
from jaxrlhf.models.transformer import LanguageModel, Params
from jaxrlhf.rollout.generate import GenerationConfig
from jaxrlhf.train.model_setup import architecture_config

Metrics = dict[str, jax.Array]


class Upstream(NamedTuple):
    """What RL starts from: the SFT policy, the feedback and the reward model(s) of one seed."""

    sft: SFTOutput
    feedback: FeedbackData
    reward: RewardOutput


class FinalParams(NamedTuple):
    sft: Params
    reward: Any  # RewardModelParams with a leading ensemble axis
    policy: Params


class TrainOutput(NamedTuple):
    """The pytree ``train`` returns (add a leading axis per vmap).

    sft / reward / rl: per-step (per-iteration) metrics [steps] (the reward model's [K, steps], plus
    reward/oracle_agreement and its normalisation); feedback: the feedback set's metrics; curve: the
    evaluation along RL, each field [points + 1, M prompts] (point 0 = the SFT policy); params: the final
    parameters when ``make_train(..., keep_params=True)``.
    """

    sft: Metrics
    feedback: Metrics
    reward: Metrics
    rl: Metrics
    curve: EvalPoint
    params: FinalParams | None


class Pipeline:
    """The prepared pipeline of ``config``: its data, model and stages (see the module docstring)."""

    def __init__(self, config: PipelineConfig, data: PipelineData | None = None):
        self.config = config
        self.data = prepare_data(config) if data is None else data
        tokenizer = self.data.task.tokenizer
        self.model = LanguageModel(architecture_config(config.model, tokenizer, "float32"))
        self.stages = PipelineStages(config, self.data, self.model)
        algo = config.rl.algorithm
        self.generation = GenerationConfig(max_new_tokens=self.data.response_length,
                                           temperature=algo.temperature, stop_token_ids=(self.data.eos_id,),
                                           pad_token_id=self.data.pad_id)

    @property
    def evaluation_steps(self) -> tuple[int, ...]:
        """The RL iteration of each evaluation point (0 = the SFT policy)."""
        rl, points = self.config.rl, self.config.evaluation.points
        return tuple(i * rl.iterations // points for i in range(points + 1))

    def hparams(self, **changes: Any) -> HParams:
        """The config's hyper-parameters as Python values, with ``changes`` by dotted name."""
        return static_hparams(self.config, **changes)

    # ------------------------------------------------------------------------------------- stages
    def upstream(self, key: jax.Array, hp: FeedbackHParams | None = None) -> Upstream:
        """SFT, feedback and the reward model(s) of one seed."""
        hp = self.hparams().feedback if hp is None else hp
        sft_key, feedback_key, reward_key = jax.random.split(key, 3)
        sft = self.stages.sft(sft_key)
        feedback = self.stages.feedback(feedback_key, sft.params, hp)
        return Upstream(sft, feedback, self.stages.reward_model(reward_key, sft.params, feedback))

    def downstream(self, key: jax.Array, upstream: Upstream, hp: RLHParams | None = None) -> RLOutput:
        """RL from the SFT policy against the proxy, with evaluations along the way."""
        hp = self.hparams().rl if hp is None else hp
        cfg, sft_params, reward = self.config, upstream.sft.params, upstream.reward
        pool = self.data.prompts["rl"]
        ctx = RLContext(
            config=cfg, model=self.model, sft_params=sft_params,
            score=lambda rollout: self.stages.proxy(reward, rollout, hp.normalize_reward),
            prompts=(jax.numpy.asarray(pool.tokens), jax.numpy.asarray(pool.mask)),
            feedback=upstream.feedback, generation=self.generation, hparams=hp)
        method_key, eval_key = jax.random.split(key)

        def evaluate(policy: Params) -> EvalPoint:
            return self.stages.evaluate(eval_key, policy, sft_params, reward)

        return run_rl(build_rl_method(ctx), evaluate, cfg.rl.iterations, cfg.evaluation.points, method_key)

    def train(self, key: jax.Array, hparams: HParams | None = None, keep_params: bool = False) -> TrainOutput:
        """The whole pipeline for one key (and one set of hyper-parameters; default: the config's)."""
        hp = self.hparams() if hparams is None else hparams
        check_train_hparams(hp)
        upstream_key, rl_key = jax.random.split(key)
        up = self.upstream(upstream_key, hp.feedback)
        rl = self.downstream(rl_key, up, hp.rl)
        params = FinalParams(up.sft.params, up.reward.params, rl.policy) if keep_params else None
        return TrainOutput(up.sft.metrics, up.feedback.metrics, up.reward.metrics, rl.metrics, rl.curve,
                           params)


def check_train_hparams(hp: Any) -> None:
    """``train``'s hyper-parameters must be one :class:`HParams` of scalars: a TypeError/ValueError saying
    what to do otherwise (a dict, a section of it, or a stacked grid not mapped over)."""
    if not isinstance(hp, HParams):
        raise TypeError(f"train: hparams must be an HParams (static_hparams(cfg, ...) or one member of "
                        f"stack_hparams), got {type(hp).__name__}")
    check_hparams(hp)  # types, and the ranges of Python numbers (a traced value cannot be checked)
    for path, leaf in jax.tree_util.tree_leaves_with_path(hp):
        if getattr(leaf, "ndim", 0):
            where = f"hparams{jax.tree_util.keystr(path)}"
            raise ValueError(f"train: {where} has shape {tuple(leaf.shape)}, not a scalar: map over the "
                             "members' axis (jax.vmap(train, in_axes=(None, 0))) or pass one member")


def make_train(config: PipelineConfig, keep_params: bool = False,
               data: PipelineData | None = None) -> Callable[..., TrainOutput]:
    """``train(key, hparams=None) -> TrainOutput``: the pipeline of ``config`` as one pure function (prepared
    here, on the host, once). ``hparams`` (:class:`HParams`, e.g. one member of ``stack_hparams``) may be
    traced; without it the config's values are used as Python constants."""
    pipeline = Pipeline(config, data)

    def train(key: jax.Array, hparams: HParams | None = None) -> TrainOutput:
        return pipeline.train(key, hparams, keep_params)

    train.pipeline = pipeline  # type: ignore[attr-defined]  # its data, model and stages, for a study
    return train


def replace_config(config: PipelineConfig, **sections: dict[str, Any]) -> PipelineConfig:
    """``config`` with fields of its sections replaced: ``replace_config(cfg, rl={"iterations": 10})``."""
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **changes)
                                          for name, changes in sections.items()})

"""Configuration of the pure RLHF pipeline (:mod:`jaxrlhf.experiments.pipeline`) and its traced
hyper-parameters.

:class:`PipelineConfig` fixes everything that shapes the compiled program (sizes, steps, the feedback kind,
the RL method and its structural choices). :class:`HParams` holds the numbers a vmapped sweep may vary
inside one compiled program: the annotator's noise, the feedback budget used, the RL learning rate, β,
clip ε, and the on/off choices (advantage whitening, adaptive KL, reward normalisation) as 0./1.

    hp = static_hparams(cfg)                      # Python values from the config: the plain program
    grid = stack_hparams([static_hparams(cfg, **{"rl.kl_coef": b}) for b in (0.01, 0.05, 0.2)])
    out = jax.vmap(train, in_axes=(None, 0))(key, grid)   # one member per β
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import field
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.config import ConfigError, is_number, load_config
from jaxrlhf.oracle import AnnotatorConfig
from jaxrlhf.oracle.feedback_records import ANNOTATOR_RULES
from jaxrlhf.rollout.sampling import check_temperature
from jaxrlhf.steps import A2CConfig, OptimizerConfig, PPOConfig, RewardModelConfig, RLConfig
from jaxrlhf.steps.optim import LEARNING_RATE_RULE
from jaxrlhf.train.run_config import ArchitectureConfig

REWARD_LOSS = {"preference": "pairwise", "ranking": "ranking", "rating": "rating"}
ENSEMBLE_COMBINE = ("mean", "min", "uwo")


@dataclasses.dataclass(frozen=True)
class PipelineTaskSection:
    """A built-in task with a jittable oracle (``digit_sort``, ``arithmetic``, ``random_walk``), built from
    ``seed``; its prompt pools come from disjoint splits (sft / feedback / rl / eval)."""

    name: str = "digit_sort"
    seed: int = 0
    options: dict[str, Any] = field(
        default_factory=lambda: {"min_digits": 3, "max_digits": 4, "max_response_tokens": 7})
    add_bos: bool = False


@dataclasses.dataclass(frozen=True)
class PipelineSFTSection:
    """Behaviour cloning of ``demonstrations`` (a fixed pool from the sft split) from a random init."""

    demonstrations: int = 2048
    batch_size: int = 64
    steps: int = 300
    optimizer: OptimizerConfig = field(default_factory=partial(
        OptimizerConfig, learning_rate=2e-3, warmup_steps=20, schedule="linear", end_lr_factor=0.1))


@dataclasses.dataclass(frozen=True)
class PipelineFeedbackSection:
    """Simulated feedback on SFT samples. ``responses`` is the annotation budget: the responses an annotator
    reads, so ``responses / k`` queries of k responses each (k = 2 for preferences, ``ranking_size`` for
    rankings, 1 for ratings), each on its own prompt drawn from ``prompt_pool`` feedback-split prompts."""

    responses: int = 1024
    ranking_size: int = 4
    prompt_pool: int = 2048
    temperature: float = 1.0  # sampling temperature of the SFT policy
    annotator: AnnotatorConfig = field(
        default_factory=partial(AnnotatorConfig, kind="preference", temperature=0.1))

    def __post_init__(self) -> None:
        if is_number(self.temperature):  # the SFT policy's sampling temperature; a traced one is a sweep
            check_temperature("PipelineFeedbackSection.temperature", self.temperature)

    @property
    def items_per_query(self) -> int:
        return {"preference": 2, "ranking": self.ranking_size, "rating": 1}[self.annotator.kind]

    @property
    def queries(self) -> int:
        return self.responses // self.items_per_query


@dataclasses.dataclass(frozen=True)
class PipelineRewardSection:
    """The proxy reward model(s): the SFT backbone plus a scalar head, the loss from the feedback kind.

    ``ensemble`` K > 1 trains K models (their own head inits and batch orders, and with ``bootstrap`` each
    on a bootstrap resample of the feedback) as one vmapped computation, combined by ``combine`` (mean,
    min = worst case, uwo = mean − ``uwo_coef``·variance; Coste et al. 2024). ``normalize``: gain and bias
    fitted on the scores of ``normalization_samples`` fresh SFT samples on RL prompts (Ziegler et al.),
    mean 0 and std 1. ``agreement_pairs``: pairs of fresh SFT samples on evaluation prompts on which the
    ordering of the reward model is compared with the oracle's.
    """

    batch_size: int = 64
    steps: int = 300
    optimizer: OptimizerConfig = field(default_factory=partial(
        OptimizerConfig, learning_rate=1e-3, warmup_steps=20, end_lr_factor=0.1))
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    normalize: bool = True
    normalization_samples: int = 256
    agreement_pairs: int = 256
    ensemble: int = 1
    bootstrap: bool = False
    combine: Literal["mean", "min", "uwo"] = "mean"
    uwo_coef: float = 0.1


@dataclasses.dataclass(frozen=True)
class PipelineRLSection:
    """RL against the proxy, KL-tied to the SFT policy: ``method`` names the method (its hyper-parameters in
    the section of that name); each iteration draws ``batch_size`` of ``prompt_pool`` rl-split prompts."""

    method: Literal["ppo", "a2c"] = "ppo"
    iterations: int = 100
    batch_size: int = 64
    prompt_pool: int = 1024
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, learning_rate=1e-4, end_lr_factor=0.1))
    ppo: PPOConfig = field(default_factory=partial(PPOConfig, kl_coef=0.05))
    a2c: A2CConfig = field(default_factory=partial(A2CConfig, kl_coef=0.05))

    @property
    def algorithm(self) -> RLConfig:
        """The method's hyper-parameters (the section named by ``method``)."""
        return getattr(self, self.method)


@dataclasses.dataclass(frozen=True)
class PipelineEvaluationSection:
    """``prompts`` eval-split prompts × ``samples_per_prompt`` samples, at the SFT policy and after every
    ``rl.iterations / points`` iterations, with the same prompts and sampling key at every point."""

    prompts: int = 256
    samples_per_prompt: int = 2
    points: int = 5


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The whole RLHF pipeline as one pure function of a key: task → SFT → feedback → reward model → RL →
    evaluation (:func:`jaxrlhf.experiments.pipeline.make_train`)."""

    task: PipelineTaskSection = field(default_factory=PipelineTaskSection)
    model: ArchitectureConfig = field(default_factory=partial(
        ArchitectureConfig, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=32))
    sft: PipelineSFTSection = field(default_factory=PipelineSFTSection)
    feedback: PipelineFeedbackSection = field(default_factory=PipelineFeedbackSection)
    reward: PipelineRewardSection = field(default_factory=PipelineRewardSection)
    rl: PipelineRLSection = field(default_factory=PipelineRLSection)
    evaluation: PipelineEvaluationSection = field(default_factory=PipelineEvaluationSection)

    def __post_init__(self) -> None:
        check_pipeline(self)


def check_pipeline(cfg: PipelineConfig) -> None:
    """Cross-field rules, each a :class:`ConfigError` naming the key."""
    positive = {
        "sft.demonstrations": cfg.sft.demonstrations, "sft.batch_size": cfg.sft.batch_size,
        "sft.steps": cfg.sft.steps, "feedback.responses": cfg.feedback.responses,
        "feedback.prompt_pool": cfg.feedback.prompt_pool, "reward.batch_size": cfg.reward.batch_size,
        "reward.steps": cfg.reward.steps, "reward.normalization_samples": cfg.reward.normalization_samples,
        "reward.agreement_pairs": cfg.reward.agreement_pairs, "reward.ensemble": cfg.reward.ensemble,
        "rl.iterations": cfg.rl.iterations, "rl.batch_size": cfg.rl.batch_size,
        "rl.prompt_pool": cfg.rl.prompt_pool, "evaluation.prompts": cfg.evaluation.prompts,
        "evaluation.samples_per_prompt": cfg.evaluation.samples_per_prompt,
        "evaluation.points": cfg.evaluation.points,
    }
    for key, value in positive.items():
        if isinstance(value, jax.core.Tracer):  # e.g. replace_config(cfg, rl={"iterations": traced})
            raise ConfigError(f"{key}: fixes the compiled program's shape and must be a Python int, not a "
                              "traced value (sweep the fields of HParams instead)")
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.sft.batch_size > cfg.sft.demonstrations:
        raise ConfigError(f"sft.batch_size: {cfg.sft.batch_size} exceeds sft.demonstrations "
                          f"({cfg.sft.demonstrations})")
    if cfg.feedback.ranking_size < 2:
        raise ConfigError(f"feedback.ranking_size: a ranking needs >= 2 responses, got "
                          f"{cfg.feedback.ranking_size}")
    fb = cfg.feedback
    if fb.queries < 1:
        raise ConfigError(f"feedback.responses: {fb.responses} responses make no query of "
                          f"{fb.items_per_query} ({fb.annotator.kind})")
    if fb.queries > fb.prompt_pool:
        raise ConfigError(f"feedback.prompt_pool: {fb.prompt_pool} prompts cannot give {fb.queries} queries "
                          f"their own prompt (feedback.responses / {fb.items_per_query})")
    if cfg.rl.batch_size > cfg.rl.prompt_pool:
        raise ConfigError(f"rl.batch_size: {cfg.rl.batch_size} exceeds rl.prompt_pool ({cfg.rl.prompt_pool})")
    if cfg.rl.iterations % cfg.evaluation.points:
        raise ConfigError(f"evaluation.points: rl.iterations ({cfg.rl.iterations}) must be a multiple of it, "
                          f"got {cfg.evaluation.points}")
    if cfg.reward.combine not in ENSEMBLE_COMBINE:
        raise ConfigError(f"reward.combine: expected one of {list(ENSEMBLE_COMBINE)}, got "
                          f"{cfg.reward.combine!r}")


def load_pipeline_config(path: str | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Defaults < YAML file < ``overrides``; every invalid value is a :class:`ConfigError` naming the key."""
    return load_config(PipelineConfig, path, overrides)


# ------------------------------------------------------------------------------------- hyper-parameters
class FeedbackHParams(NamedTuple):
    """The annotator's noise and the share of the budget used (``responses`` ≤ ``feedback.responses``)."""

    annotator_temperature: Any  # τ of the Bradley–Terry / Plackett–Luce annotator
    flip_prob: Any  # ε: pairwise labels flipped at random
    rating_noise: Any  # σ of the rating annotator
    responses: Any  # responses (of the budget) whose labels the reward model trains on


class RLHParams(NamedTuple):
    """RL numbers and on/off choices (0./1. when traced); fields a method lacks are ignored by it."""

    learning_rate: Any
    kl_coef: Any
    clip_eps: Any
    vf_clip_eps: Any  # None (static) or inf (traced): unclipped value loss
    whiten_advantages: Any
    adaptive_kl: Any
    missing_eos_penalty: Any
    normalize_reward: Any


class HParams(NamedTuple):
    feedback: FeedbackHParams
    rl: RLHParams


def static_hparams(cfg: PipelineConfig, **changes: Any) -> HParams:
    """The config's hyper-parameters as Python values (booleans stay bools, an unclipped value loss
    ``None``), with ``changes`` given by dotted name (``**{"rl.kl_coef": 0.1}``)."""
    fb, algo = cfg.feedback, cfg.rl.algorithm
    hp = HParams(
        FeedbackHParams(fb.annotator.temperature, fb.annotator.flip_prob, fb.annotator.noise_std,
                        fb.responses),
        RLHParams(cfg.rl.optimizer.learning_rate, algo.kl_coef, getattr(algo, "clip_eps", 0.2),
                  getattr(algo, "vf_clip_eps", None), algo.whiten_advantages, algo.adaptive_kl,
                  algo.missing_eos_penalty, cfg.reward.normalize),
    )
    for name, value in changes.items():
        group, _, key = name.partition(".")
        if group not in HParams._fields or key not in getattr(hp, group)._fields:
            fields = [f"{g}.{k}" for g in HParams._fields for k in getattr(hp, g)._fields]
            raise ConfigError(f"hyper-parameter {name!r}: expected one of {fields}")
        hp = hp._replace(**{group: getattr(hp, group)._replace(**{key: value})})
    check_hparams(hp, cfg)
    return hp


_FLAGS = ("whiten_advantages", "adaptive_kl", "normalize_reward")


def check_hparams(hp: HParams | FeedbackHParams | RLHParams, cfg: PipelineConfig | None = None) -> None:
    """Range rules for the hyper-parameters (or one section of them) that are Python numbers (a traced value
    cannot be checked), each a :class:`ConfigError` naming the field; with ``cfg``, ``feedback.responses``
    must also fit its budget."""
    if isinstance(hp, HParams):
        check_hparams(hp.feedback, cfg)
        check_hparams(hp.rl, cfg)
        return

    def bad(name: str, rule: str, value: Any) -> ConfigError:
        return ConfigError(f"hyper-parameter {name!r}: must be {rule}, got {value!r}")

    group = "feedback" if isinstance(hp, FeedbackHParams) else "rl"
    for name, value in zip(hp._fields, hp):
        # A number, a bool, an array (a traced or stacked value) or, for an unclipped value loss, None.
        if not (isinstance(value, (int, float, np.ndarray, np.generic, jax.Array))
                or (value is None and name == "vf_clip_eps")):
            raise bad(f"{group}.{name}", "a number" + (" or None" if name == "vf_clip_eps" else ""), value)

    if isinstance(hp, FeedbackHParams):
        rules = {  # the annotator's own rules, under the pipeline's names
            f"feedback.{name}": (getattr(hp, name), *ANNOTATOR_RULES[field])
            for name, field in (("annotator_temperature", "temperature"), ("flip_prob", "flip_prob"),
                                ("rating_noise", "noise_std"))
        }
        responses = hp.responses
        if isinstance(responses, bool) or (is_number(responses) and not (
                responses >= 0 and float(responses).is_integer())):
            raise bad("feedback.responses", "a whole number >= 0", responses)
        if cfg is not None and is_number(responses) and responses > cfg.feedback.responses:
            raise bad("feedback.responses", f"<= the budget feedback.responses ({cfg.feedback.responses}): "
                      "the queries are drawn for the budget", responses)
    else:
        rules = {
            "rl.learning_rate": (hp.learning_rate, *LEARNING_RATE_RULE),
            "rl.kl_coef": (hp.kl_coef, lambda x: 0 <= x < math.inf, "a finite number >= 0"),
            "rl.clip_eps": (hp.clip_eps, lambda x: 0 < x < math.inf, "a finite number > 0"),
            "rl.vf_clip_eps": (hp.vf_clip_eps, lambda x: x > 0, "> 0 (None or inf: unclipped)"),
            "rl.missing_eos_penalty": (hp.missing_eos_penalty, lambda x: abs(x) < math.inf, "finite"),
        }
        for name in _FLAGS:
            value = getattr(hp, name)
            if is_number(value) and value not in (0, 1):  # bools pass (is_number excludes them)
                raise bad(f"rl.{name}", "a bool (or 0/1)", value)
    for name, (value, ok, rule) in rules.items():
        if is_number(value) and not ok(value):  # written as `not ok` so that NaN fails
            raise bad(name, rule, value)


def _as_array(value: Any) -> np.ndarray:
    if value is None:  # an unclipped value loss
        return np.float32(math.inf)
    return np.float32(value)


def stack_hparams(members: Sequence[Any]) -> Any:
    """Members (:class:`HParams`, or all one section of them) → one of float32 arrays with a leading member
    axis (bools as 0./1., None as inf), to vmap over."""
    if not members:
        raise ValueError("stack_hparams: no members")
    for i, member in enumerate(members):
        kinds = (HParams, FeedbackHParams, RLHParams)
        if not isinstance(member, kinds) or type(member) is not type(members[0]):
            raise TypeError(f"stack_hparams: member {i} is a {type(member).__name__}, not an HParams (or the "
                            "same section of one as every member; build members with static_hparams)")
        try:
            check_hparams(member)
        except ConfigError as e:
            raise ConfigError(f"stack_hparams: member {i}: {e}") from None

    def stack(*values: Any) -> jax.Array:
        return jnp.asarray(np.stack([_as_array(v) for v in values]))

    return jax.tree.map(stack, *members, is_leaf=lambda x: x is None)


def with_hparams(algo: RLConfig, hp: RLHParams) -> RLConfig:
    """The method's config with the traced (or static) hyper-parameters it has."""
    changes = {"kl_coef": hp.kl_coef, "whiten_advantages": hp.whiten_advantages,
               "adaptive_kl": hp.adaptive_kl, "missing_eos_penalty": hp.missing_eos_penalty}
    if isinstance(algo, PPOConfig):
        changes |= {"clip_eps": hp.clip_eps, "vf_clip_eps": hp.vf_clip_eps}
    return dataclasses.replace(algo, **changes)


def reward_model_config(cfg: PipelineConfig) -> RewardModelConfig:
    """The reward model's loss follows the feedback kind."""
    return dataclasses.replace(cfg.reward.reward_model, loss=REWARD_LOSS[cfg.feedback.annotator.kind])

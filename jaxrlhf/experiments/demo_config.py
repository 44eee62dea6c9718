"""Configuration of ``jaxrlhf demo`` (configs/demo.yaml): one frozen dataclass per stage.

The defaults are the demo (≤ 10 minutes on 2 CPU cores); :data:`QUICK_OVERRIDES` shrinks every stage for a
smoke run (``--quick``, ≤ 2 minutes). Each stage's trainer config (``SFTRunConfig``, ``RewardRunConfig``,
``PPORunConfig``, ``A2CRunConfig``) is built from these sections by :mod:`jaxrlhf.experiments.demo`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import field
from functools import partial
from typing import Any, Literal

from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.oracle import AnnotatorConfig
from jaxrlhf.steps import A2CConfig, OptimizerConfig, PPOConfig, RewardModelConfig
from jaxrlhf.train.run_config import ArchitectureConfig


@dataclasses.dataclass(frozen=True)
class DemoRunSection:
    """Where the run goes and how it talks. ``dir`` null: ``runs/demo-<date>-<time>``."""

    dir: str | None = None
    seed: int = 0
    tensorboard: bool = True
    progress_bar: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    log_every: int = 10
    mfu_matmul_size: int = 0  # the trainers' peak-FLOP/s probe (0: no MFU, saves a second per stage)
    quick: bool = False  # set by --quick together with the preset's values; only labels the report


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """The built-in task (``random_walk`` or ``digit_sort``) and, optionally, your own gold reward.

    ``oracle``: any reward ``jaxrlhf.oracle.get_reward`` finds: ``"package.module:function"`` with
    ``function(prompt: str, response: str) -> float`` or a token-array function, a name given to
    ``jaxrlhf.oracle.register_reward``, a built-in (``length``, ``token_count:<id>``, ``task:<name>``); it
    replaces the task's gold reward for labelling and evaluation. The task still supplies prompts,
    demonstrations and the tokenizer, and "optimal answer" keeps the task's meaning (e.g. a shortest path).
    """

    name: str = "random_walk"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # the task's keyword arguments
    oracle: str | None = None
    add_bos: bool = False


@dataclasses.dataclass(frozen=True)
class SFTStage:
    """Behaviour-cloning the task's demonstrations with a GPT trained from scratch."""

    demonstrations: int = 4096
    eval_demonstrations: int = 256
    batch_size: int = 64
    steps: int = 400
    optimizer: OptimizerConfig = field(default_factory=partial(
        OptimizerConfig, learning_rate=2e-3, warmup_steps=20, schedule="linear", end_lr_factor=0.1))


@dataclasses.dataclass(frozen=True)
class FeedbackStage:
    """Responses sampled from the SFT policy, labelled by the simulated annotator."""

    prompts: int = 1024
    responses_per_prompt: int = 2
    eval_fraction: float = 0.1  # of the records, held out for the reward model's accuracy
    temperature: float = 1.0  # sampling temperature of the SFT policy
    annotator: AnnotatorConfig = field(
        default_factory=partial(AnnotatorConfig, kind="preference", temperature=0.1))


@dataclasses.dataclass(frozen=True)
class RewardStage:
    """The proxy reward model: the SFT backbone plus a scalar head (loss from the annotator's kind)."""

    batch_size: int = 64
    steps: int = 300
    optimizer: OptimizerConfig = field(default_factory=partial(
        OptimizerConfig, learning_rate=1e-3, warmup_steps=20, end_lr_factor=0.1))
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)


@dataclasses.dataclass(frozen=True)
class PPOStage:
    """PPO against the proxy, KL-tied to the SFT policy."""

    iterations: int = 100
    batch_size: int = 64
    prompts: int = 1024
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, learning_rate=1e-4, end_lr_factor=0.1))
    algorithm: PPOConfig = field(default_factory=partial(PPOConfig, kl_coef=0.05))


@dataclasses.dataclass(frozen=True)
class A2CStage:
    """A2C against the proxy, KL-tied to the SFT policy (the same prompts as PPO)."""

    iterations: int = 100
    batch_size: int = 64
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, learning_rate=1e-4, end_lr_factor=0.1))
    algorithm: A2CConfig = field(default_factory=partial(A2CConfig, kl_coef=0.05))


@dataclasses.dataclass(frozen=True)
class EvaluationStage:
    """Held-out evaluation: K samples on M prompts per policy; best-of-n from N samples per prompt."""

    prompts: int = 512
    samples_per_prompt: int = 2
    best_of_n_prompts: int = 128
    best_of_n_samples: int = 128
    best_of_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    rl_points: int = 8  # RL checkpoints evaluated along training (the SFT policy is the point at step 0)
    chunk_size: int = 512  # rows sampled per call (one compiled shape)
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """``jaxrlhf demo``: task → SFT → feedback → reward model → PPO and A2C → evaluation → report."""

    run: DemoRunSection = field(default_factory=DemoRunSection)
    task: TaskSection = field(default_factory=TaskSection)
    model: ArchitectureConfig = field(default_factory=partial(
        ArchitectureConfig, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=32))
    sft: SFTStage = field(default_factory=SFTStage)
    feedback: FeedbackStage = field(default_factory=FeedbackStage)
    reward: RewardStage = field(default_factory=RewardStage)
    ppo: PPOStage = field(default_factory=PPOStage)
    a2c: A2CStage = field(default_factory=A2CStage)
    evaluation: EvaluationStage = field(default_factory=EvaluationStage)

    def __post_init__(self) -> None:
        check_demo(self)


# The --quick preset: applied after the YAML file and before --set overrides.
QUICK_OVERRIDES: tuple[str, ...] = (
    "run.quick=true",
    "sft.demonstrations=512",
    "sft.eval_demonstrations=64",
    "sft.batch_size=32",
    "sft.steps=60",
    "feedback.prompts=96",
    "reward.batch_size=32",
    "reward.steps=30",
    "ppo.iterations=6",
    "ppo.batch_size=32",
    "ppo.prompts=128",
    "a2c.iterations=6",
    "a2c.batch_size=32",
    "evaluation.prompts=32",
    "evaluation.samples_per_prompt=4",
    "evaluation.best_of_n_prompts=8",
    "evaluation.best_of_n_samples=64",
    "evaluation.rl_points=2",
    "evaluation.chunk_size=128",
)


def check_demo(cfg: DemoConfig) -> None:
    """Cross-field rules, each a :class:`ConfigError` naming the key."""
    positive = {
        "sft.demonstrations": cfg.sft.demonstrations, "sft.eval_demonstrations": cfg.sft.eval_demonstrations,
        "sft.batch_size": cfg.sft.batch_size, "sft.steps": cfg.sft.steps,
        "feedback.prompts": cfg.feedback.prompts, "reward.batch_size": cfg.reward.batch_size,
        "reward.steps": cfg.reward.steps, "ppo.iterations": cfg.ppo.iterations,
        "ppo.batch_size": cfg.ppo.batch_size, "ppo.prompts": cfg.ppo.prompts,
        "a2c.iterations": cfg.a2c.iterations, "a2c.batch_size": cfg.a2c.batch_size,
        "evaluation.prompts": cfg.evaluation.prompts, "evaluation.rl_points": cfg.evaluation.rl_points,
        "evaluation.best_of_n_prompts": cfg.evaluation.best_of_n_prompts,
        "evaluation.chunk_size": cfg.evaluation.chunk_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.feedback.responses_per_prompt < 2:
        raise ConfigError(f"feedback.responses_per_prompt: need >= 2 to compare, got "
                          f"{cfg.feedback.responses_per_prompt}")
    if not 0.0 < cfg.feedback.eval_fraction < 1.0:
        raise ConfigError(f"feedback.eval_fraction: must be in (0, 1), got {cfg.feedback.eval_fraction}")
    if cfg.evaluation.samples_per_prompt < 2:
        raise ConfigError("evaluation.samples_per_prompt: need >= 2 (pairs of fresh samples are compared), "
                          f"got {cfg.evaluation.samples_per_prompt}")
    ns = cfg.evaluation.best_of_n
    if not ns or min(ns) < 1 or max(ns) > cfg.evaluation.best_of_n_samples:
        raise ConfigError(f"evaluation.best_of_n: every n must be in 1..best_of_n_samples "
                          f"({cfg.evaluation.best_of_n_samples}), got {list(ns)}")
    if cfg.ppo.batch_size > cfg.ppo.prompts or cfg.a2c.batch_size > cfg.ppo.prompts:
        raise ConfigError(f"ppo.prompts: {cfg.ppo.prompts} prompts cannot fill a batch of "
                          f"{max(cfg.ppo.batch_size, cfg.a2c.batch_size)} (ppo/a2c.batch_size)")
    if cfg.ppo.algorithm.temperature != cfg.evaluation.temperature:
        raise ConfigError("evaluation.temperature: must equal ppo.algorithm.temperature (the KL is measured "
                          "between the policies as trained)")


def load_demo_config(path: str | None = None, overrides: Sequence[str] = (),
                     quick: bool = False) -> DemoConfig:
    """The demo's config: defaults < YAML file < the quick preset (``quick``) < ``overrides``; every
    invalid value is a :class:`ConfigError` naming the key."""
    return load_config(DemoConfig, path, [*(QUICK_OVERRIDES if quick else ()), *overrides])

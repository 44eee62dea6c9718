"""Configuration of ``jaxrlhf demo`` (configs/demo.yaml): one frozen dataclass per stage.

The defaults are the demo (every method over four seeds); :data:`QUICK_OVERRIDES` shrinks every stage for a
smoke run of one seed (``--quick``) and :data:`FULL_OVERRIDES` runs every method over eight seeds
(``--full``); the README gives each preset's measured cost. Each stage's trainer config (``SFTRunConfig``,
``RewardRunConfig``, ``PPORunConfig``, ``A2CRunConfig``, ``GRPORunConfig``, ``RLOORunConfig``,
``DPORunConfig``) is built from these sections by :mod:`jaxrlhf.experiments.demo_stages`; ``methods`` lists
which entries of the method table (:data:`jaxrlhf.experiments.demo_methods.METHODS`) the comparison runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import field
from functools import partial
from typing import Any, Literal

from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.oracle import AnnotatorConfig
from jaxrlhf.rollout.sampling import check_temperature
from jaxrlhf.steps import A2CConfig, GRPOConfig, OptimizerConfig, PPOConfig, RewardModelConfig, RLOOConfig
from jaxrlhf.steps.dpo import DPOConfig
from jaxrlhf.steps.ilql import ILQLConfig
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
    # Each method's training runs with this many seeds (run.seed, run.seed + 1, ...); SFT, the feedback and
    # the reward model are shared, so the spread over seeds is that of the method's own sampling.
    seeds: int = 4  # intervals over seeds need S >= 4 to mean much; --quick runs 1, --full 8
    quick: bool = False  # set by --quick together with the preset's values; only labels the report
    full: bool = False  # set by --full together with the preset's values; only labels the report


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """The built-in task (``random_walk`` or ``digit_sort``) and, optionally, your own gold reward.

    ``oracle``: any reward ``jaxrlhf.oracle.get_reward`` finds: ``"package.module:function"`` with
    ``function(prompt: str, response: str) -> float`` or a token-array function, a name given to
    ``jaxrlhf.oracle.register_reward``, a built-in (``length``, ``token_count:<id>``, ``task:<name>``); it
    replaces the task's gold reward for labelling and evaluation. The task still supplies prompts,
    demonstrations and the tokenizer, and "optimal answer" keeps the task's meaning (e.g. a shortest path).
    """

    name: str = "digit_sort"
    seed: int = 0
    # the task's keyword arguments (digit_sort: 3–4 digits, 11 000 prompts, ~2 750 in each split)
    options: dict[str, Any] = field(default_factory=lambda: {"min_digits": 3, "max_digits": 4,
                                                             "max_response_tokens": 8})
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

    prompts: int = 2048
    responses_per_prompt: int = 2
    eval_fraction: float = 0.1  # of the records, held out for the reward model's accuracy
    temperature: float = 1.0  # sampling temperature of the SFT policy
    annotator: AnnotatorConfig = field(
        default_factory=partial(AnnotatorConfig, kind="preference", temperature=0.1))

    def __post_init__(self) -> None:
        check_temperature("FeedbackStage.temperature", self.temperature)


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
class GRPOStage:
    """GRPO against the proxy (and, as the upper reference, against the gold reward itself): ``batch_size``
    prompts × ``algorithm.group_size`` samples per iteration (the same sequences per iteration as PPO)."""

    iterations: int = 100
    batch_size: int = 16
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, learning_rate=1e-4, end_lr_factor=0.1))
    algorithm: GRPOConfig = field(default_factory=partial(GRPOConfig, kl_coef=0.05, group_size=4))


@dataclasses.dataclass(frozen=True)
class RLOOStage:
    """RLOO against the proxy: leave-one-out baselines over ``algorithm.group_size`` samples per prompt."""

    iterations: int = 100
    batch_size: int = 16
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, learning_rate=1e-4, end_lr_factor=0.1))
    algorithm: RLOOConfig = field(default_factory=partial(RLOOConfig, kl_coef=0.05, group_size=4))


@dataclasses.dataclass(frozen=True)
class DPOStage:
    """DPO directly on the annotator's preference pairs (the reward model's training file)."""

    steps: int = 200
    batch_size: int = 64
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, learning_rate=2e-4, warmup_steps=10, end_lr_factor=0.1))
    algorithm: DPOConfig = field(default_factory=partial(DPOConfig, beta=0.1, identical_pairs="drop"))


@dataclasses.dataclass(frozen=True)
class VGDStage:
    """Value-guided decoding: ILQL trained offline (frozen SFT backbone) on ``samples_per_prompt`` SFT samples
    of each RL prompt, scored once by the reward model; evaluated at each β of ``betas`` (x = β)."""

    samples_per_prompt: int = 4
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    betas: tuple[int, ...] = (1, 2, 4, 8, 16)
    algorithm: ILQLConfig = field(default_factory=partial(ILQLConfig, freeze_backbone=True))


@dataclasses.dataclass(frozen=True)
class EnsembleStage:
    """K reward models (Coste et al. 2024) trained as one vmapped computation on the same feedback, each from
    its own head initialisation and (``bootstrap``) its own resample of the records; PPO then optimises
    their worst case (``wco``: min over members) or the uncertainty-weighted mean (``uwo``: mean − λ·var),
    each member normalised on fresh samples of the SFT policy first. Steps and optimiser: ``reward``'s."""

    members: int = 4
    bootstrap: bool = True
    uwo_lambda: float = 0.5  # λ of mean − λ·var (on the normalised scale)


@dataclasses.dataclass(frozen=True)
class EvaluationStage:
    """Held-out evaluation: K samples on M prompts per policy; best-of-n from N samples per prompt."""

    prompts: int = 512
    samples_per_prompt: int = 2
    best_of_n_prompts: int = 128
    best_of_n_samples: int = 128
    best_of_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    rl_points: int = 5  # RL checkpoints evaluated along training (the SFT policy is the point at step 0)
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
    grpo: GRPOStage = field(default_factory=GRPOStage)
    rloo: RLOOStage = field(default_factory=RLOOStage)
    dpo: DPOStage = field(default_factory=DPOStage)
    vgd: VGDStage = field(default_factory=VGDStage)
    ensemble: EnsembleStage = field(default_factory=EnsembleStage)
    evaluation: EvaluationStage = field(default_factory=EvaluationStage)
    # The methods compared (keys of jaxrlhf.experiments.demo_methods.METHODS), in the table's order.
    methods: tuple[str, ...] = ("ppo", "a2c", "grpo", "rloo", "dpo", "vgd", "grpo_gold", "ppo_wco", "ppo_uwo")

    def __post_init__(self) -> None:
        check_demo(self)


# The --quick preset: applied after the YAML file and before --set overrides.
QUICK_OVERRIDES: tuple[str, ...] = (
    "run.quick=true",
    "run.seeds=1",
    "sft.demonstrations=512",
    "sft.eval_demonstrations=64",
    "sft.batch_size=32",
    "sft.steps=60",
    "feedback.prompts=256",
    "reward.batch_size=32",
    "reward.steps=30",
    "ppo.iterations=6",
    "ppo.batch_size=32",
    "ppo.prompts=128",
    "a2c.iterations=6",
    "a2c.batch_size=32",
    "grpo.iterations=6",
    "grpo.batch_size=8",
    "rloo.iterations=6",
    "rloo.batch_size=8",
    "dpo.steps=6",
    "dpo.batch_size=32",
    "vgd.steps=30",
    "vgd.samples_per_prompt=2",
    "vgd.batch_size=32",
    "vgd.betas=[1,4,16]",
    "ensemble.members=2",
    "evaluation.prompts=64",
    "evaluation.samples_per_prompt=2",
    "evaluation.best_of_n_prompts=8",
    "evaluation.best_of_n_samples=64",
    "evaluation.rl_points=3",
    "evaluation.chunk_size=128",
)

# The --full preset: every method over eight seeds (tighter intervals over seeds than the default's four).
FULL_OVERRIDES: tuple[str, ...] = (
    "run.full=true",
    "run.seeds=8",
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
        "grpo.iterations": cfg.grpo.iterations, "grpo.batch_size": cfg.grpo.batch_size,
        "rloo.iterations": cfg.rloo.iterations, "rloo.batch_size": cfg.rloo.batch_size,
        "dpo.steps": cfg.dpo.steps, "dpo.batch_size": cfg.dpo.batch_size, "run.seeds": cfg.run.seeds,
        "vgd.steps": cfg.vgd.steps, "vgd.samples_per_prompt": cfg.vgd.samples_per_prompt,
        "vgd.batch_size": cfg.vgd.batch_size,
        "ensemble.members": cfg.ensemble.members,
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
    for key in ("ppo", "a2c", "grpo", "rloo"):
        if getattr(cfg, key).algorithm.temperature != cfg.evaluation.temperature:
            raise ConfigError(f"evaluation.temperature: must equal {key}.algorithm.temperature (the KL is "
                              "measured between the policies as trained)")
    for key in ("grpo", "rloo"):
        if getattr(cfg, key).batch_size > cfg.ppo.prompts:
            raise ConfigError(f"ppo.prompts: {cfg.ppo.prompts} prompts cannot fill a batch of "
                              f"{getattr(cfg, key).batch_size} ({key}.batch_size)")
    from jaxrlhf.experiments.demo_methods import METHODS  # the table imports this module

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"methods: {unknown or list(cfg.methods)} — each must be one of {list(METHODS)}, "
                          "listed once")
    if cfg.ensemble.members < 2 and any(METHODS[m].ensemble for m in cfg.methods):
        raise ConfigError(f"ensemble.members: an ensemble needs >= 2 reward models, got "
                          f"{cfg.ensemble.members}")
    if not cfg.vgd.betas or min(cfg.vgd.betas) < 1 or list(cfg.vgd.betas) != sorted(set(cfg.vgd.betas)):
        raise ConfigError(f"vgd.betas: increasing integers >= 1 (β = 0 is the SFT policy, the curve's first "
                          f"point), got {list(cfg.vgd.betas)}")
    if not cfg.vgd.learning_rate > 0:
        raise ConfigError(f"vgd.learning_rate: must be > 0, got {cfg.vgd.learning_rate}")
    if cfg.evaluation.rl_points < 3:
        raise ConfigError(f"evaluation.rl_points: the Gao et al. fit needs >= 3 checkpoints with KL > 0, "
                          f"got {cfg.evaluation.rl_points}")


def load_demo_config(path: str | None = None, overrides: Sequence[str] = (),
                     quick: bool = False, full: bool = False) -> DemoConfig:
    """The demo's config: defaults < YAML file < the quick / full preset < ``overrides``; every invalid
    value is a :class:`ConfigError` naming the key."""
    if quick and full:
        raise ConfigError("--quick and --full: choose one preset")
    preset = QUICK_OVERRIDES if quick else FULL_OVERRIDES if full else ()
    return load_config(DemoConfig, path, overrides, preset, "--quick" if quick else "--full")

"""Config sections shared by the trainers (frozen dataclasses for :func:`jaxrlhf.config.load_config`).

Each command's top-level config (``SFTRunConfig``, ``RewardRunConfig``, ``PPORunConfig``, ``A2CRunConfig``)
composes these sections with the steps layer's optimiser and algorithm configs. Cross-field rules that a
type hint cannot say (exactly one of two keys, a key required by another) are checked by :func:`check`
functions that raise :class:`~jaxrlhf.config.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

from jaxrlhf.config import ConfigError


@dataclasses.dataclass(frozen=True)
class ArchitectureConfig:
    """Shape of a model trained from scratch; the vocabulary size and special ids come from the tokenizer."""

    family: Literal["gpt2", "llama"] = "gpt2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # default: num_heads (no grouping)
    intermediate_size: int | None = None  # default: 4 · hidden_size
    max_position_embeddings: int = 256


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Either ``path`` (a local Hugging Face directory) or ``architecture`` + ``tokenizer`` (from scratch).

    ``tokenizer`` is a directory holding a Hugging Face tokenizer, or ``char:<alphabet>`` for a
    character-level toy tokenizer; with ``path`` it overrides the directory's own tokenizer. ``--set
    model.path=…`` replaces the config file's ``architecture`` and ``tokenizer``: the model directory brings
    its own (give ``--set model.tokenizer=…`` too to override it).
    """

    # A local Hugging Face model directory (config.json + safetensors + tokenizer files).
    path: str | None = None
    architecture: ArchitectureConfig | None = None
    # A tokenizer directory or char:<alphabet>; with path: overrides the directory's own tokenizer.
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    # What the blocks' backward pass saves vs recomputes (ModelConfig.remat): dots, dots_no_batch, full, none.
    remat: Literal["none", "dots", "dots_no_batch", "full"] = "dots"

    # A --set of the key on the left drops these keys of the config file (jaxrlhf.config.drop_replaced).
    REPLACES: ClassVar[dict[str, tuple[str, ...]]] = {
        "path": ("architecture", "tokenizer"),
        "architecture": ("path",),
    }


@dataclasses.dataclass(frozen=True)
class DataSection:
    """JSONL files, batch sizes and lengths (responses: at most ``max_response_length`` tokens with eos)."""

    train_file: str = ""
    # Held-out examples for evaluation; without one, data.eval_fraction of the train file is held out.
    eval_file: str | None = None
    # Without an eval_file: the share of the train file held out for evaluation (at least one example;
    # 0: no evaluation). The split is fixed by train.seed.
    eval_fraction: float = 0.05
    # Training batches are whole: each epoch leaves out (len % batch_size) examples, different ones each
    # epoch when shuffled (the run says how many at the start).
    batch_size: int = 8
    eval_batch_size: int | None = None  # default: batch_size
    max_prompt_length: int = 64
    # A longer completion or response is cut to this many tokens, and then has no eos (the run counts them).
    max_response_length: int = 64
    # Start plain-text prompts with the tokenizer's bos; null (default): as the tokenizer itself does (Llama's
    # add it, GPT-2's do not); conversations: their chat template decides (true adds one where it lacks).
    add_bos: bool | None = None
    truncate_prompts: Literal["error", "left"] = "error"
    shuffle: bool = True
    # Length buckets (each batch is padded to the smallest that fits); empty: powers of two from
    # `smallest_bucket` up to the maximum.
    prompt_buckets: tuple[int, ...] = ()
    response_buckets: tuple[int, ...] = ()
    smallest_bucket: int = 16
    ranking_items: int | None = None  # ranking data: items per row (default: the longest ranking)


@dataclasses.dataclass(frozen=True)
class GenerationSection:
    """Sampling of RL rollouts. The sampling temperature is the algorithm's ``temperature`` (every log-prob
    uses it too); ``temperature`` here may only repeat that value. On-policy RL (PPO, A2C) refuses filtered
    sampling — ``top_k`` > 0, ``top_p`` < 1, ``min_new_tokens`` > 0 — since the update's log-probs are those
    of the unfiltered tempered softmax."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None  # default: the tokenizer's eos and the model config's


@dataclasses.dataclass(frozen=True)
class RewardFunctionSection:
    """One of several reward functions summed with weights into the reward (each logged as
    ``rewards/<name>/mean``)."""

    function: str  # a name or import path, as reward.function
    weight: float = 1.0
    name: str | None = None  # the metric name; default: the function's __name__


@dataclasses.dataclass(frozen=True)
class RewardSection:
    """The RL reward: a trained reward model directory, a registered / import-path reward function, or a
    weighted sum of several functions. Exactly one of the three; a ``--set`` of one replaces the config
    file's other (and a separate critic then no longer starts from the reward model)."""

    # A reward model directory (a jaxrlhf reward export or any *ForSequenceClassification checkpoint).
    model_path: str | None = None
    # fn(prompt, response) -> float; fn(prompts, completions, **columns) -> list[float] (TRL's); or
    # fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]; as "module:function" or a name.
    function: str | None = None
    # Several reward functions, summed with weights: [{function: "m:f", weight: 1.0}, ...].
    functions: tuple[RewardFunctionSection, ...] = ()
    normalize: bool = True  # apply the reward model's saved (gain, bias)
    # Score the batch in sequential chunks of this many sequences (bounds the reward model's activations).
    micro_batch_size: int | None = None

    REPLACES: ClassVar[dict[str, tuple[str, ...]]] = {
        "model_path": ("function", "functions"),
        "function": ("model_path", "functions"),
        "functions": ("model_path", "function"),
    }


@dataclasses.dataclass(frozen=True)
class ReferenceSection:
    """The KL reference policy: a Hugging Face directory; default: the policy's initial weights.

    ``offload``: keep the reference's weights in host memory and stream them to the devices for each scoring
    pass, trading a host-to-device copy per iteration for the accelerator memory of a fourth model.
    """

    path: str | None = None
    offload: bool = False


@dataclasses.dataclass(frozen=True)
class CriticSection:
    """Initial weights of a separate critic (``critic: separate``): a Hugging Face directory (e.g. a reward
    model, whose reward head then initialises the value head); default: the reward model
    (``reward.model_path``) when the reward is one, else the policy's initial weights."""

    path: str | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints every ``every`` steps, the last ``keep`` kept; ``resume`` continues the latest."""

    dir: str | None = None  # default: <run_dir>/checkpoints
    every: int = 100
    keep: int = 3
    resume: bool = True
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """Where and how often metrics go; ``mfu_matmul_size`` sizes the peak-FLOP/s probe (0: no MFU)."""

    run_dir: str = "runs/run"
    tensorboard: bool = True
    log_every: int = 10
    progress_bar: bool = True
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mfu_matmul_size: int = 2048
    sample_every: int = 0  # RL: log a decoded sample generation every N steps (0: never)
    # A Weights & Biases project: metrics go there too, under the same names (needs the wandb package).
    wandb: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Length of training (``steps``, else ``epochs`` over the train file), seed, eval and stop rules."""

    steps: int | None = None
    epochs: int | None = None
    seed: int = 0
    max_consecutive_nonfinite: int = 3
    eval_every: int = 0  # 0: evaluate once at the end
    # End this invocation after this step (checkpointed, no export), e.g. to fit a job's time limit;
    # running the same config again resumes.
    stop_at_step: int | None = None


def _positive(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{key}: must be >= 1, got {value}")


def check_model(model: ModelSection, key: str = "model") -> None:
    """Exactly one of ``path`` / ``architecture``; from scratch needs ``tokenizer``."""
    if (model.path is None) == (model.architecture is None):
        raise ConfigError(f"{key}: give exactly one of {key}.path or {key}.architecture")
    if model.architecture is not None and not model.tokenizer:
        raise ConfigError(f"{key}.tokenizer: required when training {key}.architecture from scratch")


def check_exists(key: str, path: str | None, kind: Literal["file", "directory"] = "file",
                 what: str = "") -> None:
    """A config key naming an input that must exist: a one-line error naming the key and the path
    (checked before anything is loaded, so a mistyped path fails in a second, not after model loading)."""
    if path is None or path == "":
        return
    p = Path(path)
    ok = p.is_file() if kind == "file" else p.is_dir()
    if not ok:
        wrong = f"is not a {kind}" if p.exists() else f"{what} not found" if what else f"no such {kind}"
        raise ConfigError(f"{key}: {path}: {wrong}")


def check_model_inputs(model: ModelSection, key: str = "model") -> None:
    """The model directory and a tokenizer directory exist."""
    check_exists(f"{key}.path", model.path, "directory", "model directory")
    if model.tokenizer and not model.tokenizer.startswith("char:"):
        check_exists(f"{key}.tokenizer", model.tokenizer, "directory", "tokenizer directory")


def check_common(
    model: ModelSection,
    data: DataSection,
    checkpoint: CheckpointSection,
    logging: LoggingSection,
    train: TrainSection,
) -> None:
    """The rules every command shares, then the inputs it names (data files, model directory) exist."""
    check_model(model)
    if not data.train_file:
        raise ConfigError("data.train_file: required (a JSONL file)")
    for key in ("batch_size", "eval_batch_size", "max_prompt_length", "max_response_length"):
        _positive(f"data.{key}", getattr(data, key))
    if not 0.0 <= data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {data.eval_fraction}")
    _positive("checkpoint.every", checkpoint.every)
    _positive("checkpoint.keep", checkpoint.keep)
    _positive("logging.log_every", logging.log_every)
    _positive("train.steps", train.steps)
    _positive("train.epochs", train.epochs)
    _positive("train.max_consecutive_nonfinite", train.max_consecutive_nonfinite)
    if train.steps is None and train.epochs is None:
        raise ConfigError("train: give train.steps or train.epochs")
    check_exists("data.train_file", data.train_file)
    check_exists("data.eval_file", data.eval_file)
    check_model_inputs(model)
    check_output_dir("logging.run_dir", logging.run_dir)
    check_output_dir("checkpoint.dir", checkpoint.dir)


def check_output_dir(key: str, path: str | None) -> None:
    """A directory a run writes: refused up front (key and path named) when it, or the nearest part of it
    that exists, is not a directory (a file of that name would fail the run at its first write)."""
    if not path:
        return
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        what = "is not a directory" if p == Path(path) else f"its part {p} is not a directory"
        raise ConfigError(f"{key}: {path}: {what}")


def check_grad_accum(key: str, grad_accum_steps: int, data: DataSection) -> None:
    """A training batch of ``data.batch_size`` rows splits into ``grad_accum_steps`` (at ``key``)
    micro-batches of equal size: a ConfigError naming both keys otherwise, before anything is written."""
    if data.batch_size % grad_accum_steps:
        raise ConfigError(f"{key}: data.batch_size={data.batch_size} does not split into {key}="
                          f"{grad_accum_steps} micro-batches of equal size (make data.batch_size a multiple "
                          "of it)")


def reward_sources(reward: RewardSection) -> list[str]:
    """The keys of ``reward`` that name a reward source (a valid config has exactly one)."""
    given = {"model_path": reward.model_path is not None, "function": reward.function is not None,
             "functions": bool(reward.functions)}
    return [f"reward.{k}" for k, v in given.items() if v]


def check_rl(reward: RewardSection) -> None:
    """Exactly one reward source, and a reward model directory that exists."""
    if len(reward_sources(reward)) != 1:
        given = reward_sources(reward)
        raise ConfigError(
            "reward: give exactly one of reward.model_path, reward.function or reward.functions"
            + (f" (got {' and '.join(given)})" if given else "")
        )
    _positive("reward.micro_batch_size", reward.micro_batch_size)
    check_exists("reward.model_path", reward.model_path, "directory", "reward model directory")


def critic_init_path(critic: CriticSection, reward: RewardSection) -> str | None:
    """Where a separate critic starts: ``critic.path``, else the reward model, else None (the policy)."""
    return critic.path if critic.path is not None else reward.model_path

"""The run layer (host side): trainers, checkpoints, metrics, timing and the non-finite policy.

Trainers (each ``train_*(config) -> RunResult``; the command line calls them):

    from jaxrlhf.config import load_config
    from jaxrlhf.train import PPORunConfig, train_ppo
    result = train_ppo(load_config(PPORunConfig, "configs/ppo.yaml", ["train.steps=10"]))

The trainer modules import the steps layer and are loaded on first use, so importing the infrastructure
(checkpoints, metrics, timing) stays light.
"""

import importlib
from typing import Any

from jaxrlhf.train.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    NonFiniteCheckpointError,
    first_nonfinite_leaf,
    pack_rng,
    save_json_atomic,
    unpack_rng,
)
from jaxrlhf.train.common import MetricsWindow, Run, RunResult, compile_step, to_host, total_steps
from jaxrlhf.train.loop import supervised_loop
from jaxrlhf.train.metrics import (
    MetricsLogger,
    format_postfix,
    progress,
    read_metrics_jsonl,
    setup_logging,
)
from jaxrlhf.train.model_setup import (
    LoadedModel,
    export_model,
    flops_per_token,
    load_model,
    load_reward_model,
    load_tokenizer,
    read_normalization,
)
from jaxrlhf.train.nonfinite import NonFiniteError, NonFiniteTracker
from jaxrlhf.train.run_config import (
    ArchitectureConfig,
    CheckpointSection,
    CriticSection,
    DataSection,
    GenerationSection,
    LoggingSection,
    ModelSection,
    ReferenceSection,
    RewardSection,
    TrainSection,
)
from jaxrlhf.train.timing import (
    CompileWatcher,
    PhaseTimer,
    Timers,
    matmul_peak_flops,
    mfu,
    throughput,
    transformer_flops_per_token,
)

_TRAINERS = {
    "SFTRunConfig": "jaxrlhf.train.sft",
    "train_sft": "jaxrlhf.train.sft",
    "RewardRunConfig": "jaxrlhf.train.reward",
    "train_reward_model": "jaxrlhf.train.reward",
    "PPORunConfig": "jaxrlhf.train.rl",
    "A2CRunConfig": "jaxrlhf.train.rl",
    "train_ppo": "jaxrlhf.train.rl",
    "train_a2c": "jaxrlhf.train.rl",
    "train_rl": "jaxrlhf.train.rl",
    "build_rl": "jaxrlhf.train.rl",
    "rl_iteration": "jaxrlhf.train.rl",
}


def __getattr__(name: str) -> Any:
    if name in _TRAINERS:
        return getattr(importlib.import_module(_TRAINERS[name]), name)
    raise AttributeError(f"module 'jaxrlhf.train' has no attribute {name!r}")


__all__ = [  # noqa: RUF022 - grouped by module
    # trainers (loaded lazily)
    "A2CRunConfig",
    "PPORunConfig",
    "RewardRunConfig",
    "SFTRunConfig",
    "build_rl",
    "rl_iteration",
    "train_a2c",
    "train_ppo",
    "train_reward_model",
    "train_rl",
    "train_sft",
    # run harness and config sections
    "MetricsWindow",
    "Run",
    "RunResult",
    "compile_step",
    "supervised_loop",
    "to_host",
    "total_steps",
    "ArchitectureConfig",
    "CheckpointSection",
    "CriticSection",
    "DataSection",
    "GenerationSection",
    "LoggingSection",
    "ModelSection",
    "ReferenceSection",
    "RewardSection",
    "TrainSection",
    # models
    "LoadedModel",
    "export_model",
    "flops_per_token",
    "load_model",
    "load_reward_model",
    "load_tokenizer",
    "read_normalization",
    # checkpoints
    "CheckpointManager",
    "CheckpointMismatchError",
    "NonFiniteCheckpointError",
    "first_nonfinite_leaf",
    "pack_rng",
    "save_json_atomic",
    "unpack_rng",
    # metrics
    "MetricsLogger",
    "format_postfix",
    "progress",
    "read_metrics_jsonl",
    "setup_logging",
    # non-finite policy
    "NonFiniteError",
    "NonFiniteTracker",
    # timing
    "CompileWatcher",
    "PhaseTimer",
    "Timers",
    "matmul_peak_flops",
    "mfu",
    "throughput",
    "transformer_flops_per_token",
]

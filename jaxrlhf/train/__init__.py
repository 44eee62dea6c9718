"""The run layer (host side): trainers, the training loop, checkpoints, metrics, timing and the run's
services.

Trainers (each ``train_*(config) -> RunResult``; the command line calls them):

    from jaxrlhf.config import load_config
    from jaxrlhf.train import PPORunConfig, train_rl
    result = train_rl(load_config(PPORunConfig, "configs/ppo.yaml", ["train.steps=10"]))

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
from jaxrlhf.train.checkpointing import Checkpointing, Resumed
from jaxrlhf.train.metrics import (
    MetricsLogger,
    format_postfix,
    progress,
    read_metrics_jsonl,
    setup_logging,
    truncate_jsonl,
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
from jaxrlhf.train.reporting import MetricsWindow, Reporting, host_scalars
from jaxrlhf.train.run import Run, RunResult, compile_step, total_steps
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
from jaxrlhf.train.run_dir import RunDirectory
from jaxrlhf.train.timing import (
    CompileWatcher,
    PhaseTimer,
    Timers,
    matmul_peak_flops,
    mfu,
    throughput,
    transformer_flops_per_token,
)

_LAZY = {
    "SFTRunConfig": "jaxrlhf.train.sft",
    "train_sft": "jaxrlhf.train.sft",
    "RewardRunConfig": "jaxrlhf.train.reward",
    "train_reward_model": "jaxrlhf.train.reward",
    "PPORunConfig": "jaxrlhf.train.rl",
    "A2CRunConfig": "jaxrlhf.train.rl",
    "train_rl": "jaxrlhf.train.rl",
    "DPORunConfig": "jaxrlhf.train.dpo",
    "train_dpo": "jaxrlhf.train.dpo",
    "ILQLRunConfig": "jaxrlhf.train.ilql",
    "train_ilql": "jaxrlhf.train.ilql",
    "build_rl": "jaxrlhf.train.rl",
    "build_rl_phases": "jaxrlhf.train.rl_setup",
    "LoopHooks": "jaxrlhf.train.loop",
    "StepOutcome": "jaxrlhf.train.loop",
    "training_loop": "jaxrlhf.train.loop",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxrlhf.train' has no attribute {name!r}")


__all__ = [  # noqa: RUF022 - grouped by module
    # trainers and the loop (loaded lazily)
    "A2CRunConfig",
    "DPORunConfig",
    "ILQLRunConfig",
    "PPORunConfig",
    "RewardRunConfig",
    "SFTRunConfig",
    "build_rl",
    "build_rl_phases",
    "train_dpo",
    "train_ilql",
    "train_reward_model",
    "train_rl",
    "train_sft",
    "LoopHooks",
    "StepOutcome",
    "training_loop",
    # the run and its services
    "Run",
    "RunResult",
    "compile_step",
    "total_steps",
    "RunDirectory",
    "Checkpointing",
    "Resumed",
    "Reporting",
    "MetricsWindow",
    "host_scalars",
    # config sections
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
    "truncate_jsonl",
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

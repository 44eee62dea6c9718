"""steps layer of jaxrlhf: pure ``step(state, batch, key) -> (state, metrics)`` functions and their states.

Every step is side-effect free and jittable (the run layer jits it, with shardings for data parallelism);
hyper-parameters come from the frozen config dataclasses, models are static closures.
"""

from jaxrlhf.steps.guard import all_finite, apply_gradients_if_finite, select_if_finite
from jaxrlhf.steps.optim import OptimizerConfig, current_learning_rate, learning_rate_at, make_optimizer
from jaxrlhf.steps.sft import SFTConfig, make_sft_step, sft_loss
from jaxrlhf.steps.state import (
    RLState,
    TrainState,
    apply_gradients,
    create_rl_state,
    create_train_state,
    lm_params,
)

__all__ = [
    "OptimizerConfig",
    "RLState",
    "SFTConfig",
    "TrainState",
    "all_finite",
    "apply_gradients",
    "apply_gradients_if_finite",
    "create_rl_state",
    "create_train_state",
    "current_learning_rate",
    "learning_rate_at",
    "lm_params",
    "make_optimizer",
    "make_sft_step",
    "select_if_finite",
    "sft_loss",
]

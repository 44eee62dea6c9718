"""steps layer of jaxrlhf: pure ``step(state, batch, key) -> (state, metrics)`` functions and their states.

Every step is side-effect free and jittable (the run layer jits it, with shardings for data parallelism);
hyper-parameters come from the frozen config dataclasses, models are static closures.
"""

from jaxrlhf.steps.a2c import a2c_loss, make_a2c_update
from jaxrlhf.steps.accumulate import accumulate_gradients, merge_microbatches, split_microbatches
from jaxrlhf.steps.actor_critic import ActorCriticParams, kl_controller
from jaxrlhf.steps.dpo import (
    DPOConfig,
    dpo_batch_loss,
    make_dpo_eval,
    make_dpo_step,
    make_reference_logps,
    pair_logps,
)
from jaxrlhf.steps.experience import (
    Experience,
    ResponseOutputs,
    critic_values,
    make_experience_fn,
    response_logprobs_and_values,
    sequence_kl,
)
from jaxrlhf.steps.group_experience import GroupExperience, group_advantages, make_group_experience_fn
from jaxrlhf.steps.guard import all_finite, apply_gradients_if_finite, update_if
from jaxrlhf.steps.minibatch_epochs import minibatch_epochs
from jaxrlhf.steps.optim import OptimizerConfig, current_learning_rate, learning_rate_at, make_optimizer
from jaxrlhf.steps.params import CriticParams, PolicyParams, RewardModelParams
from jaxrlhf.steps.policy_gradient import make_pg_update, policy_gradient_loss
from jaxrlhf.steps.ppo import make_ppo_update, ppo_loss
from jaxrlhf.steps.reward_model import (
    RewardModelConfig,
    RewardModelScorer,
    make_reward_model_eval,
    make_reward_model_step,
    make_reward_scorer,
    reward_model_loss,
)
from jaxrlhf.steps.rl_config import (
    A2CConfig,
    ActorCriticConfig,
    ClippedEpochsConfig,
    GRPOConfig,
    PGConfig,
    PPOConfig,
    RLConfig,
    RLOOConfig,
)
from jaxrlhf.steps.rl_iteration import (
    ExperienceFn,
    GenerateFn,
    IterationOutput,
    RLPhases,
    ScoreFn,
    UpdateFn,
    generate_groups,
    make_rl_iteration,
    make_rl_phases,
)
from jaxrlhf.steps.sft import SFTConfig, make_sft_step, sft_loss
from jaxrlhf.steps.state import (
    RLState,
    TrainState,
    apply_gradients,
    create_rl_state,
    create_train_state,
)

__all__ = [
    "A2CConfig",
    "ActorCriticConfig",
    "ActorCriticParams",
    "ClippedEpochsConfig",
    "CriticParams",
    "DPOConfig",
    "Experience",
    "ExperienceFn",
    "GRPOConfig",
    "GenerateFn",
    "GroupExperience",
    "IterationOutput",
    "OptimizerConfig",
    "PGConfig",
    "PPOConfig",
    "PolicyParams",
    "RLConfig",
    "RLOOConfig",
    "RLPhases",
    "RLState",
    "ResponseOutputs",
    "RewardModelConfig",
    "RewardModelParams",
    "RewardModelScorer",
    "SFTConfig",
    "ScoreFn",
    "TrainState",
    "UpdateFn",
    "a2c_loss",
    "accumulate_gradients",
    "all_finite",
    "apply_gradients",
    "apply_gradients_if_finite",
    "create_rl_state",
    "create_train_state",
    "critic_values",
    "current_learning_rate",
    "dpo_batch_loss",
    "generate_groups",
    "group_advantages",
    "kl_controller",
    "learning_rate_at",
    "make_a2c_update",
    "make_dpo_eval",
    "make_dpo_step",
    "make_experience_fn",
    "make_group_experience_fn",
    "make_optimizer",
    "make_pg_update",
    "make_ppo_update",
    "make_reference_logps",
    "make_reward_model_eval",
    "make_reward_model_step",
    "make_reward_scorer",
    "make_rl_iteration",
    "make_rl_phases",
    "make_sft_step",
    "merge_microbatches",
    "minibatch_epochs",
    "pair_logps",
    "policy_gradient_loss",
    "ppo_loss",
    "response_logprobs_and_values",
    "reward_model_loss",
    "sequence_kl",
    "sft_loss",
    "split_microbatches",
    "update_if",
]

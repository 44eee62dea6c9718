"""rl layer of jaxrlhf: pure numerics (arrays in, arrays out; jittable and vmappable).

Losses and statistics take arrays of any shape with a same-shape mask and average over every
masked-in element (policy losses take a named `loss_agg`); time recursions work on one [T] stream and
have `batched_*` [B, T] wrappers; critic-free advantages work on groups of scores [num_prompts, n].
"""

from jaxrlhf.rl.advantages import (
    batched_discounted_returns,
    batched_gae_advantages,
    discounted_returns,
    gae_advantages,
)
from jaxrlhf.rl.best_of_n import best_of_n_curve, best_of_n_estimate, best_of_n_kl, best_of_n_weights
from jaxrlhf.rl.ensemble import ensemble_reward
from jaxrlhf.rl.group_advantages import (
    dr_grpo_advantages,
    dynamic_sampling_filter,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
    sequence_to_token_advantages,
    split_groups,
)
from jaxrlhf.rl.ilql import (
    conservative_q_loss,
    expectile_loss,
    gather_actions,
    ilql_loss,
    polyak_update,
    q_learning_targets,
    td_loss,
)
from jaxrlhf.rl.kl import kl_estimate, kl_k1, kl_k2, kl_k3, kl_loss, kl_penalized_rewards
from jaxrlhf.rl.kl_control import (
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
)
from jaxrlhf.rl.loss_aggregation import LOSS_AGGREGATIONS, aggregate_loss
from jaxrlhf.rl.masked import (
    explained_variance,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from jaxrlhf.rl.policy_losses import (
    a2c_policy_loss,
    a2c_value_loss,
    entropy_from_logits,
    gspo_policy_loss,
    ppo_policy_loss,
    token_logprobs,
    token_logprobs_and_entropy,
    value_loss,
)
from jaxrlhf.rl.preference import (
    bradley_terry_loss,
    dpo_loss,
    pairwise_accuracy,
    plackett_luce_loss,
    rating_regression_loss,
)
from jaxrlhf.rl.reward_norm import (
    RewardNormalization,
    RunningMoments,
    fit_reward_normalization,
    normalize_rewards,
    running_moments_init,
    running_moments_normalization,
    running_moments_std,
    running_moments_update,
    running_moments_var,
)
from jaxrlhf.rl.reward_shaping import score_at_last_token, soft_overlong_penalty
from jaxrlhf.rl.value_guidance import (
    blockwise_value_probs,
    blockwise_value_select,
    categorical_kl,
    value_guided_kl,
    value_guided_logits,
)

__all__ = [
    "LOSS_AGGREGATIONS",
    "KLController",
    "KLControllerState",
    "RewardNormalization",
    "RunningMoments",
    "a2c_policy_loss",
    "a2c_value_loss",
    "adaptive_kl_controller",
    "aggregate_loss",
    "batched_discounted_returns",
    "batched_gae_advantages",
    "best_of_n_curve",
    "best_of_n_estimate",
    "best_of_n_kl",
    "best_of_n_weights",
    "blockwise_value_probs",
    "blockwise_value_select",
    "bradley_terry_loss",
    "categorical_kl",
    "conservative_q_loss",
    "discounted_returns",
    "dpo_loss",
    "dr_grpo_advantages",
    "dynamic_sampling_filter",
    "ensemble_reward",
    "entropy_from_logits",
    "expectile_loss",
    "explained_variance",
    "fit_reward_normalization",
    "fixed_kl_controller",
    "gae_advantages",
    "gather_actions",
    "grpo_advantages",
    "gspo_policy_loss",
    "ilql_loss",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "kl_penalized_rewards",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_rewards",
    "pairwise_accuracy",
    "plackett_luce_loss",
    "polyak_update",
    "ppo_policy_loss",
    "q_learning_targets",
    "rating_regression_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "running_moments_init",
    "running_moments_normalization",
    "running_moments_std",
    "running_moments_update",
    "running_moments_var",
    "score_at_last_token",
    "sequence_to_token_advantages",
    "soft_overlong_penalty",
    "split_groups",
    "td_loss",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "value_guided_kl",
    "value_guided_logits",
    "value_loss",
]

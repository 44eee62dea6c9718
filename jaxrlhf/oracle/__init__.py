"""Feedback layer: rewards and oracle (gold) rewards, simulated annotators and built-in synthetic tasks.

An :class:`Oracle` is a deterministic reward R*(prompt, response) with a host form (``score_texts``) and an
array form (``score_tokens``, jittable for the built-in tasks and rewards). It is the one kind of reward
function: :func:`get_reward` finds one by name or import path for the RL trainers (``reward.function``) and
the demo (``task.oracle``), and :func:`register_reward` adds one. Simulated annotators turn gold rewards
into pairwise preferences, Plackett–Luce rankings or quantised ratings, and :func:`annotate_pool` writes them
as the records the trainers read.
"""

from jaxrlhf.oracle.annotators import (
    pairwise_preferences,
    plackett_luce_rankings,
    preference_probability,
    quantised_ratings,
)
from jaxrlhf.oracle.base import FunctionOracle, Oracle, decode_batch, rollout_reward_inputs
from jaxrlhf.oracle.batch_rewards import BatchFunctionOracle, RewardFunctionError
from jaxrlhf.oracle.feedback_records import AnnotatorConfig, annotate_pool, coverage_report
from jaxrlhf.oracle.registry import (
    RewardSpecError,
    as_reward,
    get_reward,
    register_reward,
    registered_rewards,
    reward_form,
)
from jaxrlhf.oracle.task_tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_task_tokenizer
from jaxrlhf.oracle.tasks import (
    DigitSortOracle,
    DigitSortTask,
    RandomWalkOracle,
    RandomWalkTask,
    Task,
    get_task,
    list_tasks,
    register_task,
)
from jaxrlhf.oracle.token_rewards import TokenFunctionOracle, length_reward, token_count_reward

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "AnnotatorConfig",
    "BatchFunctionOracle",
    "DigitSortOracle",
    "DigitSortTask",
    "FunctionOracle",
    "Oracle",
    "RandomWalkOracle",
    "RandomWalkTask",
    "RewardFunctionError",
    "RewardSpecError",
    "Task",
    "TokenFunctionOracle",
    "annotate_pool",
    "as_reward",
    "build_task_tokenizer",
    "coverage_report",
    "decode_batch",
    "get_reward",
    "get_task",
    "length_reward",
    "list_tasks",
    "pairwise_preferences",
    "plackett_luce_rankings",
    "preference_probability",
    "quantised_ratings",
    "register_reward",
    "register_task",
    "registered_rewards",
    "reward_form",
    "rollout_reward_inputs",
    "token_count_reward",
]

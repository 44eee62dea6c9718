"""Feedback layer: oracle (gold) rewards, simulated annotators and built-in synthetic tasks.

An :class:`Oracle` is a deterministic gold reward R*(prompt, response) with a host form
(``score_texts``) and an array form (``score_tokens``, jittable for the built-in tasks). Simulated
annotators turn gold rewards into pairwise preferences, Plackett–Luce rankings or quantised ratings, and
:func:`annotate_pool` writes them as the records the trainers read.
"""

from jaxrlhf.oracle.annotators import (
    pairwise_preferences,
    plackett_luce_rankings,
    preference_probability,
    quantised_ratings,
)
from jaxrlhf.oracle.base import FunctionOracle, Oracle, decode_batch
from jaxrlhf.oracle.feedback_records import AnnotatorConfig, annotate_pool, coverage_report
from jaxrlhf.oracle.registry import OracleSpecError, get_oracle, register_oracle, registered_oracles
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

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "AnnotatorConfig",
    "DigitSortOracle",
    "DigitSortTask",
    "FunctionOracle",
    "Oracle",
    "OracleSpecError",
    "RandomWalkOracle",
    "RandomWalkTask",
    "Task",
    "annotate_pool",
    "build_task_tokenizer",
    "coverage_report",
    "decode_batch",
    "get_oracle",
    "get_task",
    "list_tasks",
    "pairwise_preferences",
    "plackett_luce_rankings",
    "preference_probability",
    "quantised_ratings",
    "register_oracle",
    "register_task",
    "registered_oracles",
]

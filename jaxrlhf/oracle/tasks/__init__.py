"""Built-in tasks with a known gold reward (``get_task(name, **kwargs)``) and their disjoint prompt splits."""

from jaxrlhf.oracle.tasks.arithmetic import ArithmeticOracle, ArithmeticTask
from jaxrlhf.oracle.tasks.base import Task, as_generator, get_task, list_tasks, register_task
from jaxrlhf.oracle.tasks.digit_sort import DigitSortOracle, DigitSortTask
from jaxrlhf.oracle.tasks.random_walk import RandomWalkOracle, RandomWalkTask
from jaxrlhf.oracle.tasks.splits import (
    SPLIT_FRACTIONS,
    SPLITS,
    PromptOverlapReport,
    prompt_overlap_report,
    prompt_split,
)

__all__ = [
    "SPLITS",
    "SPLIT_FRACTIONS",
    "ArithmeticOracle",
    "ArithmeticTask",
    "DigitSortOracle",
    "DigitSortTask",
    "PromptOverlapReport",
    "RandomWalkOracle",
    "RandomWalkTask",
    "Task",
    "as_generator",
    "get_task",
    "list_tasks",
    "prompt_overlap_report",
    "prompt_split",
    "register_task",
]

"""Built-in tasks with a known gold reward: ``get_task(name, **kwargs)``."""

from jaxrlhf.oracle.tasks.base import Task, as_generator, get_task, list_tasks, register_task
from jaxrlhf.oracle.tasks.digit_sort import DigitSortOracle, DigitSortTask
from jaxrlhf.oracle.tasks.random_walk import RandomWalkOracle, RandomWalkTask

__all__ = [
    "DigitSortOracle",
    "DigitSortTask",
    "RandomWalkOracle",
    "RandomWalkTask",
    "Task",
    "as_generator",
    "get_task",
    "list_tasks",
    "register_task",
]

"""Task registry and reproducibility."""

import numpy as np
import pytest

from jaxrlhf.oracle import Task, get_task, list_tasks
from jaxrlhf.oracle.tasks import as_generator


@pytest.mark.parametrize("name", ["random_walk", "digit_sort", "arithmetic"])
def test_tasks_are_reproducible_and_tiny(name):
    task = get_task(name, seed=3)
    assert isinstance(task, Task) and task.name == name and task.oracle.jittable
    assert len(task.tokenizer) <= 40 and task.max_prompt_tokens <= 16 and task.max_response_tokens <= 24
    again = get_task(name, seed=3)
    assert task.sample_prompts(5, 30) == again.sample_prompts(np.random.default_rng(5), 30)
    assert task.demonstrations(7, 30) == again.demonstrations(7, 30)
    assert task.describe() == again.describe()
    assert task.sample_prompts(5, 30) != task.sample_prompts(6, 30)
    for prompt in task.sample_prompts(0, 20):
        assert task.is_optimal(prompt, task.optimal_response(prompt))


def test_registry_errors():
    assert {"random_walk", "digit_sort", "arithmetic"} <= set(list_tasks())
    with pytest.raises(ValueError, match=r"unknown task 'maze'; available tasks: .*random_walk"):
        get_task("maze")
    with pytest.raises(
        ValueError, match="task 'random_walk' does not accept \\['n_goals'\\]; its parameters"
    ):
        get_task("random_walk", n_goals=2)
    with pytest.raises(TypeError, match="rng must be a numpy Generator or an int seed"):
        as_generator(0.5)

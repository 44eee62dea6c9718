"""The interface of a built-in task, and the task registry."""

from __future__ import annotations

import abc
import inspect
from pathlib import Path

import jax
import numpy as np

from jaxrlhf.oracle.base import Oracle
from jaxrlhf.oracle.tasks.splits import check_split, prompt_split


def as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    """A NumPy generator from a generator (returned as is) or an integer seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {rng!r}")


class Task(abc.ABC):
    """A tiny synthetic task with a known gold reward.

    Texts are space-separated symbols of the task's tokenizer. A demonstration's ``completion`` and a
    response passed to the oracle's host form carry no eos token: the data layer appends it.

    Prompt splits: ``sample_prompts(rng, n, split)`` and ``demonstrations(rng, n, split)`` with a split in
    :data:`SPLITS` (``"sft"``, ``"feedback"``, ``"rl"``, ``"eval"``) draw only prompts of that part of the
    prompt space (a hash partition, see :mod:`jaxrlhf.oracle.tasks.splits`), so prompts drawn for
    different splits never coincide; ``split=None`` draws from the whole space. A task whose prompt space
    is too small to split (``disjoint_splits = False``, e.g. the random walk's handful of start nodes)
    accepts a split name but draws from the whole space: check with :func:`prompt_overlap_report`.
    """

    name: str = "task"
    #: The gold reward of an optimal response.
    optimal_score: float = 1.0
    #: Whether ``split`` restricts prompts to disjoint parts of the prompt space.
    disjoint_splits: bool = True

    tokenizer: object
    max_prompt_tokens: int
    max_response_tokens: int  # including the eos token
    oracle: Oracle

    def save_tokenizer(self, directory: str | Path) -> None:
        """Write the tokenizer so that ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it."""
        self.tokenizer.save_pretrained(str(directory))

    @abc.abstractmethod
    def draw_prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        """``n`` prompts from the task's prompt distribution over the whole prompt space."""

    @abc.abstractmethod
    def behaviour_response(self, rng: np.random.Generator, prompt: str) -> str:
        """One response of the task's imperfect behaviour policy to ``prompt`` (no eos)."""

    def prompt_space_size(self) -> int | None:
        """The number of distinct prompts the task can draw (None if unknown)."""
        return None

    def prompt_split(self, prompt: str) -> str:
        """The split ``prompt`` belongs to (by its hash; meaningful when ``disjoint_splits``)."""
        return prompt_split(prompt)

    def sample_prompts(self, rng: np.random.Generator | int, n: int, split: str | None = None) -> list[str]:
        """``n`` prompts from the task's prompt distribution, restricted to ``split`` (None: all)."""
        rng = as_generator(rng)
        if split is not None:
            check_split(split)
        if split is None or not self.disjoint_splits:
            return self.draw_prompts(rng, n)
        # Rounds of a fixed size: the n prompts drawn are the first n of any larger request.
        prompts: list[str] = []
        draws, budget, size = 0, 1000 + 100 * n, 256
        while len(prompts) < n:
            prompts += [p for p in self.draw_prompts(rng, size) if prompt_split(p) == split]
            draws += size
            if draws > budget and len(prompts) < n:
                raise ValueError(
                    f"task {self.name!r}: only {len(prompts)} of {draws} prompts drawn fell in split "
                    f"{split!r}; its prompt space ({self.prompt_space_size()} prompts) is too small for "
                    "disjoint splits"
                )
        return prompts[:n]

    def demonstrations(self, rng: np.random.Generator | int, n: int, split: str | None = None) -> list[dict]:
        """``n`` records ``{"prompt", "completion"}`` from the task's imperfect behaviour policy, on
        prompts of ``split`` (None: the whole prompt space)."""
        rng = as_generator(rng)
        prompts = self.sample_prompts(rng, n, split)
        return [{"prompt": p, "completion": self.behaviour_response(rng, p)} for p in prompts]

    @abc.abstractmethod
    def optimal_response(self, prompt: str) -> str:
        """A response with the highest gold reward (``optimal_score``)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A one-line description of the task and its gold reward."""

    def is_optimal(self, prompt: str, response: str) -> bool:
        """Whether ``response`` (finished with eos) attains the optimal gold reward."""
        return bool(self.oracle.score_texts([prompt], [response])[0] == self.optimal_score)

    def is_optimal_tokens(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> jax.Array:
        """Array form of :meth:`is_optimal` (jittable): bool [B]."""
        scores = self.oracle.score_tokens(prompt_tokens, prompt_mask, response_tokens, response_mask)
        return scores == self.optimal_score


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available to :func:`get_task` under ``cls.name``."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"a task named {cls.name!r} is already registered")
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    """Names of the registered tasks."""
    return sorted(_TASKS)


def get_task(name: str, **kwargs) -> Task:
    """Build the task ``name`` with ``kwargs`` (e.g. ``seed``); the same arguments give the same task."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {list_tasks()}")
    cls = _TASKS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} does not accept {unknown}; its parameters are {accepted}")
    return cls(**kwargs)

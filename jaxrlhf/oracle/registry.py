"""The one reward plug-in point: find a reward (an :class:`~jaxrlhf.oracle.base.Oracle`) by name or path.

``get_reward(spec, tokenizer)`` serves the RL trainers' ``reward.function`` and the demo's ``task.oracle``
alike. ``spec`` is

* a registered name: the built-in ``length``, or a name given to :func:`register_reward`;
* a built-in with an argument: ``token_count:<token id>``, ``task:<task name>`` (the built-in task's own
  oracle; task arguments follow commas, e.g. ``task:random_walk,seed=3``);
* an import path ``"package.module:attr"`` (or ``"package.module.attr"``).

The object found may be an :class:`Oracle`, an ``Oracle`` subclass (built with no arguments), or a function
in one of the forms of :func:`reward_form`: ``fn(prompt: str, response: str) -> float`` (one call per sample,
on the host), TRL's ``fn(prompts, completions, **columns) -> list[float]`` (one call per batch, on the
host; :mod:`jaxrlhf.oracle.batch_rewards`) or ``fn(prompt_tokens, prompt_mask, response_tokens,
response_mask) -> [B]`` (one call per batch; jittable when registered with ``jittable=True`` or carrying
``fn.jittable = True``).

A user's function is wrapped so that anything it raises, or a score that is not a number, becomes one
:class:`RewardFunctionError` naming the reward (and the file and line it failed at), never a traceback from
deep inside a trainer.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import yaml

from jaxrlhf.config import describe_exception, import_object
from jaxrlhf.oracle.base import FunctionOracle, Oracle
from jaxrlhf.oracle.batch_rewards import BatchFunctionOracle, RewardFunctionError, is_batch_reward
from jaxrlhf.oracle.token_rewards import TokenFunctionOracle, length_reward, token_count_reward

RewardForm = Literal["text", "batch", "tokens"]
FORMS: tuple[str, ...] = ("text", "batch", "tokens")


class RewardSpecError(ValueError):
    """A reward name or import path could not be resolved."""


class _Registered(NamedTuple):
    obj: Oracle | type[Oracle] | Callable[..., Any]
    jittable: bool | None


_REGISTRY: dict[str, _Registered] = {}
# Built-ins taking an argument after the colon ("token_count:7"): name -> (usage, factory(arg, tokenizer)).
_FACTORIES: dict[str, tuple[str, Callable[[str, Any], Oracle]]] = {}


def reward_form(fn: Callable[..., Any]) -> RewardForm:
    """Which signature a reward function has (or its ``fn.reward_form`` attribute says):

    * ``"batch"``: TRL's ``fn(prompts, completions, **columns) -> list[float]`` (a parameter named
      ``completions``), called once per batch on the host with the data's other columns as keywords;
    * ``"text"``: ``fn(prompt: str, response: str) -> float`` (two required positional parameters), called
      once per sample on the host;
    * ``"tokens"``: ``fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]`` (four), once
      per batch.
    """
    declared = getattr(fn, "reward_form", None)
    if declared is not None:
        if declared not in FORMS:
            raise RewardSpecError(f"{fn!r}.reward_form: expected one of {list(FORMS)}, got {declared!r}")
        return declared
    if is_batch_reward(fn):
        return "batch"
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise RewardSpecError(f"cannot read the signature of {fn!r}; set its reward_form attribute") from None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    if len(positional) == 2:
        return "text"
    if len(positional) == 4:
        return "tokens"
    raise RewardSpecError(
        f"{getattr(fn, '__qualname__', fn)!r} takes {len(positional)} required arguments: a reward is "
        "fn(prompt, response) -> float, fn(prompts, completions, **columns) -> list[float] or "
        "fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]"
    )


def register_reward(name: str, fn: Oracle | type[Oracle] | Callable[..., Any], *,
                    jittable: bool | None = None, overwrite: bool = False) -> None:
    """Make ``fn`` (an Oracle, an Oracle subclass or a reward function) available as ``name``.

    ``jittable`` marks a token-array function as pure ``jnp`` (default: its ``jittable`` attribute, else
    False); a text function is never jittable.
    """
    if not name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no ':'")
    if (name in _REGISTRY or name in _FACTORIES) and not overwrite:
        raise ValueError(f"a reward named {name!r} is already registered (pass overwrite=True)")
    if not (isinstance(fn, Oracle) or callable(fn)):
        raise TypeError(f"register_reward({name!r}): expected an Oracle or a callable, got {fn!r}")
    if not isinstance(fn, Oracle) and not (isinstance(fn, type) and issubclass(fn, Oracle)):
        reward_form(fn)  # an unusable signature fails here, not at first use
    _REGISTRY[name] = _Registered(fn, jittable)


def registered_rewards() -> list[str]:
    """Registered names, with ``name:<arg>`` for the built-ins taking an argument."""
    return sorted([*_REGISTRY, *(usage for usage, _ in _FACTORIES.values())])


def as_reward(obj: Any, name: str, tokenizer: Any = None, jittable: bool | None = None) -> Oracle:
    """``obj`` as an :class:`Oracle`: itself, an instance of an Oracle subclass, or a function wrapped by its
    form (:class:`FunctionOracle` or :class:`TokenFunctionOracle`, given ``tokenizer``)."""
    if isinstance(obj, Oracle):
        return obj
    if isinstance(obj, type) and issubclass(obj, Oracle):
        return obj()
    if not callable(obj):
        raise RewardSpecError(f"reward {name!r} resolved to {obj!r}, which is neither an Oracle nor callable")
    form = reward_form(obj)
    fn = guarded(obj, form, name)
    if form == "text":
        return FunctionOracle(fn, tokenizer=tokenizer, name=name)
    if form == "batch":
        return BatchFunctionOracle(fn, tokenizer=tokenizer, name=name)
    jittable = bool(getattr(obj, "jittable", False)) if jittable is None else jittable
    return TokenFunctionOracle(fn, jittable=jittable, tokenizer=tokenizer, name=name)


def guarded(fn: Callable[..., Any], form: RewardForm, name: str) -> Callable[..., Any]:
    """``fn`` (same signature and attributes; the original as ``__wrapped__``) raising one
    :class:`RewardFunctionError` that names the reward for anything it raises, and, in the text form, for
    a score that is not a real number."""
    if getattr(fn, "_jaxrlhf_guarded", False):
        return fn

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(*args, **kwargs)
        except RewardFunctionError:
            raise
        except Exception as e:
            where = f" on prompt {args[0]!r:.60}" if form == "text" and args else ""
            raise RewardFunctionError(f"reward {name!r} raised {describe_exception(e)}{where}") from e
        if form == "text" and not _is_real(out):
            raise RewardFunctionError(
                f"reward {name!r} returned {type(out).__name__} {out!r:.60}; expected a float "
                f"(fn(prompt, response) -> float)")
        if form == "tokens" and args and not any(isinstance(a, jax.core.Tracer) for a in (*args, out)):
            shape, batch = np.shape(out), np.shape(args[0])[:1]
            if tuple(shape) != tuple(batch):
                raise RewardFunctionError(f"reward {name!r} returned shape {tuple(shape)}, expected {batch} "
                                          "(one score per row)")
        return out

    call._jaxrlhf_guarded = True  # type: ignore[attr-defined]
    return call


def _is_real(value: Any) -> bool:
    if isinstance(value, numbers.Real):
        return True
    return np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number) and not np.iscomplexobj(
        value)


def is_import_path(spec: str) -> bool:
    """Whether :func:`get_reward` reads ``spec`` as an import path (not a registered name or built-in)."""
    prefix, colon, _ = spec.partition(":")
    return spec not in _REGISTRY and not (colon and prefix in _FACTORIES) and (bool(colon) or "." in spec)


def get_reward(spec: str, tokenizer: Any = None) -> Oracle:
    """The reward named by ``spec`` (see the module docstring) as an :class:`Oracle`; ``tokenizer`` is what
    a function's other form decodes or encodes with (the policy's, or the task's)."""
    if not isinstance(spec, str):
        raise RewardSpecError(f"a reward spec must be a string, got {spec!r}")
    if spec in _REGISTRY:
        obj, jittable = _REGISTRY[spec]
        return as_reward(obj, spec, tokenizer, jittable)
    prefix, colon, arg = spec.partition(":")
    if colon and prefix in _FACTORIES:
        try:
            return _FACTORIES[prefix][1](arg, tokenizer)
        except (TypeError, ValueError) as e:
            raise RewardSpecError(f"reward {spec!r}: {e}") from None
    if colon or "." in spec:
        try:
            obj = import_object(spec, "reward")
        except ValueError as e:
            raise RewardSpecError(str(e)) from e.__cause__
        return as_reward(obj, spec, tokenizer)
    raise RewardSpecError(
        f"unknown reward {spec!r}; registered: {registered_rewards()}; or an import path "
        "'package.module:function'"
    )


# ------------------------------------------------------------------------------------------- built-ins


def _token_count(arg: str, tokenizer: Any) -> Oracle:
    try:
        token_id = int(arg)
    except ValueError:
        raise ValueError(f"expected an integer token id, got {arg!r}") from None
    return TokenFunctionOracle(token_count_reward(token_id), jittable=True, tokenizer=tokenizer,
                               name=f"token_count:{token_id}")


def _task_oracle(arg: str, tokenizer: Any) -> Oracle:
    from jaxrlhf.oracle.tasks import get_task  # the tasks build tokenizers: loaded only when asked for

    name, *options = arg.split(",")
    kwargs = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"task option {option!r}: expected key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    return get_task(name.strip(), **kwargs).oracle


_FACTORIES["token_count"] = ("token_count:<token id>", _token_count)
_FACTORIES["task"] = ("task:<task name>[,key=value...]", _task_oracle)
register_reward("length", length_reward, jittable=True)

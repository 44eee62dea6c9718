"""Find an oracle by name: registered names and import paths ``"package.module:function"``."""

from __future__ import annotations

from collections.abc import Callable

from jaxrlhf.config import import_object
from jaxrlhf.oracle.base import FunctionOracle, Oracle


class OracleSpecError(ValueError):
    """An oracle name or import path could not be resolved."""


_REGISTRY: dict[str, Oracle | Callable[[str, str], float]] = {}


def register_oracle(name: str, fn: Oracle | Callable[[str, str], float], overwrite: bool = False) -> None:
    """Register an :class:`Oracle` or a function ``fn(prompt, response) -> float`` under ``name``."""
    if not name or ":" in name:
        raise ValueError(f"oracle name {name!r} must be non-empty and contain no ':'")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"an oracle named {name!r} is already registered (pass overwrite=True)")
    if not (isinstance(fn, Oracle) or callable(fn)):
        raise TypeError(f"register_oracle({name!r}): expected an Oracle or a callable, got {fn!r}")
    _REGISTRY[name] = fn


def registered_oracles() -> list[str]:
    """Names registered with :func:`register_oracle`."""
    return sorted(_REGISTRY)


def _import_object(spec: str):
    try:
        return import_object(spec, "oracle")
    except ValueError as e:
        raise OracleSpecError(str(e)) from e.__cause__


def get_oracle(spec: str, tokenizer=None) -> Oracle:
    """The oracle named by ``spec``: a registered name or an import path ``"package.module:attr"``.

    The object found may be an :class:`Oracle`, an ``Oracle`` subclass (built with no arguments) or a
    function ``f(prompt, response) -> float`` (wrapped in :class:`FunctionOracle` with ``tokenizer``).
    The built-in tasks' oracles depend on the task's seed: take them from ``get_task(...).oracle``.
    """
    if not isinstance(spec, str):
        raise OracleSpecError(f"oracle spec must be a string, got {spec!r}")
    if spec in _REGISTRY:
        obj = _REGISTRY[spec]
    elif ":" in spec:
        obj = _import_object(spec)
    else:
        raise OracleSpecError(
            f"unknown oracle {spec!r}; registered: {registered_oracles()}; or give an import path "
            "'package.module:function' (a built-in task's oracle is get_task(name).oracle)"
        )
    if isinstance(obj, Oracle):
        return obj
    if isinstance(obj, type) and issubclass(obj, Oracle):
        return obj()
    if callable(obj):
        return FunctionOracle(obj, tokenizer=tokenizer, name=spec)
    raise OracleSpecError(f"oracle {spec!r} resolved to {obj!r}, which is neither an Oracle nor callable")

"""Typed configuration: YAML files and ``--set key=value`` overrides loaded into frozen dataclasses.

This is the project's one config system. A config class is a frozen dataclass whose fields carry type
hints (``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``Literal[...]``, ``tuple[X, ...]`` and
nested config dataclasses). Every value is checked against its hint; an unknown key or a wrong type raises
:class:`ConfigError` naming the file and the dotted key, e.g. ``configs/ppo.yaml: ppo.clip_range: expected
float, got str 'wide'``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import numbers
import os
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type.

    ``key``: the dotted key at fault when known (it decides which layer, file or ``--set``, the error
    names: :func:`load_config`)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class _ValidationError(ConfigError):
    """A section's own validation (``__post_init__``) refused its values: never a type mismatch that another
    member of a ``Union`` hint might accept."""


# Scientific notation without a dot ("1e-4"), which YAML 1.1 leaves a string.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(hint: Any) -> str:
    # A class by its name; anything else (Optional[Literal[...]], int | None) spelled out in full.
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _convert(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it in canonical form (lists become tuples)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except _ValidationError:
                raise  # the value has this member's type, but not a valid value
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return tuple(value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {_describe(value)}")
        return _build(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads "1e-4" as a string; a float field means the number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {_describe(value)}")
        if value == "~" or value.startswith("~/"):
            # A path written with ~ (in YAML, or after --set key=, where the shell leaves it alone): the home
            # directory, as the shell would read it (a literal ./~ directory would be created otherwise).
            return os.path.expanduser(value)
        return value
    raise ConfigError(f"{key}: unsupported type hint {hint!r}")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def _overlay(default: Any, value: Any, hint: Any) -> Any:
    """``value`` laid over ``default``: a mapping over a config instance of exactly the section's type
    ``hint`` becomes the instance's fields with the mapping's keys replaced (recursively), so the keys it
    does not name keep the instance's values. A key the class ``REPLACES`` others with drops those (they
    take the class defaults). Anything else (a union-typed or subclass default, a plain mapping field such
    as ``task.options``) is replaced whole, as before."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        hint = next(a for a in args if a is not type(None))  # Optional[section]: the section
    if not (isinstance(value, Mapping) and dataclasses.is_dataclass(default) and type(default) is hint):
        return value
    merged: dict[str, Any] = {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}
    for dropped in _replaced(hint, value):
        merged = _without(merged, dropped)
    hints = typing.get_type_hints(hint)
    for key, sub in value.items():
        merged[key] = _overlay(merged[key], sub, hints.get(key)) if key in merged else sub
    return merged


def _replaced(section: type, given: Mapping[str, Any]) -> list[list[str]]:
    """The key paths of config class ``section`` that the keys of ``given`` replace (its ``REPLACES``),
    less those ``given`` sets itself."""
    paths = [dropped.split(".") for key in given for dropped in getattr(section, "REPLACES", {}).get(key, ())]
    return [p for p in paths if not _has_path(given, p)]


def _without(fields: dict[str, Any], path: list[str]) -> dict[str, Any]:
    """``fields`` (a section's values by key) with the key at dotted ``path`` back at its class default:
    dropped at the top (the class default applies), inside a sub-section instance replaced by it."""
    head, *rest = path
    if not rest:
        return {k: v for k, v in fields.items() if k != head}
    inner = fields.get(head)
    if not dataclasses.is_dataclass(inner):
        return fields
    field = next((f for f in dataclasses.fields(inner) if f.name == rest[0]), None)
    if len(rest) == 1 and field is not None:
        reset = {rest[0]: _field_default(field)}
    else:
        sub = _without({f.name: getattr(inner, f.name) for f in dataclasses.fields(inner) if f.init}, rest)
        reset = {rest[0]: sub[rest[0]]} if rest[0] in sub else {}
    return {**fields, head: dataclasses.replace(inner, **reset)} if reset else fields


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key for {cls.__name__} (known: {', '.join(sorted(fields))})"
        )
    # A partial mapping for a section changes those keys of the section's own default (which a
    # default_factory may have customised), not of its class's defaults.
    data = {name: _overlay(_field_default(fields[name]), value, hints[name]) for name, value in data.items()}
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # raised by the section's own checks, keys relative to the section
        raise _validation_error(cls, prefix, e, keyed=True) from None
    except (ValueError, TypeError) as e:  # a section's own validation (__post_init__)
        raise _validation_error(cls, prefix, e) from None


# A dotted key at the start of a message: "a.b[2].c: ...".
_LEADING_KEY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*(?=:)")


def _validation_error(cls: type, prefix: str, e: Exception, keyed: bool = False) -> ConfigError:
    """The error of section ``cls`` (at ``prefix``) refusing its values, naming dotted keys.

    A ``ValueError`` names a field as ``Class.field`` (the convention of every config class, so that a
    config built in Python says which class refused it): each becomes the dotted key, ``prefix`` + field.
    A message naming no field is put under the section's key. A ``ConfigError`` (``keyed``) names keys
    relative to the section: its leading key gets the prefix.
    """
    text = " ".join(str(e).split())
    if keyed:
        key = getattr(e, "key", None)
        match = _LEADING_KEY.match(text)
        if prefix and match:
            text, key = prefix + text, prefix + match.group(0)
        elif key is None and match:
            key = match.group(0)
        return _ValidationError(text, key=key)
    fields = {f.name for f in dataclasses.fields(cls)}
    named: list[str] = []

    def dotted(m: re.Match) -> str:
        if m.group(1) not in fields:
            return m.group(0)
        named.append(prefix + m.group(1))
        return prefix + m.group(1)

    text = re.sub(rf"\b{re.escape(cls.__name__)}\.(\w+)", dotted, text)
    if named:
        return _ValidationError(text, key=named[0])
    section = prefix.rstrip(".")
    text = re.sub(rf"^{re.escape(cls.__name__)}\b:?\s*", "", text)
    return _ValidationError(f"{section}: {text}" if section else text, key=section or None)


def _key_path(key: str) -> tuple[str, ...]:
    """``"a.b[2].c"`` → ``("a", "b", "c")``: the mapping keys of a dotted key (list indices dropped)."""
    return tuple(part for part in re.sub(r"\[\d+\]", "", key).split(".") if part)


def _has_path(data: Any, path: Sequence[str]) -> bool:
    for part in path:
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


def from_dict(
    cls: type[T],
    data: Mapping[str, Any],
    source: str = "<dict>",
    layers: Sequence[tuple[str, Any]] = (),
) -> T:
    """Build config ``cls`` from a nested mapping, checking every key and type.

    An error is prefixed with ``source``, or, when its key came from one of ``layers`` (``(name, test)``
    pairs, highest first; ``test(path)`` says whether that layer set the key path), with that layer's name.
    """
    try:
        return _build(cls, data)
    except ConfigError as e:
        key = e.key if e.key is not None else _leading_key(str(e))
        where = source
        if key is not None:
            path = _key_path(key)
            where = next((name for name, sets in layers if sets(path)), source)
        raise ConfigError(f"{where}: {e}", key=key) from None


def _leading_key(text: str) -> str | None:
    match = _LEADING_KEY.match(text)
    return match.group(0) if match else None


def is_number(value: Any) -> bool:
    """Whether a config value is a Python number that a section's range check applies to: not a bool, not
    None, and not an array (the traced or stacked value of a vmapped sweep, checked where it is used)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a bool: a count, a size or a token id."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-Python form of a config dataclass (tuples become lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into a key path and a YAML-typed value (``3`` → int, ``[1,2]`` → list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str],
                    cls: type | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.path=value`` overrides applied (creating nested mappings).

    With the config class ``cls``, a mapping given for a config section (``--set 'optimizer={warmup_steps:
    5}'``) is merged into what the lower layers gave that section, as ``optimizer.warmup_steps=5`` would
    be; a free-form mapping field (``task.options``) is replaced whole."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is not a mapping")
            node = child
        section = _section_at(cls, path) if cls is not None else None
        if section is not None and isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            value = _merge_section(section, node[path[-1]], value)
        node[path[-1]] = value
    return data


def _section_at(cls: type, path: Sequence[str]) -> type | None:
    """The config section class at key ``path`` of ``cls`` (None when the path leaves the sections)."""
    node: Any = cls
    for part in path:
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return None
        node = _section_class(hints[part])
        if node is None:
            return None
    return node


def _merge_section(section: type, lower: dict[str, Any], higher: dict[str, Any]) -> dict[str, Any]:
    """``higher``'s keys laid over ``lower`` (both mappings for config class ``section``), recursing into
    sub-sections; a key ``higher`` gives drops what the class ``REPLACES`` with it."""
    merged = dict(lower)
    for dropped in _replaced(section, higher):
        _delete(merged, tuple(dropped))
    for key, value in higher.items():
        sub = _section_at(section, (key,))
        if sub is not None and isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge_section(sub, merged[key], value)
        merged[key] = value
    return merged


def expanded_keys(path: Sequence[str], value: Any) -> list[tuple[str, ...]]:
    """The key paths an override ``path=value`` sets: ``path`` and, for a mapping value, every key path
    inside it (``model={architecture: {num_layers: 1}}`` sets ``model.architecture.num_layers`` too)."""
    keys = [tuple(path)]
    if isinstance(value, dict):
        for key, sub in value.items():
            keys += expanded_keys((*path, str(key)), sub)
    return keys


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently,
    so an edit further down a config would quietly win over, or lose to, the one above it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": keys it brings may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice (first at line {seen[key]})", line)
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with errors that name the file (and line, for syntax errors and a
    key given twice)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def drop_replaced(cls: type, data: dict[str, Any], keys: Iterable[Sequence[str]]) -> dict[str, Any]:
    """A copy of ``data`` (a lower layer: the YAML file) without the keys that overriding ``keys`` replaces.

    A config class may declare ``REPLACES = {"key": ("other", ...)}``: giving ``key`` in a higher layer
    (``--set``) makes its ``other`` keys of the lower layer no longer apply, e.g. ``--set model.path=…``
    drops the file's ``model.architecture`` and ``model.tokenizer`` (the model directory brings its own),
    so that one override switches a recipe to another source without a second ``--set …=null``. Keys in
    a ``REPLACES`` tuple are dotted paths relative to the declaring class. A key inside ``key`` counts as
    giving it (``--set model.architecture.num_layers=1`` drops the file's ``model.path``, as ``--set
    model.architecture=…`` does). A key the overrides set themselves is never dropped.
    """
    import copy

    data = copy.deepcopy(data)
    keys = [tuple(k) for k in keys]
    overridden = set(keys)
    for key in keys:
        node_cls: Any = cls
        for depth in range(len(key)):
            if node_cls is None:
                break
            here, rest = key[:depth], ".".join(key[depth:])
            # A key or any key inside it: model.architecture.num_layers names model.architecture too.
            for named, replaced in getattr(node_cls, "REPLACES", {}).items():
                if rest != named and not rest.startswith(named + "."):
                    continue
                for dropped in replaced:
                    path = (*here, *dropped.split("."))
                    if path not in overridden:
                        _delete(data, path)
            hints = typing.get_type_hints(node_cls) if dataclasses.is_dataclass(node_cls) else {}
            node_cls = _section_class(hints[key[depth]]) if key[depth] in hints else None
    return data


def _delete(data: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = data
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    preset: Iterable[str] = (),
    preset_name: str = "the preset",
) -> T:
    """Load ``cls`` from an optional YAML file, then a ``preset`` (``key=value`` strings, e.g. ``--quick``'s),
    then ``key=value`` overrides (each layer wins over the one before; an override may replace other keys of
    the file, see :func:`drop_replaced`)."""
    data = read_yaml(path) if path is not None else {}
    preset, overrides = list(preset), list(overrides)
    keys = [k for o in overrides for k in expanded_keys(*parse_override(o))]
    preset_keys = [k for o in preset for k in expanded_keys(*parse_override(o))]
    file_data = drop_replaced(cls, data, [*preset_keys, *keys])
    data = apply_overrides(file_data, [*preset, *overrides], cls)
    source = " + ".join([str(path) if path is not None else "defaults",
                         *([preset_name] if preset else []), *(["--set"] if overrides else [])])

    # An error names the layer that set its key: --set (the key or a section above it; a section the file
    # does not give that --set wrote into), then the preset likewise, else the file (a section a higher
    # layer wrote into too: both named).
    def under(p: tuple[str, ...], layer_keys: list[tuple[str, ...]]) -> bool:
        return any(k[: len(p)] == p for k in layer_keys)

    def set_by(layer_keys: list[tuple[str, ...]]) -> Any:
        return lambda p: (any(p[: len(k)] == k for k in layer_keys)
                          or (under(p, layer_keys) and not _has_path(file_data, p)))

    layers: list[tuple[str, Any]] = [("--set", set_by(keys)), (preset_name, set_by(preset_keys))]
    if path is not None:
        layers.append((str(path), lambda p: _has_path(file_data, p) and not under(p, [*preset_keys, *keys])))
    return from_dict(cls, data, source=source, layers=layers)


def replace(config: T, **changes: Any) -> T:
    """``dataclasses.replace`` re-checked through the type system."""
    return from_dict(type(config), {**to_dict(config), **to_dict_values(changes)})


def to_dict_values(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in values.items()}


def import_object(spec: str, what: str = "object") -> Any:
    """The object a config names by import path: ``"package.module:attr"`` (``attr`` may be dotted), or
    ``"package.module.attr"``. Errors are ``ValueError``s that quote ``what`` and the spec.

    Modules are imported as ``python -m`` would: the working directory comes first on ``sys.path`` (the
    ``jaxrlhf`` console script does not put it there), so ``my_rewards:score`` finds ``./my_rewards.py``.
    An exception raised while the module runs (a syntax error, a failing import inside it) is reported in
    one line with its file and line.
    """
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
    else:
        module_name, _, attr_path = spec.rpartition(".")
    if not module_name or not attr_path or ":" in attr_path:
        raise ValueError(f"{what} {spec!r}: an import path must look like 'package.module:function'")
    working_directory_on_path()
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({e})") from e
    except Exception as e:  # the module itself failed: say where
        raise ValueError(f"{what} {spec!r}: importing {module_name!r} raised {describe_exception(e)}") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            owner = getattr(obj, "__name__", module_name)
            raise ValueError(f"{what} {spec!r}: {owner!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    return obj


def working_directory_on_path() -> None:
    """Put the working directory first on ``sys.path`` (once), as ``python -m`` and ``python script.py``
    do, so that a user's modules beside their data import by name."""
    import os
    import sys

    cwd = os.getcwd()
    if not any(entry in ("", cwd) for entry in sys.path):
        sys.path.insert(0, cwd)


def describe_exception(e: BaseException) -> str:
    """``Type: message (file:line)`` of an exception, the line being the deepest frame of its traceback."""
    import traceback

    text = " ".join(str(e).split())
    frames = traceback.extract_tb(e.__traceback__)
    if isinstance(e, SyntaxError) and e.filename:
        return f"SyntaxError: {e.msg} ({e.filename}:{e.lineno})"
    place = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {text}{place}"


# ------------------------------------------------------------------------------------------ description


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as ``--help`` lists it: dotted key, type, default, and its comment in the source."""

    key: str
    type: str
    default: str  # as YAML would write it; "(required)" when the key has no default
    help: str = ""
    section: bool = False  # a nested config (its keys follow)


_REQUIRED = "(required)"


def _plain_type(hint: Any) -> str:
    """A type as a user writes the value: ``int``, ``float | null``, ``{k1,k2,k3}``, ``list of int``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any"
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        parts = [_plain_type(a) for a in args if a is not type(None)]
        return " | ".join(parts + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (tuple, list):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_plain_type(args[0])}"
        return f"[{', '.join(_plain_type(a) for a in args)}]" if args else "list"
    if origin is dict or hint is dict:
        return "mapping"
    if dataclasses.is_dataclass(hint):
        return "section"
    return getattr(hint, "__name__", str(hint))


def _yaml_value(value: Any) -> str:
    """A default as it would appear in a YAML config (``null``, ``true``, ``[1, 2]``, ``''``)."""
    import yaml

    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: comment lines right above it, then a trailing one."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}  # a class without source (built at run time): no help text
    lines = source.splitlines()
    comment = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    out = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above, k = [], node.lineno - 1
        while k in comment and lines[k - 1].lstrip().startswith("#"):
            above.insert(0, comment[k])
            k -= 1
        last = node.end_lineno or node.lineno
        trailing = [comment[n] for n in range(node.lineno, last + 1) if n in comment]
        text = " ".join(c for c in above + trailing if c and not re.match(r"(noqa|type:)", c))
        if text:
            out[node.target.id] = text
    return out


def _docstring_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    first = doc.split("\n\n")[0]
    return " ".join(first.split())


def _section_class(hint: Any) -> type | None:
    """The config dataclass a field holds (directly or as ``X | None``), else None."""
    return next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)


def describe_config(cls: type, default: Any = None, prefix: str = "") -> list[KeyDoc]:
    """Every key of config class ``cls`` as dotted keys: its own keys in field order, then each nested
    section's.

    Defaults are those of ``default`` (an instance; a parent's default for this section may differ from
    the class's own), else of the class; an optional section that defaults to null lists its keys with the
    class's defaults, which apply once the section is given.
    """
    hints = typing.get_type_hints(cls)
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # an inherited field keeps the comment of the class defining it
        if dataclasses.is_dataclass(base):
            comments.update(_comments(base))
    keys: list[KeyDoc] = []
    sections: list[KeyDoc] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key, hint = prefix + field.name, hints[field.name]
        if default is not None:
            value, has_default = getattr(default, field.name), True
        elif field.default is not dataclasses.MISSING:
            value, has_default = field.default, True
        elif field.default_factory is not dataclasses.MISSING:
            value, has_default = field.default_factory(), True
        else:
            value, has_default = None, False
        help_text = str(field.metadata.get("help", "")) or comments.get(field.name, "")
        section = _section_class(hint)
        if section is None:
            shown = _yaml_value(value) if has_default else _REQUIRED
            keys.append(KeyDoc(key, _plain_type(hint), shown, help_text))
            continue
        shown = _yaml_value(value) if value is None and has_default else ""
        sections.append(KeyDoc(key, _plain_type(hint), shown, help_text or _docstring_line(section), True))
        instance = value if dataclasses.is_dataclass(value) else None
        sections += describe_config(section, instance, key + ".")
    return keys + sections


def _readable(text: str) -> str:
    """Docstring markup off: ``code`` and :class:`Name` read as plain text in a terminal."""
    return re.sub(r":\w+:`~?([^`]*)`", r"\1", text).replace("``", "")


def format_config_help(cls: type, width: int = 100) -> str:
    """The ``--help`` listing of ``cls``'s keys: ``key  type = default``, the key's comment below it;
    each section headed by its name and the first paragraph of its docstring."""
    docs = describe_config(cls)
    key_width = min(max((len(d.key) for d in docs), default=0), 36)
    out: list[str] = []
    for d in docs:
        if d.section:
            optional = "optional section, " if "null" in d.type else ""
            default = f" ({optional}default {d.default})" if d.default else ""
            out += ["", f"{d.key}:{default}"]
            indent = "  "
        else:
            value = d.default if d.default == _REQUIRED else f"= {d.default}"
            out.append(f"  {d.key:<{key_width}}  {d.type} {value}")
            indent = "      "
        if d.help:
            out += textwrap.wrap(_readable(d.help), width, initial_indent=indent, subsequent_indent=indent)
    return "\n".join(out).lstrip("\n") + "\n"

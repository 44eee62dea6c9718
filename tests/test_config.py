"""The typed config system: YAML + overrides into frozen dataclasses, with errors that name the key."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import pytest

from jaxrlhf.config import (
    ConfigError,
    KeyDoc,
    describe_config,
    format_config_help,
    load_config,
    parse_override,
    to_dict,
)


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-5
    schedule: Literal["linear", "constant"] = "linear"
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "run"
    steps: int = 10
    clip: float | None = None
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "steps: 5\ninner:\n  lr: 3.0e-4\n  stop_ids: [2, 7]\n")
    cfg = load_config(Outer, path, ["inner.schedule=constant", "clip=0.2", "flag=true", "name=x"])
    assert cfg == Outer(
        name="x", steps=5, clip=0.2, flag=True, inner=Inner(lr=3e-4, schedule="constant", stop_ids=(2, 7))
    )
    assert to_dict(cfg)["inner"]["stop_ids"] == [2, 7]
    assert load_config(Outer) == Outer()
    # Ints are accepted where floats are expected; None where Optional; "1e-4" (a string to YAML 1.1) too.
    assert load_config(Outer, overrides=["inner.lr=1", "clip=null"]).inner.lr == 1.0
    assert load_config(Outer, overrides=["inner.lr=1e-4", "clip=2E3"]) == Outer(
        clip=2000.0, inner=Inner(lr=1e-4)
    )
    assert load_config(Outer, write(tmp_path, "inner: {lr: 3e-6}\n")).inner.lr == 3e-6


@dataclasses.dataclass(frozen=True)
class Tuned:
    """A section whose default is not its class's: overriding one of its keys keeps the others."""

    inner: Inner = dataclasses.field(default_factory=lambda: Inner(lr=2e-3, schedule="constant"))
    outer: Outer = dataclasses.field(default_factory=lambda: Outer(steps=3, inner=Inner(lr=7.0)))


def test_a_partial_section_changes_only_its_keys_of_the_section_default(tmp_path):
    """`--set inner.stop_ids=[1]` once rebuilt `inner` from Inner's class defaults, silently resetting the
    lr and schedule the field's default_factory had chosen (e.g. a study's pipeline, DPO's learning rate,
    each command's logging.run_dir); now only the named key changes, at any depth and from a file too."""
    cfg = load_config(Tuned, overrides=["inner.stop_ids=[1]", "outer.inner.schedule=constant"])
    assert cfg.inner == Inner(lr=2e-3, schedule="constant", stop_ids=(1,))
    assert cfg.outer == Outer(steps=3, inner=Inner(lr=7.0, schedule="constant"))
    assert load_config(Tuned, write(tmp_path, "outer: {flag: true}\n")).outer == Outer(
        steps=3, flag=True, inner=Inner(lr=7.0))
    with pytest.raises(ConfigError, match=r"outer\.inner\.lrr: unknown key for Inner"):
        load_config(Tuned, overrides=["outer.inner.lrr=1"])


@dataclasses.dataclass(frozen=True)
class Source:
    path: str | None = None
    name: str | None = None
    REPLACES: ClassVar[dict[str, tuple[str, ...]]] = {"path": ("name",)}


@dataclasses.dataclass(frozen=True)
class Wider(Inner):
    extra: int = 0


@dataclasses.dataclass(frozen=True)
class Shapes:
    optional: Inner | None = dataclasses.field(default_factory=lambda: Inner(lr=9.0))
    absent: Inner | None = None
    either: Inner | Outer = dataclasses.field(default_factory=lambda: Inner(lr=9.0))
    wider: Inner = dataclasses.field(default_factory=lambda: Wider(lr=9.0, extra=1))
    source: Source = dataclasses.field(default_factory=lambda: Source(name="builtin"))
    table: dict = dataclasses.field(default_factory=lambda: {"a": 1, "b": 2})


def test_which_sections_a_partial_mapping_keeps():
    """Kept: an Optional section's default. Replaced whole (class defaults), as before: a None default, a
    union of sections, a default of a subclass, and a plain mapping (e.g. task.options). A key the class
    REPLACES others with drops them from the default too."""
    cfg = load_config(Shapes, overrides=["optional.schedule=constant", "absent.schedule=constant",
                                         "either.schedule=constant", "wider.schedule=constant",
                                         "source.path=/m", "table.a=5"])
    assert cfg.optional == Inner(lr=9.0, schedule="constant")
    assert cfg.absent == Inner(schedule="constant") and cfg.either == Inner(schedule="constant")
    assert type(cfg.wider) is Inner and cfg.wider == Inner(schedule="constant")
    assert cfg.source == Source(path="/m") and cfg.table == {"a": 5}
    assert load_config(Shapes, overrides=["optional=null"]).optional is None


@dataclasses.dataclass(frozen=True)
class Layered:
    outer: Outer = dataclasses.field(default_factory=Outer)
    source: Source = dataclasses.field(default_factory=Source)
    table: dict = dataclasses.field(default_factory=lambda: {"a": 1})


def test_a_section_mapping_in_set_changes_only_its_keys_of_the_lower_layers(tmp_path):
    """`--set 'outer={inner: {lr: 5}}'` once replaced the file's (or the preset's) whole `outer`, losing its
    steps; it now merges as `--set outer.inner.lr=5` does. A plain mapping field is still replaced whole,
    and a key the section REPLACES others with drops them from the lower layers, as a dotted --set does."""
    path = write(tmp_path, "outer: {steps: 5, inner: {schedule: constant}}\nsource: {name: n}\n"
                           "table: {a: 2, b: 3}\n")
    want = Outer(steps=5, inner=Inner(lr=5.0, schedule="constant"))
    for override in ("outer={inner: {lr: 5}}", "outer.inner={lr: 5}", "outer.inner.lr=5"):
        assert load_config(Layered, path, [override]).outer == want, override
        preset = load_config(Layered, path, [override], preset=["outer.flag=true"])
        assert preset.outer == dataclasses.replace(want, flag=True), override
    assert load_config(Layered, path, ["table={c: 4}"]).table == {"c": 4}
    for override in ("source={path: /m}", "source.path=/m"):
        assert load_config(Layered, path, [override]).source == Source(path="/m"), override
    assert load_config(Layered, path, ["source={path: /m, name: x}"]).source == Source(path="/m", name="x")


@dataclasses.dataclass(frozen=True)
class Model:
    architecture: Inner | None = None
    path: str | None = None
    REPLACES: ClassVar[dict[str, tuple[str, ...]]] = {"architecture": ("path",), "path": ("architecture",)}


@dataclasses.dataclass(frozen=True)
class WithModel:
    model: Model = dataclasses.field(default_factory=Model)


def test_a_key_inside_a_replacing_key_replaces_too(tmp_path):
    """`--set model.architecture.lr=1` names model.architecture, so it drops the file's model.path as
    `--set model.architecture={lr: 1}` does (it once kept both, an error only at run time)."""
    path = write(tmp_path, "model: {path: /m}\n")
    for override in ("model.architecture.lr=1", "model.architecture={lr: 1}",
                     "model={architecture: {lr: 1}}"):
        assert load_config(WithModel, path, [override]).model == Model(architecture=Inner(lr=1.0)), override


@dataclasses.dataclass(frozen=True)
class Nested:
    x: int = 0
    inner: Inner = dataclasses.field(default_factory=Inner)
    REPLACES: ClassVar[dict[str, tuple[str, ...]]] = {"x": ("inner.lr",)}


@dataclasses.dataclass(frozen=True)
class HoldsNested:
    sec: Nested = dataclasses.field(default_factory=lambda: Nested(inner=Inner(lr=7.0, schedule="constant")))


def test_a_dotted_replaced_key_goes_back_to_its_class_default_within_one_layer(tmp_path):
    """A REPLACES entry may be a dotted path: giving `x` puts `inner.lr` back to Inner's default whether the
    section's default or a lower layer (the file) had set it; the other keys stay."""
    want = Nested(x=1, inner=Inner(schedule="constant"))
    assert load_config(HoldsNested, overrides=["sec.x=1"]).sec == want
    assert load_config(HoldsNested, write(tmp_path, "sec: {inner: {lr: 3.0}}\n"), ["sec.x=1"]).sec == want


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stepz=3", r"stepz: unknown key for Outer"),
        ("inner.lrr=3", r"inner\.lrr: unknown key for Inner"),
        ("steps=abc", r"steps: expected int, got str 'abc'"),
        ("steps=1.5", r"steps: expected int, got float 1\.5"),
        ("flag=1", r"flag: expected bool, got int 1"),
        ("clip=1e-4x", r"clip: expected float \| None, got str '1e-4x'"),
        ("inner.schedule=cosine", r"inner\.schedule: expected one of \['linear', 'constant'\]"),
        ("inner.stop_ids=[1, x]", r"inner\.stop_ids\[1\]: expected int"),
        ("inner=3", r"inner: expected a mapping of Inner fields"),
        ("novalue", r"expected key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, overrides=[override])


def test_errors_name_the_file(tmp_path):
    path = write(tmp_path, "steps: 5\nbogus: 1\n")
    with pytest.raises(ConfigError, match=rf"{path}: bogus: unknown key"):
        load_config(Outer, path)
    bad = write(tmp_path, "steps: [1,\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+: invalid YAML"):
        load_config(Outer, bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    top = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(Outer, top)


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1,2]") == (["a"], [1, 2])
    assert parse_override("a=hello world") == (["a"], "hello world")
    assert parse_override("a=") == (["a"], "")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(Outer).steps = 3  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class Shape:
    """Shape of a thing.

    Second paragraph, not shown in --help.
    """

    width: int = 4
    # How the thing is cut; a comment long enough that it has to wrap when the listing is narrow, so that a
    # reader still sees all of it, indented under its key.
    cut: Literal["even", "odd"] = "even"


@dataclasses.dataclass(frozen=True)
class Documented:
    name: str  # required: no default
    rate: float | None = 0.5  # per step
    ids: tuple[int, ...] = (1, 2)
    mode: Literal["a", "b"] | None = None
    tag: str = dataclasses.field(default="", metadata={"help": "from field metadata"})
    inner: Inner = dataclasses.field(default_factory=lambda: Inner(lr=0.25))
    shape: Shape | None = None


def test_describe_config_lists_every_key_with_type_default_and_comment():
    docs = {d.key: d for d in describe_config(Documented)}
    assert list(docs) == [
        "name", "rate", "ids", "mode", "tag",  # own keys first, then each section's
        "inner", "inner.lr", "inner.schedule", "inner.stop_ids",
        "shape", "shape.width", "shape.cut",
    ]  # fmt: skip
    assert docs["name"] == KeyDoc("name", "str", "(required)", "required: no default")
    assert docs["rate"] == KeyDoc("rate", "float | null", "0.5", "per step")
    assert (docs["ids"].type, docs["ids"].default) == ("list of int", "[1, 2]")
    assert (docs["mode"].type, docs["mode"].default) == ("{a,b} | null", "null")
    assert docs["tag"] == KeyDoc("tag", "str", "''", "from field metadata")
    # A section's defaults are the parent's default instance's, not the section class's.
    assert docs["inner.lr"].default == "0.25" and docs["inner.schedule"].type == "{linear,constant}"
    assert docs["shape"] == KeyDoc("shape", "section | null", "null", "Shape of a thing.", section=True)
    assert docs["shape.width"].default == "4"
    cut = docs["shape.cut"].help
    assert cut.startswith("How the thing is cut; a comment") and cut.endswith("indented under its key.")


def test_format_config_help_is_readable_at_any_width():
    text = format_config_help(Documented, width=60)
    assert "  name" in text and "str (required)" in text
    assert "shape: (optional section, default null)\n  Shape of a thing.\n" in text
    assert "Second paragraph" not in text
    lines = text.splitlines()
    cut = next(i for i, line in enumerate(lines) if line.strip().startswith("shape.cut"))
    wrapped = lines[cut + 1 : cut + 4]
    assert all(line.startswith("      ") and len(line) <= 60 for line in wrapped)
    assert " ".join(w.strip() for w in wrapped).endswith("indented under its key.")


def test_a_key_given_twice_in_a_config_file_is_named(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a config file says which line repeats which."""
    from jaxrlhf.config import read_yaml

    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  steps: 2\nlogging:\n  level: INFO\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:5: key 'train' is given twice \(first at line 1\)"):
        read_yaml(path)
    path.write_text("train:\n  steps: 2\n  seed: 1\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:4: key 'steps' is given twice \(first at line 2\)"):
        read_yaml(path)
    path.write_text("base: &b {steps: 2}\ntrain:\n  <<: *b\n  seed: 1\n")  # a merge key is not a repeat
    assert read_yaml(path)["train"] == {"steps": 2, "seed": 1}

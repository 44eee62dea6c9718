"""Where a step's time goes, op by op: a profiler trace joined with the optimised programs.

A run to analyse does three things (``benchmarks/ppo_iteration.py --profile DIR`` does them):

1. starts XLA with its optimised programs dumped as text (:func:`xla_flags`: ``--xla_dump_to``; on the
   CPU also ``--xla_cpu_enable_xprof_traceme``, without which the CPU runtime records no per-op events),
   with JAX's persistent compilation cache off (a program loaded from it is not compiled, so not dumped:
   its ops would count as ``unknown``);
2. traces the steps with ``jax.profiler`` (``create_perfetto_trace=True``), each phase inside a
   :func:`phase` annotation;
3. calls :func:`profile_phases` on the two directories.

Every op event of the trace names its program (``hlo_module``) and instruction (``hlo_op``); the dump gives
that instruction's result shape, what it computes and the JAX name stack it came from (its ``op_name``). An op
is then counted under

* a **kind**: ``matmul`` (a dot or convolution, alone or fused with the elementwise work around it),
  ``data movement`` (copies, transposes, slices, broadcasts, pads, concatenations: no arithmetic),
  ``in-place update`` (dynamic-update-slice, scatter), ``collective``, ``control flow`` (the loop and
  branch instructions themselves, not their bodies) or ``elementwise / reduce`` (everything else);
* a **region**: the innermost of :data:`REGIONS` in its name stack (the model and the steps enter these
  with ``jax.named_scope``), else ``other``;
* a **pass**: ``backward`` (autodiff's transpose), ``recompute`` (the forward that a remat policy runs
  again inside the backward) or ``forward``.

Times are the sums of the op events that fall inside each phase's window, in milliseconds per call of the
phase. On the CPU an op can run beside another (XLA's runtime starts independent instructions together),
so ``op_ms`` may exceed the window's wall time; a long gap between them is host time (dispatch, Python).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import glob
import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax

from jaxrlhf.rollout.loop_copies import elements, parse_computations

# Named scopes that the model and the steps enter (innermost wins).
REGIONS = ("embed", "norm", "attn_proj", "kv_cache", "attention", "mlp", "lm_head", "logprobs", "sampling",
           "optimizer")
PHASE_PREFIX = "phase:"
KINDS = ("matmul", "elementwise / reduce", "data movement", "in-place update", "collective", "control flow")

_MATMUL = {"dot", "convolution"}
_MOVEMENT = {"copy", "transpose", "slice", "dynamic-slice", "reshape", "broadcast", "concatenate", "pad",
             "reverse", "gather", "iota", "copy-start", "copy-done"}
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                         r"collective-broadcast)(-start|-done)?$")
_CONTROL = {"while", "conditional", "call"}
_CALLS = re.compile(r"\bcalls=%([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_MATMUL_TARGET = re.compile(r"gemm|matmul|cublas|\bdot\b", re.IGNORECASE)
_DUMP = re.compile(r"^module_\d+\.(.+?)\.[a-z]+_after_optimizations\.txt$")


class OpInfo(NamedTuple):
    """One instruction of an optimised program: result shape, kind, region, pass and JAX name stack."""

    shape: str
    kind: str
    region: str
    pass_: str
    op_name: str


def xla_flags(dump_dir: str) -> tuple[str, ...]:
    """The XLA flags a profiled run starts with: its optimised programs written as text to ``dump_dir``
    and the CPU runtime's per-op trace events (a CPU flag; other backends trace their kernels anyway)."""
    return (f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_as_text", "--xla_cpu_enable_xprof_traceme")


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A trace annotation that :func:`profile_phases` reads as the window of phase ``name``."""
    with jax.profiler.TraceAnnotation(PHASE_PREFIX + name):
        yield


def region_of(op_name: str) -> str:
    """The innermost of :data:`REGIONS` among the segments of a JAX name stack, else ``"other"``. A
    segment may wrap the scope in transformations (``transpose(jvp(mlp))``)."""
    for segment in reversed(re.split(r"[/()]", op_name)):
        if segment in REGIONS:
            return segment
    return "other"


def pass_of(op_name: str) -> str:
    """``backward`` under autodiff's transpose, ``recompute`` in a remat policy's rerun, ``optimizer`` for
    the update of the parameters (the ``optimizer`` region), else ``forward``."""
    if "rematted_computation" in op_name:
        return "recompute"
    if "transpose(" in op_name:
        return "backward"
    return "optimizer" if region_of(op_name) == "optimizer" else "forward"


def _kind(comps: Mapping[str, list], opcode: str, rest: str, seen: frozenset = frozenset()) -> str:
    if opcode in _MATMUL:
        return "matmul"
    if opcode == "custom-call":
        target = _TARGET.search(rest)
        return "matmul" if target and _MATMUL_TARGET.search(target.group(1)) else "elementwise / reduce"
    if _COLLECTIVE.match(opcode):
        return "collective"
    if opcode in _CONTROL:
        return "control flow"
    if opcode in _IN_PLACE:
        return "in-place update"
    if opcode in _MOVEMENT or opcode in _FREE:
        return "data movement"
    if opcode != "fusion":
        return "elementwise / reduce"
    called = _CALLS.search(rest)
    body = comps.get(called.group(1), []) if called and called.group(1) not in seen else []
    seen = seen | {called.group(1)} if called else seen
    kinds = {_kind(comps, op, r, seen) for _, _, _, op, r in body}
    root = next((op for is_root, _, _, op, _ in body if is_root), None)
    if "matmul" in kinds:
        return "matmul"
    if root in _IN_PLACE or (root == "bitcast" and "in-place update" in kinds):
        return "in-place update"
    if kinds <= {"data movement"}:
        return "data movement"
    return "elementwise / reduce"


def _matmul_op_name(comps: Mapping[str, list], rest: str, seen: frozenset = frozenset()) -> str | None:
    """The op_name of the first dot or convolution inside a fusion (searched through nested fusions)."""
    called = _CALLS.search(rest)
    if called is None or called.group(1) in seen:
        return None
    for _, _, _, opcode, inner in comps.get(called.group(1), []):
        if opcode in _MATMUL:
            found = _OP_NAME.search(inner)
            return found.group(1) if found else None
        if opcode == "fusion":
            found = _matmul_op_name(comps, inner, seen | {called.group(1)})
            if found is not None:
                return found
    return None


def program_ops(text: str) -> dict[str, OpInfo]:
    """Every instruction of an optimised program's text (``compiled.as_text()`` or a dump) by name. A
    fusion takes its root's op_name, except a matmul fusion, which takes its matmul's (a vocabulary
    projection fused with the softmax's max belongs to the LM head, not to the sampler)."""
    comps = parse_computations(text)
    ops = {}
    for instrs in comps.values():
        # XLA's rewrites can drop an instruction's metadata (a decode step's batched attention dots):
        # such an instruction takes the op_name of its first user that has one.
        named = {name: m.group(1) for _, name, _, _, rest in instrs if (m := _OP_NAME.search(rest))}
        user_name: dict[str, str] = {}
        for _, name, _, _, rest in instrs:
            for operand in _OPERAND.findall(rest.split(")", 1)[0]):
                if name in named:
                    user_name.setdefault(operand, named[name])
        for _, name, shape, opcode, rest in instrs:
            kind = _kind(comps, opcode, rest)
            op_name = named.get(name) or user_name.get(name, "")
            if kind == "matmul" and opcode == "fusion":
                op_name = _matmul_op_name(comps, rest) or op_name
            ops[name] = OpInfo(shape.split("{")[0] if elements(shape) else shape[:40], kind,
                               region_of(op_name), pass_of(op_name), op_name)
    return ops


def load_programs(dump_dir: str) -> dict[str, dict[str, OpInfo]]:
    """Program name (as the trace names it, e.g. ``jit_apart``) → its instructions, from an XLA dump; of
    several programs of one name the last compiled wins."""
    found: dict[str, tuple[int, str]] = {}
    for path in glob.glob(os.path.join(dump_dir, "module_*_after_optimizations.txt")):
        base = os.path.basename(path)
        m = _DUMP.match(base)
        if m:
            number = int(base.split(".")[0].split("_")[1])
            if m.group(1) not in found or number > found[m.group(1)][0]:
                found[m.group(1)] = (number, path)
    programs = {}
    for name, (_, path) in found.items():
        with open(path) as f:
            programs[name] = program_ops(f.read())
    return programs


def load_trace(trace_dir: str) -> list[dict[str, Any]]:
    """The complete ('X') events of the newest perfetto trace that ``jax.profiler`` wrote under
    ``trace_dir``."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}/plugins/profile "
                                "(jax.profiler.start_trace(..., create_perfetto_trace=True))")
    with gzip.open(paths[-1]) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def _ms(microseconds: float, calls: int) -> float:
    return round(microseconds / 1e3 / max(calls, 1), 3)


def _exclusive(ops: list[Mapping[str, Any]], starts: list[float], loop: Mapping[str, Any]) -> float:
    """A loop or branch event's own time: its span less the union of the spans of its program's other op
    events inside it (its body's ops, on any thread, nested loops included). ``ops`` sorted by start,
    ``starts`` their start times. (The CPU runtime's event for a loop spans the ops of its body.)"""
    start, end = loop["ts"], loop["ts"] + loop["dur"]
    module = loop["args"].get("hlo_module")
    spans = []
    for e in ops[bisect.bisect_left(starts, start):]:
        if e["ts"] >= end:
            break
        if e is not loop and e["ts"] >= start and e["args"].get("hlo_module") == module:
            spans.append((e["ts"], min(e["ts"] + e["dur"], end)))
    covered, reach = 0.0, start
    for s, t in sorted(spans):
        if t > reach:
            covered += t - max(s, reach)
            reach = t
    return max(loop["dur"] - covered, 0.0)


def phase_breakdown(events: Iterable[Mapping[str, Any]], programs: Mapping[str, Mapping[str, OpInfo]],
                    top: int = 15) -> dict[str, dict[str, Any]]:
    """Per phase (the :func:`phase` windows in ``events``), per call: wall and op time and the op time by
    kind, region, pass and region × kind, with the ``top`` ops. Ops of programs missing from ``programs``
    count as ``unknown``."""
    events = list(events)
    windows = collections.defaultdict(list)
    for e in events:
        # The exporter names a "phase:NAME" annotation "NAME" and keeps the whole of it as long_name.
        label = (e.get("args") or {}).get("long_name") or e.get("name", "")
        if label.startswith(PHASE_PREFIX):
            windows[label[len(PHASE_PREFIX):]].append((e["ts"], e["ts"] + e["dur"]))
    ops = sorted((e for e in events if "hlo_op" in (e.get("args") or {})), key=lambda e: e["ts"])
    info_of = {id(e): programs.get(e["args"].get("hlo_module", ""), {}).get(e["args"]["hlo_op"]) for e in ops}
    starts = [e["ts"] for e in ops]
    duration = {id(e): _exclusive(ops, starts, e) if getattr(info_of[id(e)], "kind", "") == "control flow"
                else e["dur"] for e in ops}
    out = {}
    for name, spans in windows.items():
        calls = len(spans)
        totals: dict[str, dict[str, float]] = {k: collections.defaultdict(float)
                                               for k in ("kind", "region", "pass", "region_kind")}
        per_op: dict[tuple[str, str], list] = {}
        op_us = 0.0
        for e in ops:
            if not any(start <= e["ts"] < end for start, end in spans):
                continue
            module, op = e["args"].get("hlo_module", ""), e["args"]["hlo_op"]
            info = info_of[id(e)] or OpInfo("", "unknown", "other", "forward", "")
            us = duration[id(e)]
            op_us += us
            totals["kind"][info.kind] += us
            totals["region"][info.region] += us
            totals["pass"][info.pass_] += us
            totals["region_kind"][f"{info.region} | {info.kind}"] += us
            entry = per_op.setdefault((module, op), [0.0, 0, info])
            entry[0] += us
            entry[1] += 1
        ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
        out[name] = {
            "calls": calls,
            "wall_ms": _ms(sum(end - start for start, end in spans), calls),
            "op_ms": _ms(op_us, calls),
            **{f"by_{k}": {key: _ms(us, calls) for key, us in sorted(v.items(), key=lambda kv: -kv[1])}
               for k, v in totals.items()},
            "top_ops": [{"program": module, "op": op, "ms": _ms(us, calls), "events_per_call": n / calls,
                         "kind": info.kind, "region": info.region, "pass": info.pass_, "shape": info.shape,
                         "op_name": info.op_name[-160:]}
                        for (module, op), (us, n, info) in ranked],
        }
    return out


def profile_phases(trace_dir: str, dump_dir: str, top: int = 15) -> dict[str, dict[str, Any]]:
    """:func:`phase_breakdown` of the newest trace under ``trace_dir`` with the programs in ``dump_dir``."""
    return phase_breakdown(load_trace(trace_dir), load_programs(dump_dir), top)

"""One order for every device's collectives: loops fenced in programs that run on several CPU processes.

Why: XLA's CPU runtime runs the independent operations of a program concurrently (its thunk executor), and
it orders collectives only against other top-level collectives, not against a loop (``while``, ``scan``,
``cond``) that holds collectives inside. On several processes the devices then may enter the same
collectives in different orders — one device all-gathers inside a decode loop while its peers all-reduce
a metric outside it — and gloo, which pairs the messages of one communicator in order, waits forever. A
run of 2 processes × 4 CPU devices hung this way in its first experience phase (a ``lax.map`` over
micro-batches beside the reference's forward). Accelerators run one stream per device, so they are safe.

The fix, :func:`sequence_loops`: trace the function to a jaxpr and evaluate it with an optimisation barrier
before and after every loop (recursively, inside loop bodies too) over every value still live, so that
each loop runs after everything written before it and before everything written after it, on every device
alike. It changes no value, only the order; it blocks fusion across loop boundaries, so it is applied only
where it is needed (:func:`needs_sequencing`: a CPU backend with more than one process, or
``JAXRLHF_SEQUENCE_LOOPS=1``).

:func:`unordered_collectives` checks a compiled (optimised) HLO module for the hazard: in any computation,
a loop or conditional that holds collectives and another collective-bearing instruction with no data path
between them. The multi-device tests run it on the programs of the RL trainers.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core

SEQUENCE_ENV = "JAXRLHF_SEQUENCE_LOOPS"
_LOOPS = ("while", "scan", "cond")
_INLINED = ("pjit", "jit", "closed_call", "core_call")


def needs_sequencing() -> bool:
    """Whether jitted steps should be wrapped in :func:`sequence_loops`: on a CPU backend with several
    processes (gloo collectives), or when ``JAXRLHF_SEQUENCE_LOOPS=1`` (``0`` turns it off)."""
    forced = os.environ.get(SEQUENCE_ENV)
    if forced is not None:
        return forced not in ("", "0", "false")
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def maybe_sequence_loops(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``sequence_loops(fn)`` where :func:`needs_sequencing`, else ``fn`` itself."""
    return sequence_loops(fn) if needs_sequencing() else fn


def sequence_loops(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every loop fenced: same inputs, same outputs, bitwise; meant to be called under ``jit``.

    Array arguments (pytree leaves) are traced; other leaves (Python scalars, strings, None) are closed over,
    so static arguments of the enclosing ``jit`` keep working.
    """

    @functools.wraps(fn)
    def sequenced(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree.flatten((args, kwargs))
        traced = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, jax.core.Tracer))]
        out_tree: list[Any] = []

        def flat_fn(*arrays: Any) -> list[Any]:
            full = list(leaves)
            for i, x in zip(traced, arrays):
                full[i] = x
            a, k = jax.tree.unflatten(treedef, full)
            out, tree = jax.tree.flatten(fn(*a, **k))
            out_tree.append(tree)
            return out

        arrays = [leaves[i] for i in traced]
        closed = jax.make_jaxpr(flat_fn)(*arrays)
        out = _eval_fenced(closed.jaxpr, closed.consts, arrays)
        return jax.tree.unflatten(out_tree[0], out)

    return sequenced


def _token(values: list[Any]) -> jax.Array:
    """A float32 scalar that equals −0 and depends on one element of every value: what a fence adds.

    Each element is zeroed before the sum (a sum of large finite elements, e.g. two attention masks'
    float32 minimum, would overflow to ±inf, and inf·0 is NaN), and the result is −0, the one value whose
    addition leaves every float bitwise unchanged (x + (−0) = x, −0 and NaN included)."""
    token = jnp.zeros((), jnp.float32)
    for v in values:
        if jnp.size(v) == 0 or jax.dtypes.issubdtype(v.dtype, jax.dtypes.extended):
            continue
        first = jnp.ravel(v)[0].astype(jnp.float32)
        token = token + jnp.where(jnp.isfinite(first), first, 0.0) * 0.0  # ±0, not folded by XLA for floats
    return -jnp.abs(token)


def _tie(v: Any, token: jax.Array) -> Any:
    """``v`` unchanged, as a value computed from ``token`` (so after everything ``token`` reads)."""
    dtype = getattr(v, "dtype", None)
    if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return v
    if dtype == jnp.bool_:
        return v | (token != 0.0)
    if jnp.issubdtype(dtype, jnp.inexact):
        return v + token.astype(dtype)
    return v + token.astype(dtype)  # integers: −0.0 converts to 0


def _fenced_closed(closed: core.ClosedJaxpr) -> core.ClosedJaxpr:
    """A closed jaxpr whose loops are fenced, with the same input and output types."""
    avals = [v.aval for v in closed.jaxpr.invars]
    new = jax.make_jaxpr(lambda *a: _eval_fenced(closed.jaxpr, closed.consts, list(a)))(
        *[jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False)) for a in avals])
    return new


def _fenced_params(eqn: Any) -> dict[str, Any]:
    params = dict(eqn.params)
    name = eqn.primitive.name
    if name == "scan":
        params["jaxpr"] = _fenced_closed(params["jaxpr"])
    elif name == "while":
        params["body_jaxpr"] = _fenced_closed(params["body_jaxpr"])
    elif name == "cond":
        params["branches"] = tuple(_fenced_closed(b) for b in params["branches"])
    return params


def _holds_loop(eqn: Any) -> bool:
    """Whether an equation is a loop or calls a jaxpr holding one (a nested jit, a remat, a custom rule)."""
    return eqn.primitive.name in _LOOPS or any(
        _holds_loop(e) for sub in core.jaxprs_in_params(eqn.params) for e in sub.eqns)


def _eval_fenced(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` with each loop (or call holding one) fenced: its inputs tied to a token read
    from every value computed since the previous fence, and every value still needed after it tied to a
    token read from its output — so each loop runs after what precedes it and before what follows it."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    # The last equation that reads each variable (len(eqns) for the outputs): what is live at a fence.
    last_use: dict[Any, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, core.Literal):
                last_use[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, core.Literal):
            last_use[v] = len(jaxpr.eqns)
    fresh: list[Any] = []  # variables computed since the last fence

    for i, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        fenced = _holds_loop(eqn)
        if fenced:  # what was computed since the last fence, then the loop
            token = _token([env[v] for v in fresh if v in env])
            for v in eqn.invars:
                if not isinstance(v, core.Literal):
                    env[v] = _tie(env[v], token)
            fresh = []
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            if name in _INLINED and "jaxpr" in eqn.params:
                inner = eqn.params["jaxpr"]
                outs = _eval_fenced(inner.jaxpr, inner.consts, invals)
            else:
                params = _fenced_params(eqn) if name in _LOOPS else eqn.params
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
                outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, core.DropVar):
                env[v] = x
                fresh.append(v)
        for v in eqn.invars:  # free what is dead
            if not isinstance(v, core.Literal) and last_use.get(v) == i:
                env.pop(v, None)
        if fenced:  # the loop, then everything after it: one element of one output marks its end
            token = _token([x for x in outs if _readable(x)][:1] or list(outs))
            for v in list(env):
                if last_use.get(v, -1) > i:
                    env[v] = _tie(env[v], token)
            fresh = []
    return [read(v) for v in jaxpr.outvars]


def _readable(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.size(x) > 0 and not jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


# ---------------------------------------------------------------------------------------------------------
# The check on compiled HLO text.

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_CALLED = re.compile(
    r"(?:body|condition|to_apply|calls|branch_computations)=\{?%([\w.\-]+(?:, %[\w.\-]+)*)\}?")


class UnorderedPair(NamedTuple):
    """A loop (or conditional) holding collectives and another collective-bearing instruction of the same
    computation, with no data path between them."""

    computation: str
    loop: str
    other: str


def _parse_hlo(text: str) -> dict[str, list[tuple[str, str, list[str], list[str]]]]:
    computations: dict[str, list[tuple[str, str, list[str], list[str]]]] = {}
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            continue
        if line.startswith("}"):
            current = None
            continue
        inst = _INSTRUCTION.match(line) if current is not None else None
        if inst is None:
            continue
        name, rest = inst.groups()
        opcode = _OPCODE.search(rest)
        op = opcode.group(1) if opcode else ""
        called = [c.strip().lstrip("%") for group in _CALLED.findall(rest) for c in group.split(",")]
        operands = re.findall(r"%([\w.\-]+)", rest[opcode.end():].split("),")[0]) if opcode else []
        computations[current].append((name, op, operands, called))
    return computations


class _Ancestors:
    """``ancestors(name)``: the instructions ``name`` reads, directly or not (memoised)."""

    def __init__(self, deps: dict[str, list[str]]):
        self.deps, self.memo = deps, {}

    def __call__(self, name: str) -> set[str]:
        if name not in self.memo:
            seen: set[str] = set()
            stack = list(self.deps[name])
            while stack:
                x = stack.pop()
                if x not in seen:
                    seen.add(x)
                    stack.extend(self.deps[x])
            self.memo[name] = seen
        return self.memo[name]


def unordered_collectives(hlo_text: str) -> list[UnorderedPair]:
    """The hazards of one optimised HLO module (``compiled.as_text()``, or an ``--xla_dump_to`` file)."""
    computations = _parse_hlo(hlo_text)
    holds: dict[str, bool] = {}

    def holds_collectives(name: str) -> bool:
        if name not in holds:
            holds[name] = False  # cycles cannot happen in HLO; this only guards the recursion
            holds[name] = any(op.startswith(_COLLECTIVES) or any(holds_collectives(c) for c in called
                                                                  if c in computations)
                              for _, op, _, called in computations.get(name, []))
        return holds[name]

    found = []
    for comp, insts in computations.items():
        names = {n for n, *_ in insts}
        deps = {n: [o for o in operands if o in names] for n, _, operands, _ in insts}
        ancestors = _Ancestors(deps)
        bearing = [(n, op) for n, op, _, called in insts
                   if op.startswith(_COLLECTIVES)
                   or (op in ("while", "call", "conditional") and any(holds_collectives(c) for c in called
                                                                      if c in computations))]
        loops = [n for n, op in bearing if not op.startswith(_COLLECTIVES)]
        for loop in loops:
            for other, _ in bearing:
                if other != loop and loop not in ancestors(other) and other not in ancestors(loop):
                    if other in loops and other < loop:
                        continue  # each pair of loops once
                    found.append(UnorderedPair(comp, loop, other))
    return found

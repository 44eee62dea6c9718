"""Which large buffers a compiled loop writes every iteration: a check that decoding copies nothing it need
not copy (a stacked KV cache, a layer's weights) from the optimised HLO text.

    text = generate.lower(...).compile().as_text()
    large_loop_writes(text, "decode_loop", min_elements=cache_layer_elements)

A decode step must read the weights and the KV cache, but it only *writes* activations of a few rows and
one column of the cache per layer. Any instruction inside the loop (its body, condition and the loops and
conditionals nested in them) whose result has at least ``min_elements`` elements is therefore a copy,
except an in-place dynamic-update-slice (XLA writes into the operand's buffer), which is exempt.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"^[a-z]+[0-9]*\[([0-9,]*)\]")
_CONTROL = re.compile(r"\b(?:body|condition|true_computation|false_computation|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CALLS = re.compile(r"\bcalls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Results that never allocate: views, tuples, loop/branch results (aliased to their carried operands).
_NO_BUFFER = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "constant",
              "after-all", "call"}


class Instruction(NamedTuple):
    computation: str
    name: str
    opcode: str
    shape: str
    elements: int
    op_name: str


def parse_computations(text: str) -> dict[str, list[tuple[bool, str, str, str, str]]]:
    """Computations → their instructions ``(is_root, name, type, opcode, rest of line)``."""
    comps: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = comps.setdefault(header.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            current.append((bool(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)))
    return comps


def elements(shape: str) -> int:
    m = _ARRAY.match(shape)
    if m is None:  # a tuple or token
        return 0
    dims = [int(d) for d in m.group(1).split(",") if d]
    return math.prod(dims)


def _in_place_update(comps: dict, fused: str) -> bool:
    """Whether a fused computation's root is a dynamic-update-slice (possibly behind bitcasts)."""
    instrs = {name: (opcode, rest) for _, name, _, opcode, rest in comps.get(fused, [])}
    root = next((i for i in comps.get(fused, []) if i[0]), None)
    if root is None:
        return False
    opcode, rest = root[3], root[4]
    while opcode == "bitcast":
        operand = re.match(r"\s*%([\w.\-]+)", rest)
        if operand is None or operand.group(1) not in instrs:
            return False
        opcode, rest = instrs[operand.group(1)]
    return opcode == "dynamic-update-slice"


def loops(text: str, scope: str) -> list[str]:
    """Names of the body computations of the while loops whose op_name ends in ``scope/while``."""
    bodies = []
    for instrs in parse_computations(text).values():
        for _, _, _, opcode, rest in instrs:
            op_name = _OP_NAME.search(rest)
            if opcode == "while" and op_name and op_name.group(1).endswith(f"{scope}/while"):
                bodies.append(re.search(r"\bbody=%([\w.\-]+)", rest).group(1))
    return bodies


def large_loop_writes(text: str, scope: str, min_elements: int) -> list[Instruction]:
    """Instructions run every iteration of the while loop(s) traced under ``jax.named_scope(scope)`` that
    produce a buffer of ≥ ``min_elements`` elements, in-place dynamic-update-slices excepted."""
    comps = parse_computations(text)
    bodies = loops(text, scope)
    if not bodies:
        raise ValueError(f"no while loop under the named scope {scope!r} in the program")
    seen, stack, found = set(), list(bodies), []
    while stack:
        comp = stack.pop()
        if comp in seen or comp not in comps:
            continue
        seen.add(comp)
        for _, name, shape, opcode, rest in comps[comp]:
            stack.extend(_CONTROL.findall(rest))
            for branches in _BRANCHES.findall(rest):
                stack.extend(b.strip().lstrip("%") for b in branches.split(","))
            if opcode in _NO_BUFFER:
                continue
            n = elements(shape)
            if n < min_elements:
                continue
            if opcode == "dynamic-update-slice":
                continue
            if opcode == "fusion":
                called = _CALLS.search(rest)
                if called and _in_place_update(comps, called.group(1)):
                    continue
            op_name = _OP_NAME.search(rest)
            found.append(Instruction(comp, name, opcode, shape.split("{")[0], n,
                                     op_name.group(1) if op_name else ""))
    return found

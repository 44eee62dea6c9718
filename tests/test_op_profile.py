"""jaxrlhf.op_profile: ops classified from real compiled programs, the per-phase sums checked by hand, and the
profiled PPO iteration end to end (benchmarks/ppo_iteration.py --profile, in a subprocess: XLA's dump and
trace flags must be set before the backend starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxrlhf import op_profile
from jaxrlhf.op_profile import OpInfo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("op_name, region, pass_", [
    ("jit(f)/transpose(jvp(mlp))/mlp/dot_general", "mlp", "backward"),
    ("jit(f)/while/body/checkpoint/rematted_computation/attention/exp", "attention", "recompute"),
    ("jit(f)/jvp()/while/body/attn_proj/dot_general", "attn_proj", "forward"),
    ("jit(sample)/decode_loop/while/body/lm_head/x/sampling/reduce_max", "sampling", "forward"),  # innermost
    ("jit(f)/add", "other", "forward"),
    ("jit(f)/mlp_extra/add", "other", "forward"),  # a whole segment, not a prefix
    ("jit(step)/optimizer/mul", "optimizer", "optimizer"),  # the update is not the forward pass
])
def test_region_and_pass_come_from_the_name_stack(op_name, region, pass_):
    assert op_profile.region_of(op_name) == region
    assert op_profile.pass_of(op_name) == pass_


def _compiled_text() -> str:
    """A scanned two-layer MLP-with-softmax under the remat policy the model uses, differentiated."""

    def layer(x, w):
        with jax.named_scope("mlp"):
            h = jnp.tanh(x @ w)
        with jax.named_scope("attention"):
            return jax.nn.softmax(h, axis=-1) @ w.T, None

    def loss(ws, x):
        body = jax.checkpoint(layer, policy=jax.checkpoint_policies.checkpoint_dots, prevent_cse=False)
        return jnp.sum(jax.lax.scan(body, x, ws)[0] ** 2)

    ws, x = jnp.ones((2, 16, 16)), jnp.ones((8, 16))
    return jax.jit(jax.grad(loss)).lower(ws, x).compile().as_text()


def test_ops_of_a_compiled_program_get_kind_region_and_pass():
    ops = op_profile.program_ops(_compiled_text())
    found = {(o.kind, o.region, o.pass_) for o in ops.values()}
    assert ("matmul", "mlp", "forward") in found
    assert ("matmul", "mlp", "backward") in found
    assert ("matmul", "attention", "backward") in found
    assert any(o.region == "attention" and o.kind == "elementwise / reduce" for o in ops.values())
    assert any(o.pass_ == "recompute" for o in ops.values())  # the rematted softmax
    assert any(o.kind == "control flow" and o.shape.startswith("(") for o in ops.values())  # the scan's loop
    matmuls = [o for o in ops.values() if o.kind == "matmul"]
    assert matmuls and all(o.shape.startswith("f32[") for o in matmuls)


def test_a_fused_matmul_takes_its_dots_region_and_an_unnamed_op_its_users():
    text = """HloModule m

%fused (p0: f32[4,8], p1: f32[8,16]) -> f32[4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %dot.1 = f32[4,16]{1,0} dot(%p0, %p1), metadata={op_name="jit(g)/lm_head/dot_general"}
  %c = f32[] constant(0)
  ROOT %r = f32[4]{0} reduce(%dot.1, %c), to_apply=%add, metadata={op_name="jit(g)/sampling/max"}
}

ENTRY %main (a: f32[4,8], b: f32[8,16]) -> f32[4,16] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %fusion.1 = f32[4]{0} fusion(%a, %b), calls=%fused, metadata={op_name="jit(g)/sampling/max"}
  %dot.2 = f32[4,16]{1,0} dot(%a, %b)
  %t = f32[16,4]{1,0} transpose(%dot.2), dimensions={1,0}, metadata={op_name="jit(g)/attention/transpose"}
  ROOT %copy.3 = f32[4,16]{1,0} copy(%dot.2), metadata={op_name="jit(g)/kv_cache/copy"}
}
"""
    ops = op_profile.program_ops(text)
    assert ops["fusion.1"] == OpInfo("f32[4]", "matmul", "lm_head", "forward", "jit(g)/lm_head/dot_general")
    assert ops["dot.2"].region == "attention"  # no metadata of its own: its first user's
    assert ops["t"].kind == ops["copy.3"].kind == "data movement"


def test_phase_breakdown_sums_the_ops_inside_each_window_per_call():
    programs = {"jit_f": {"a": OpInfo("f32[8]", "matmul", "mlp", "forward", "jit(f)/mlp/dot"),
                          "b": OpInfo("f32[8]", "elementwise / reduce", "attention", "backward", "x")}}
    us = lambda ts, dur, op, module="jit_f": {"ph": "X", "ts": ts, "dur": dur, "name": op,
                                              "args": {"hlo_module": module, "hlo_op": op}}
    events = [
        # the exporter's form of a "phase:gen" annotation
        {"ph": "X", "ts": 0, "dur": 100, "name": "gen", "args": {"long_name": "phase:gen"}},
        {"ph": "X", "ts": 200, "dur": 100, "name": "gen", "args": {"long_name": "phase:gen"}},
        {"ph": "X", "ts": 400, "dur": 50, "name": "phase:upd"},
        us(10, 30, "a"), us(210, 50, "a"), us(50, 20, "b"),
        us(150, 999, "a"),  # between the windows: counted nowhere
        us(260, 10, "c", "jit_other"),  # a program not in the dump
        us(410, 40, "b"),
    ]
    got = op_profile.phase_breakdown(events, programs, top=2)
    gen = got["gen"]
    assert gen["calls"] == 2 and gen["wall_ms"] == 0.1  # (100 + 100) µs over 2 calls
    assert gen["op_ms"] == 0.055  # (30 + 50 + 20 + 10) / 2 µs
    assert gen["by_kind"] == {"matmul": 0.04, "elementwise / reduce": 0.01, "unknown": 0.005}
    assert gen["by_region"] == {"mlp": 0.04, "attention": 0.01, "other": 0.005}
    assert gen["by_pass"] == {"forward": 0.045, "backward": 0.01}
    assert gen["by_region_kind"]["mlp | matmul"] == 0.04
    assert [(o["op"], o["ms"], o["events_per_call"]) for o in gen["top_ops"]] == [("a", 0.04, 1.0),
                                                                                 ("b", 0.01, 0.5)]
    assert got["upd"]["op_ms"] == 0.04 and got["upd"]["by_pass"] == {"backward": 0.04}


def test_a_loop_event_counts_only_its_own_time_not_its_bodys():
    """The CPU runtime's event for a while loop spans its body's op events (on any thread)."""
    kinds = {"w": "control flow", "v": "control flow", "a": "matmul", "b": "matmul", "c": "matmul"}
    programs = {"jit_f": {op: OpInfo("", k, "other", "forward", "") for op, k in kinds.items()}}
    ev = lambda ts, dur, op, tid=1: {"ph": "X", "ts": ts, "dur": dur, "name": op, "tid": tid,
                                     "args": {"hlo_module": "jit_f", "hlo_op": op}}
    events = [{"ph": "X", "ts": 0, "dur": 200, "name": "p", "args": {"long_name": "phase:p"}},
              ev(0, 100, "w"), ev(10, 30, "a"), ev(30, 30, "b", tid=2),  # body ops overlap: union 50
              ev(70, 20, "v"), ev(75, 10, "c")]  # a nested loop and its body
    got = op_profile.phase_breakdown(events, programs)["p"]
    ms = {o["op"]: o["ms"] for o in got["top_ops"]}
    assert ms == {"w": 0.03, "v": 0.01, "a": 0.03, "b": 0.03, "c": 0.01}  # w: 100 − (50 + 20) µs
    assert got["by_kind"] == {"matmul": 0.07, "control flow": 0.04}


def test_load_trace_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="perfetto_trace"):
        op_profile.load_trace(str(tmp_path))


def test_a_profiled_ppo_iteration_reports_where_each_phase_spends_its_time(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ppo_iteration.py"), "--batch", "4", "--prompt", "8",
           "--response", "8", "--vocab", "256", "--epochs", "1", "--iterations", "1", "--logprobs-from",
           "rollout", "--profile", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    phases = json.loads(done.stdout)["op_profile"]["phases"]
    assert set(phases) == {"generation", "score", "update"}
    for name, p in phases.items():
        assert p["calls"] == 1 and p["op_ms"] > 0 and p["wall_ms"] > 0, name
        assert sum(p["by_kind"].values()) == pytest.approx(p["op_ms"], abs=0.01 * len(p["by_kind"]))
        assert "unknown" not in p["by_kind"], name  # every op found in the dumped programs
        assert {"mlp", "attention", "attn_proj"} <= set(p["by_region"]), name
        assert p["top_ops"][0]["ms"] >= p["top_ops"][-1]["ms"]
    assert {"sampling", "lm_head", "kv_cache"} <= set(phases["generation"]["by_region"])
    assert {"lm_head", "optimizer", "logprobs"} <= set(phases["update"]["by_region"])
    assert phases["update"]["by_pass"]["backward"] > 0 and phases["update"]["by_pass"]["recompute"] > 0
    assert phases["update"]["by_pass"]["optimizer"] > 0
    assert set(phases["generation"]["by_pass"]) == {"forward"}

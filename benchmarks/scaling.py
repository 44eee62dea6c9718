"""PPO-iteration throughput across layouts of processes × devices (data parallel), one launch per layout.

A layout ``PxD`` is P processes with D devices each: ``1x8`` is one process with 8 devices, ``2x4`` two
processes ("hosts", started by :mod:`jaxrlhf.launch` with a coordinator on 127.0.0.1 and gloo collectives)
with 4 devices each, the same 8-device mesh crossing a process boundary.

On a CPU the devices are simulated (``--xla_force_host_platform_device_count``): they all share the same
cores, so total throughput cannot grow with the device count. What this measures honestly is the cost of
partitioning: the collectives, the per-device bookkeeping and the smaller per-device matmuls; ``2x4`` next to
``1x8`` is the cost of crossing processes (gloo over loopback TCP instead of in-process copies). A flat
``iteration_tokens_per_s`` means the sharded step adds little overhead; per-device numbers fall as 1/N by
construction. On a real multi-accelerator host, pass ``--real`` to use the actual devices (single-process
layouts only) instead, where ``tokens_per_s_per_device`` and MFU are the numbers to read.

``--repeats R`` runs the layouts R times in turn (alternating, so that load from other work on the machine
falls on every layout alike) and reports each layout's median with its min and max.

    python benchmarks/scaling.py [--layouts 1x1 1x2 1x4 1x8 2x4] [--repeats 3] [-- <ppo_iteration.py flags>]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from jaxrlhf.launch import LaunchError, launch, process_env

HERE = Path(__file__).parent
NOTE = (
    "simulated CPU devices share the same cores: total throughput cannot scale; the ratio to the first "
    "layout measures the overhead of running the same step sharded, and 2x4 vs 1x8 that of crossing processes"
)


def parse_layout(text: str) -> tuple[int, int]:
    try:
        processes, devices = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected PROCESSESxDEVICES, e.g. 2x4") from None
    if processes < 1 or devices < 1:
        raise argparse.ArgumentTypeError(f"layout {text!r}: both numbers must be >= 1")
    return processes, devices


def run(processes: int, devices: int, real: bool, extra: list[str]) -> dict:
    """One ppo_iteration.py launch over ``processes`` × ``devices``; its JSON (process 0's)."""
    total = processes * devices
    cmd = [sys.executable, str(HERE / "ppo_iteration.py"), "--data", str(total), *extra]
    if processes > 1:
        try:
            results = launch(cmd, processes, local_devices=devices, timeout=3600)
        except LaunchError as e:
            raise RuntimeError(str(e)) from None
        out = results[0].output
    else:
        # With real devices the mesh takes the first `devices` of them (ppo_iteration --data).
        env = dict(os.environ) if real else process_env(0, 1, "", local_devices=devices)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
    start = out.index('{\n  "benchmark"')
    return json.loads(out[start : out.index("\n}", start) + 2])


def summarize(processes: int, devices: int, runs: list[dict]) -> dict:
    """The layout's row: medians over the repeats (and the spread of the headline number)."""
    tps = [r["tokens_per_s"]["iteration"] for r in runs]
    med = statistics.median

    def median_dict(key: str) -> dict:
        return {k: med(r[key][k] for r in runs) for k in runs[0][key]}

    total = processes * devices
    return {
        "layout": f"{processes}x{devices}",
        "processes": processes,
        "devices": total,
        "iteration_tokens_per_s": med(tps),
        "iteration_tokens_per_s_runs": tps,
        "iteration_tokens_per_s_min_max": [min(tps), max(tps)],
        "tokens_per_s_per_device": med(tps) / total,
        "phase_tokens_per_s": median_dict("tokens_per_s"),
        "wall_s": median_dict("wall_s"),
        "compile_s": med(r["compile_s"]["total"] for r in runs),
        "update_mfu": med(r["update_mfu"] for r in runs),
        "state_bytes_per_device": runs[0]["state_bytes_per_device"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", type=parse_layout, nargs="+", default=None, help="PxD, e.g. 1x8 2x4")
    p.add_argument("--devices", type=int, nargs="+", default=None, help="single-process layouts 1xN")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the layouts (medians reported)")
    p.add_argument("--real", action="store_true", help="use real accelerators instead of simulated CPUs")
    p.add_argument("--conditions", default="", help="how the machine was (recorded in the JSON)")
    p.add_argument("extra", nargs="*", help="flags passed to ppo_iteration.py (after --)")
    args = p.parse_args()
    layouts = args.layouts or [(1, n) for n in args.devices or []] or [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4)]
    if args.real and any(procs > 1 for procs, _ in layouts):
        p.error("--real runs single-process layouts only (several hosts: start ppo_iteration.py on each)")
    extra = args.extra or ["--iterations", "2"]
    runs: dict[tuple[int, int], list[dict]] = {layout: [] for layout in layouts}
    for round_ in range(args.repeats):
        for procs, devs in layouts:
            r = run(procs, devs, args.real, extra)
            runs[(procs, devs)].append(r)
            print(
                f"round {round_ + 1}/{args.repeats} {procs}x{devs}: "
                f"{r['tokens_per_s']['iteration']:.1f} tokens/s",
                file=sys.stderr,
                flush=True,
            )
    rows = [summarize(procs, devs, runs[(procs, devs)]) for procs, devs in layouts]
    base = rows[0]["iteration_tokens_per_s"]
    for row in rows:
        row["throughput_vs_first"] = row["iteration_tokens_per_s"] / base
    by_layout = {row["layout"]: row for row in rows}
    result = {
        "benchmark": "scaling",
        "simulated": not args.real,
        "note": NOTE if not args.real else "",
        "shape_flags": extra,
        "repeats": args.repeats,
        "conditions": args.conditions,
        "rows": rows,
    }
    if "1x8" in by_layout and "2x4" in by_layout:
        result["two_processes_vs_one"] = (
            by_layout["2x4"]["iteration_tokens_per_s"] / by_layout["1x8"]["iteration_tokens_per_s"]
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""PPO-iteration throughput on 1, 2, 4 and 8 devices (data parallel), one subprocess per device count.

On a CPU the devices are simulated (``--xla_force_host_platform_device_count``): they all share the same
cores, so total throughput cannot grow with the device count. What this measures honestly is the cost of
partitioning: the collectives, the per-device bookkeeping and the smaller per-device matmuls. A flat
``iteration_tokens_per_s`` means the sharded step adds little overhead; per-device numbers fall as 1/N by
construction. On a real multi-accelerator host, pass ``--real`` to use the actual devices (subsets of them)
instead, where ``tokens_per_s_per_device`` and MFU are the numbers to read.

    python benchmarks/scaling.py [--devices 1 2 4 8] [-- <extra ppo_iteration.py flags>]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
NOTE = (
    "simulated CPU devices share the same cores: total throughput cannot scale; the ratio to one device "
    "measures the overhead of running the same step sharded"
)


def run(devices: int, real: bool, extra: list[str]) -> dict:
    env = dict(os.environ)
    if not real:
        env["XLA_FLAGS"] = (
            f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        )
        env["JAX_PLATFORMS"] = "cpu"
    # With real devices the mesh takes the first `devices` of them (ppo_iteration --data).
    cmd = [sys.executable, str(HERE / "ppo_iteration.py"), "--data", str(devices), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--real", action="store_true", help="use real accelerators instead of simulated CPUs")
    p.add_argument("extra", nargs="*", help="flags passed to ppo_iteration.py (after --)")
    args = p.parse_args()
    extra = args.extra or ["--iterations", "2"]
    rows = []
    for n in args.devices:
        r = run(n, args.real, extra)
        rows.append(
            {
                "devices": n,
                "iteration_tokens_per_s": r["tokens_per_s"]["iteration"],
                "tokens_per_s_per_device": r["iteration_tokens_per_s_per_device"],
                "phase_tokens_per_s": r["tokens_per_s"],
                "wall_s": r["wall_s"],
                "compile_s": r["compile_s"]["total"],
                "update_mfu": r["update_mfu"],
                "state_bytes_per_device": r["state_bytes_per_device"],
            }
        )
        print(f"{n} device(s): {rows[-1]['iteration_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    base = rows[0]["iteration_tokens_per_s"]
    for row in rows:
        row["throughput_vs_first"] = row["iteration_tokens_per_s"] / base
    result = {
        "benchmark": "scaling",
        "simulated": not args.real,
        "note": NOTE if not args.real else "",
        "shape_flags": extra,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

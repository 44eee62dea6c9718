"""One PPO iteration (``benchmarks/ppo_iteration.py``) under different XLA CPU settings, each run in its own
process, the variants alternated round by round so that the machine's drift falls on all of them alike.

XLA's CPU backend hands dots (and, when asked, elementwise ops and reductions) to a kernel library —
YNNPACK by default in this jaxlib — or emits them itself and calls Eigen for the dots
(``--xla_cpu_use_xnnpack=false``). Which is faster depends on the shapes and the machine, so this measures
it on the benchmark's iteration: the same ``ppo_iteration.py`` command with ``XLA_FLAGS`` set per variant
(the flags are named in the JSON). Each variant's median over rounds is reported with its min and max for
the iteration time, each phase's time, ``iteration_mfu`` (against that process's own matmul probe, which
runs under the same flags) and the probe itself.

    python benchmarks/xla_cpu_flags.py [--rounds 3] [--variant NAME=FLAGS ...] [-- <ppo_iteration.py flags>]

Default variants: ``default`` (no flag), ``eigen_dots`` (``--xla_cpu_use_xnnpack=false``) and
``ynn_eltwise`` (``--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce``); default iteration flags:
``--epochs 1 --logprobs-from rollout --iterations 5``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_VARIANTS = {
    "default": "",
    "eigen_dots": "--xla_cpu_use_xnnpack=false",
    "ynn_eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
}
DEFAULT_ITERATION = ["--epochs", "1", "--logprobs-from", "rollout", "--iterations", "5"]


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name or name.startswith("-"):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=FLAGS (FLAGS may be empty)")
    return name, flags


def run_once(flags: str, iteration_args: list[str]) -> dict:
    """``ppo_iteration.py`` in a fresh process with ``XLA_FLAGS`` = the inherited flags + ``flags``."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f)
    out = subprocess.run([sys.executable, str(HERE / "ppo_iteration.py"), *iteration_args], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"ppo_iteration.py with XLA_FLAGS={env['XLA_FLAGS']!r} failed "
                         f"(exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict]) -> dict:
    phases = runs[0]["wall_s"].keys()
    return {
        "iteration_mfu": spread([r["iteration_mfu"] for r in runs]),
        "wall_s": {p: spread([r["wall_s"][p] for r in runs]) for p in phases},
        "compile_s_total": spread([r["compile_s"]["total"] for r in runs]),
        "matmul_peak_tflops": spread([r["matmul_peak_tflops_per_device"] for r in runs]),
    }


def main() -> None:
    argv = sys.argv[1:]
    iteration_args = DEFAULT_ITERATION
    if "--" in argv:
        i = argv.index("--")
        argv, iteration_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="runs of every variant, alternated")
    p.add_argument("--variant", type=parse_variant, action="append", default=None,
                   help="NAME=FLAGS (repeatable; replaces the default variants)")
    args = p.parse_args(argv)
    variants = dict(args.variant) if args.variant else DEFAULT_VARIANTS
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, flags in variants.items():
            runs[name].append(run_once(flags, iteration_args))
    baseline = next(iter(variants))
    summary = {name: {"xla_flags": flags, **summarise(runs[name])} for name, flags in variants.items()}
    for name in variants:
        summary[name]["iteration_time_vs_" + baseline] = (
            summary[name]["wall_s"]["total"]["median"] / summary[baseline]["wall_s"]["total"]["median"])
    result = {
        "benchmark": "xla_cpu_flags",
        "iteration_command": ["benchmarks/ppo_iteration.py", *iteration_args],
        "rounds": args.rounds,
        "order": "variants alternated within each round, each run in its own process",
        "mfu_denominator": runs[baseline][0]["matmul_probe"]["what"] + " (under each variant's own flags)",
        "variants": summary,
        "per_run": {name: [{"iteration_mfu": r["iteration_mfu"], "wall_s": r["wall_s"],
                            "matmul_peak_tflops": r["matmul_peak_tflops_per_device"]} for r in runs[name]]
                    for name in variants},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

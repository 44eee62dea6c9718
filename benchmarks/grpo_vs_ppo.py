"""A GRPO iteration against a PPO iteration on the same tokens: time per phase and state bytes per device.

Runs ``benchmarks/ppo_iteration.py`` (the trainers' phases, from ``build_rl_phases``) in fresh processes, in
alternation, ``--repeats`` times each: PPO with a value head on the policy (the default critic), GRPO with
``--group-size`` samples per prompt (``--batch`` / G prompts: the same B sequences of P + N tokens, the same
epochs × minibatches; no critic, no value head) and PPO with a separate critic of the policy's shape.
Alternating spreads a shared machine's load over all variants; the JSON gives the median and the range of each
number, and the ratios of the medians against PPO.

    python benchmarks/grpo_vs_ppo.py [--repeats 3] [--out benchmarks/results/grpo_vs_ppo_cpu2.json]
        [-- extra ppo_iteration.py arguments, e.g. --preset tiny --iterations 2]

Prints one JSON object (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ppo_iteration.py")
VARIANTS = {
    "ppo": ["--algorithm", "ppo", "--critic", "shared"],
    "grpo": ["--algorithm", "grpo"],
    "ppo_separate_critic": ["--algorithm", "ppo", "--critic", "separate"],
}
PHASES = ("generation", "score", "update", "total")


def run_once(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    if out.returncode != 0:  # the child's own message, not a CalledProcessError traceback
        raise SystemExit(f"ppo_iteration.py {' '.join(args)} failed (exit {out.returncode}):\n"
                         f"{out.stderr[-2000:]}")
    return json.loads(out.stdout[out.stdout.index("{"):])


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def update_mfu(run: dict, peak_tflops: float) -> float:
    """The run's necessary update FLOPs ÷ (its median update time × ``peak_tflops`` × devices; simulated CPU
    devices share the one processor the probe measured)."""
    devices = 1 if run["backend"] == "cpu" else run["devices"]
    return run["necessary_tflops"]["update"] / run["wall_s"]["update"] / (peak_tflops * devices)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS), help="a subset, comma-separated")
    p.add_argument("--out", default=None)
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            group = ["--group-size", str(args.group_size)] if name == "grpo" else []
            runs[name].append(run_once([*VARIANTS[name], *group, *extra]))
            print(f"{name}: total {runs[name][-1]['wall_s']['total']:.2f} s", file=sys.stderr, flush=True)

    result: dict = {"benchmark": "grpo_vs_ppo", "repeats": args.repeats, "extra_args": extra, "variants": {}}
    first = runs[names[0]][0]
    for key in ("backend", "device_kind", "devices", "preset", "params", "dtype"):
        result[key] = first[key]
    result["shape"] = {k: v for k, v in first["shape"].items() if k not in ("prompts", "group_size")}
    # One denominator for every variant: each process probes its own matmul peak, and the machine's speed
    # drifts between processes, so per-process MFUs would compare probes, not updates.
    peak = max(r["matmul_peak_tflops_per_device"] for rs in runs.values() for r in rs)
    result["update_mfu_denominator"] = {
        "tflops": peak, "what": "the best matmul probe over every run of every variant (per device)"}
    for name, rs in runs.items():
        result["variants"][name] = {
            "critic": rs[0]["critic"],
            "shape": rs[0]["shape"],
            **({"group_prefill": rs[0]["group_prefill"]} if "group_prefill" in rs[0] else {}),
            "state_bytes_per_device": rs[0]["state_bytes_per_device"],
            "wall_s": {k: summary([r["wall_s"][k] for r in rs]) for k in PHASES},
            "compile_s": {k: summary([r["compile_s"][k] for r in rs]) for k in PHASES},
            "tokens_per_s": {k: summary([r["tokens_per_s"][k] for r in rs]) for k in rs[0]["tokens_per_s"]},
            "matmul_probe_tflops": summary([r["matmul_peak_tflops_per_device"] for r in rs]),
            "update_mfu": summary([update_mfu(r, peak) for r in rs]),
            "first_minibatch_ratio_error": max(r["first_minibatch_ratio_error"] for r in rs),
        }
    if "ppo" in runs:
        base = result["variants"]["ppo"]
        result["relative_to_ppo"] = {
            name: {
                "state_bytes": v["state_bytes_per_device"] / base["state_bytes_per_device"],
                **{f"wall_{k}": v["wall_s"][k]["median"] / base["wall_s"][k]["median"] for k in PHASES},
            }
            for name, v in result["variants"].items() if name != "ppo"
        }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""N seeds of the whole RLHF pipeline in one vmapped program vs N sequential runs of the same jitted
``train``.

``make_train(config)`` (``jaxrlhf.experiments.pipeline``) is SFT → simulated feedback → reward model → PPO →
evaluation as one pure function of a key. Each measurement runs in its own process (a fresh JAX runtime):

- sequential: compile ``jax.jit(train)`` once, then run it for seed 1, 2, …, N one after the other;
- vmapped: compile ``jax.jit(jax.vmap(train))`` once, then run all N seeds in one call.

The two kinds alternate (``--repeats`` pairs, the order flipped every pair) and the JSON reports the median
wall times with their spread (min, max, all), the speed-up without compile time (run only) and with it
(compile + run of a cold process), the machine's load average before and after each measurement (the machine
may be shared), and per-seed results (final gold, KL, proxy, the SFT policy's gold, the reward model's
agreement with the oracle) of both, with the largest difference between a vmapped member and its sequential
run over every output leaf. The workers share a persistent compilation cache, so only the first pair's
compile times are cold; those are the ones reported.

Default shape: the demo's model (GPT-2, d 64, 2 layers, 4 heads) and batch sizes (64) on ``digit_sort`` with
3–4 digits, with fewer steps than the pipeline's defaults (:data:`BENCHMARK_OVERRIDES`) so that the
measurement takes minutes on 2 CPU cores; ``--set key=value`` changes any pipeline key.

    python benchmarks/vmap_seeds.py [--seeds 16] [--repeats 2] [--set key=value ...] [--out FILE]

Prints one JSON object; with ``--out`` it is also written after every measurement (a cut-off run leaves a
record). The run time is reported as wall time and as the process's CPU time (robust to a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARK_OVERRIDES = ("sft.steps=60", "reward.steps=60", "rl.iterations=20", "evaluation.points=2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="alternating (sequential, vmapped) pairs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--worker", choices=("sequential", "vmapped"), help=argparse.SUPPRESS)
    p.add_argument("--npz", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process: compile, run, save every output leaf, print the times as JSON."""
    import jax
    import numpy as np

    from jaxrlhf.experiments.pipeline import make_train
    from jaxrlhf.experiments.pipeline_config import load_pipeline_config

    cfg = load_pipeline_config(None, [*BENCHMARK_OVERRIDES, *args.overrides])
    train = make_train(cfg)
    keys = jax.random.split(jax.random.key(0), args.seeds)
    t0 = time.perf_counter()
    if args.worker == "sequential":
        program = jax.jit(train).lower(keys[0]).compile()
    else:
        program = jax.jit(jax.vmap(train)).lower(keys).compile()
    compile_s = time.perf_counter() - t0
    per_seed = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    if args.worker == "sequential":
        outs = []
        for i in range(args.seeds):
            t1 = time.perf_counter()
            outs.append(jax.device_get(jax.block_until_ready(program(keys[i]))))
            per_seed.append(time.perf_counter() - t1)
        out = jax.tree.map(lambda *xs: np.stack(xs), *outs)
    else:
        out = jax.device_get(jax.block_until_ready(program(keys)))
    run_s = time.perf_counter() - t0
    run_cpu_s = time.process_time() - c0
    leaves = jax.tree_util.tree_leaves_with_path(out)
    np.savez(args.npz, **{jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves})
    hidden = train.pipeline.model.config.hidden_size
    probe = matmul_probe(hidden, args.seeds) if args.worker == "vmapped" else None
    print(json.dumps({"compile_s": compile_s, "run_s": run_s, "run_cpu_s": run_cpu_s, "per_seed_s": per_seed,
                      "params": train.pipeline.model.config.num_params(), "matmul_probe": probe}))


def matmul_probe(hidden: int, seeds: int, rows: int = 704, repeats: int = 30) -> dict:
    """GFLOP/s of the model's MLP matmul ([rows, d] @ [d, 4d], rows = 64 sequences x 11 tokens) for one
    member, the same for ``seeds`` members with their own weights in one batched dot (what vmap makes of
    it), and the trainers' MFU probe (``matmul_peak_flops``: 2048³, best of 5). Says whether batching members
    can pay."""
    import jax
    import jax.numpy as jnp

    from jaxrlhf.train.timing import matmul_peak_flops

    def rate(fn, *args, flops):
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(fn(*args))
        return flops / ((time.perf_counter() - t0) / repeats) / 1e9

    d, out = {}, 4 * hidden
    x, w = jnp.ones((seeds, rows, hidden)), jnp.ones((seeds, hidden, out))
    d["one_member_gflops"] = rate(jax.jit(jnp.matmul), x[0], w[0], flops=2 * rows * hidden * out)
    d["batched_members_gflops"] = rate(jax.jit(lambda a, b: jnp.einsum("sbk,skn->sbn", a, b)), x, w,
                                       flops=2 * seeds * rows * hidden * out)
    d["matmul_2048_gflops"] = matmul_peak_flops(2048) / 1e9
    d["shape"] = f"[{rows}, {hidden}] @ [{hidden}, {out}], batched over {seeds}"
    return d


def measure(kind: str, args: argparse.Namespace, npz: Path, cache: str) -> dict:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    command = [sys.executable, __file__, "--worker", kind, "--npz", str(npz), "--seeds", str(args.seeds),
               *[f"--set={o}" for o in args.overrides]]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"vmap_seeds: the {kind} worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_s": wall, "load_before": load_before, "load_after": os.getloadavg()}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def per_seed_results(arrays) -> dict[str, list[float]]:
    gold, kl, proxy = arrays[".curve.gold"], arrays[".curve.kl"], arrays[".curve.proxy"]
    return {"final_gold": gold[:, -1].mean(-1).tolist(), "final_kl": kl[:, -1].mean(-1).tolist(),
            "final_proxy": proxy[:, -1].mean(-1).tolist(), "sft_gold": gold[:, 0].mean(-1).tolist(),
            "reward_model_agreement": arrays[".reward['reward/oracle_agreement']"].ravel().tolist()}


def report(args: argparse.Namespace, runs: dict[str, list[dict]], tmp: Path) -> dict:
    """The JSON of the measurements so far (written after each one, so that a cut-off run leaves a record)."""
    import numpy as np

    from jaxrlhf.config import to_dict
    from jaxrlhf.experiments.pipeline_config import load_pipeline_config

    overrides = [*BENCHMARK_OVERRIDES, *args.overrides]
    result = {
        "benchmark": "vmap_seeds",
        "what": f"{args.seeds} seeds of make_train(config): one jit(vmap(train)) call vs {args.seeds} "
                "sequential jit(train) calls, each kind in its own process, alternating",
        "machine": {"platform": platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_averages": "load_before / load_after of every measurement (1, 5, 15 min)"},
        "seeds": args.seeds, "repeats_asked": args.repeats,
        "pairs_done": min(len(runs["sequential"]), len(runs["vmapped"])),
        "overrides": overrides, "config": to_dict(load_pipeline_config(None, overrides)),
        "measurements": runs,
    }
    s_run, v_run = [m["run_s"] for m in runs["sequential"]], [m["run_s"] for m in runs["vmapped"]]
    if not (s_run and v_run):
        return result
    cold = {k: runs[k][0]["compile_s"] for k in runs}
    result.update({
        "params": runs["sequential"][0]["params"],
        "compile_s_cold": cold,
        "sequential_run_s": spread(s_run),
        "vmapped_run_s": spread(v_run),
        "per_seed_sequential_s": spread([statistics.median(ts) for ts in
                                         zip(*[m["per_seed_s"] for m in runs["sequential"]])]),
        "speedup_run_only": spread([s / v for s, v in zip(s_run, v_run)]),
        "speedup_run_only_cpu_time": spread([s["run_cpu_s"] / v["run_cpu_s"]
                                             for s, v in zip(runs["sequential"], runs["vmapped"])]),
        "matmul_probe": runs["vmapped"][0].get("matmul_probe"),
        "max_load_1min": max(max(m["load_before"][0], m["load_after"][0]) for k in runs for m in runs[k]),
        "speedup_with_cold_compile": (cold["sequential"] + statistics.median(s_run))
        / (cold["vmapped"] + statistics.median(v_run)),
    })
    seq, vm = np.load(tmp / "sequential0.npz"), np.load(tmp / "vmapped0.npz")
    diffs = {k: float(np.max(np.abs(seq[k] - vm[k]), initial=0.0)) for k in seq.files}
    relative = {k: float(np.max(np.abs(seq[k] - vm[k]) / np.maximum(np.abs(seq[k]), 1.0), initial=0.0))
                for k in seq.files}
    worst = max(diffs, key=diffs.get)
    result.update({
        "max_abs_diff_vmapped_vs_sequential": diffs[worst], "max_abs_diff_leaf": worst,
        "max_diff_relative_to_max_1_abs": max(relative.values()),
        "per_seed": {"sequential": per_seed_results(seq), "vmapped": per_seed_results(vm)},
    })
    return result


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[str, list[dict]] = {"sequential": [], "vmapped": []}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for r in range(args.repeats):
            for kind in (("sequential", "vmapped") if r % 2 == 0 else ("vmapped", "sequential")):
                runs[kind].append(measure(kind, args, tmp / f"{kind}{r}.npz", str(tmp / "cache")))
                print(f"vmap_seeds: {kind} #{r}: run {runs[kind][-1]['run_s']:.1f} s", file=sys.stderr)
                text = json.dumps(report(args, runs, tmp), indent=2)
                if args.out:
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

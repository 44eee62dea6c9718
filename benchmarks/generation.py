"""Generation throughput: jaxrlhf's jitted KV-cache sampler vs Hugging Face ``generate`` (PyTorch); the
decode step against the memory-bandwidth bound; group sampling's shared prefill.

Both implementations run the same random weights (a GPT-2 shape by default: 6 layers, d_model 384, 6 heads,
vocab 8192), batch 32, prompt 64, 64 new tokens, multinomial sampling at temperature 1 with no top-k/top-p,
every row forced to the full length. PyTorch runs in its own process (two thread pools in one process slow
each other down), driven call by call from this one so that the two implementations alternate; each side
waits idle while the other runs. Reported: medians and ranges of each and of the per-pair speed-up.

Decode vs the bandwidth bound: a decode step must read every matmul weight (compute dtype) and the KV cache
of the tokens so far. ``decode.bound_s_per_step`` is those bytes (cache at the mean context of the decode
steps) ÷ the copy bandwidth measured in this run (the probe named in ``copy_bandwidth``);
``decode.fraction_of_bound`` is that bound ÷ the measured time per decode step, where the decode time is
(generate − prefill) ÷ (new tokens − 1). ``decode.fraction_of_read_bound`` is the same against the read-only
bandwidth (``read_bandwidth``: a jitted sum), the ceiling of a step that reads and hardly writes; on the
2-core CPU the read rate is ~0.6 of the copy probe's (read + write) rate. ``decode.loop_copies`` lists any
buffer of at least one layer's cache that the compiled decode loop writes per step (dynamic-update-slices in
place excepted): [] means no step copies a cache, a stacked weight or a layer's slice.

Group sampling (``--group-prefill``): the prefill of ``--group-prompts`` prompts of ``--group-prompt-len``
tokens shared by groups of ``--group-size`` rows, against prefilling the repeated prompts, time and FLOPs.

    python benchmarks/generation.py [--batch 32 --prompt 64 --new 64 --repeats 5 --no-torch]
    python benchmarks/generation.py --preset llama-1b --dtype bfloat16 --batch 64 --prompt 128 --new 128

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.host_memory import retain_freed_memory
from jaxrlhf.models import hf_io
from jaxrlhf.models.config import ModelConfig, gpt2_config, llama_config
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.generate import GenerationConfig, generate, prefill
from jaxrlhf.rollout.loop_copies import large_loop_writes
from jaxrlhf.train.timing import causal_attention_flops, default_probe_chain, matmul_peak_flops

PRESETS = {
    "tiny": lambda a: gpt2_config(vocab_size=a.vocab or 8192, hidden_size=384, num_layers=a.layers or 6,
                                  num_heads=6, max_position_embeddings=1024),
    # Llama 3.2 1B's shape (GQA 32/8, SwiGLU 8192, tied embeddings), as in ppo_iteration.py.
    "llama-1b": lambda a: llama_config(vocab_size=a.vocab or 128256, hidden_size=2048,
                                       num_layers=a.layers or 16, num_heads=32, num_kv_heads=8,
                                       intermediate_size=8192, tie_word_embeddings=True,
                                       max_position_embeddings=4096, rope_theta=500000.0),
}


# ------------------------------------------------------------------------------------------------ counts


def prefill_flops(cfg: ModelConfig, rows: int, prompt: int) -> float:
    """Model FLOPs of a prefill: 2·(non-embedding params) per token, attention 4·L·d·context per token,
    and the LM head (2·d·V) for each row's last prompt token."""
    per_token = 2 * cfg.num_params(include_embeddings=False)
    attention = causal_attention_flops(cfg.num_layers, cfg.num_heads * cfg.head_dim, 0, prompt)
    return float(rows * (prompt * per_token + attention + 2 * cfg.hidden_size * cfg.vocab_size))


def generation_flops(cfg: ModelConfig, batch: int, prompt: int, new: int) -> float:
    """Prefill plus N − 1 decode steps (one token per row each, attending to the context so far)."""
    per_token = 2 * cfg.num_params(include_embeddings=False) + 2 * cfg.hidden_size * cfg.vocab_size
    # decode step j (0 … N − 2) feeds the token at position prompt + j + 1
    attention = causal_attention_flops(cfg.num_layers, cfg.num_heads * cfg.head_dim, prompt, prompt + new - 1)
    return prefill_flops(cfg, batch, prompt) + float(batch * ((new - 1) * per_token + attention))


def decode_bytes_per_step(cfg: ModelConfig, batch: int, prompt: int, new: int) -> dict:
    """Bytes a decode step must read: every matmul weight once (the LM head included, the embedding rows
    of B tokens neglected) and the keys and values of the context, in the compute dtype."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    weights = (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size) * itemsize
    per_column = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * itemsize
    mean_context = prompt + new / 2  # decode steps see prompt + 1 … prompt + new − 1 columns
    return {
        "weights": weights,
        "kv_cache_mean_context": per_column * mean_context,
        # This implementation's attention reads every column of its fixed-size cache (masked).
        "kv_cache_full_length": per_column * (prompt + new),
        "total": weights + per_column * mean_context,
    }


def copy_bandwidth(nbytes: int, repeats: int = 7) -> dict:
    """Device memory bandwidth from a jitted ``x · c`` over a float32 array of ``nbytes`` (donated, so the
    same two buffers are reused): bytes read + bytes written per call ÷ the median call time."""
    n = nbytes // 4
    scale = jax.jit(lambda x: x * jnp.float32(1.0000001), donate_argnums=0)
    x = jax.block_until_ready(scale(jnp.ones((n,), jnp.float32)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = jax.block_until_ready(scale(x))
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {
        "probe": f"jit(x * c) over a {nbytes / 2**20:.0f} MiB float32 array, donated; (read + write) / time",
        "bytes_per_s": 2 * n * 4 / med,
        "best_bytes_per_s": 2 * n * 4 / min(times),
    }


def read_bandwidth(nbytes: int, repeats: int = 7) -> dict:
    """Device read bandwidth from a jitted ``sum(x)`` over a float32 array of ``nbytes``: bytes read per call
    ÷ the median call time. A decode step mostly reads (weights, cache) and writes little, and on a CPU the
    read-only rate differs from the copy probe's (read + write) rate: ~28 vs ~48 GB/s on the 2-core
    machine, so both bounds are reported."""
    n = nbytes // 4
    total = jax.jit(lambda x: jnp.sum(x))
    x = jnp.ones((n,), jnp.float32)
    jax.block_until_ready(total(x))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(total(x))
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {
        "probe": f"jit(sum(x)) over a {nbytes / 2**20:.0f} MiB float32 array; bytes read / time",
        "bytes_per_s": n * 4 / med,
        "best_bytes_per_s": n * 4 / min(times),
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summary(times: list[float], new_tokens: int, flops: float, peak: float) -> dict:
    med = statistics.median(times)
    return {
        "times_s": times,
        "median_s": med,
        "range_s": [min(times), max(times)],
        "tokens_per_s": new_tokens / med,
        "model_gflops_per_s": flops / med / 1e9,
        "fraction_of_matmul_peak": flops / med / peak,
    }


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def wall_and_cpu_seconds(fn, *args) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one call. On a shared machine the CPU
    seconds move less with other work than the wall time does."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


# --------------------------------------------------------------------------------------- PyTorch worker


def make_prompts(vocab: int, batch: int, prompt: int, count: int) -> list[np.ndarray]:
    rng = np.random.RandomState(0)
    return [rng.randint(3, vocab, size=(batch, prompt)).astype(np.int32) for _ in range(count)]


def torch_worker(args: argparse.Namespace) -> None:
    """Loads the exported model, warms up, then runs ``generate`` on prompt set i for every line "i" read
    from stdin and answers with the wall and CPU seconds it took (timed here, without the pipe)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.torch_worker).eval()
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    prompts = make_prompts(model.config.vocab_size, args.batch, args.prompt, args.repeats + 1)
    attn_mask = torch.ones((args.batch, args.prompt), dtype=torch.long)

    def run(i: int) -> None:
        torch.manual_seed(i)
        with torch.no_grad():
            model.generate(input_ids=torch.from_numpy(prompts[i]).long(), attention_mask=attn_mask,
                           max_new_tokens=args.new, min_new_tokens=args.new, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, pad_token_id=0)

    run(0)
    print(json.dumps({"ready": True, "version": torch.__version__, "threads": torch.get_num_threads()}),
          flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps(wall_and_cpu_seconds(run, int(line))), flush=True)


class TorchBaseline:
    """The PyTorch side, in a child process running :func:`torch_worker`."""

    def __init__(self, cfg: ModelConfig, params, args: argparse.Namespace, workdir: str):
        path = f"{workdir}/model"
        hf_io.save(path, LanguageModel(dataclasses.replace(cfg, dtype="float32")), params)
        cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", path, "--batch", str(args.batch),
               "--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats),
               "--dtype", args.dtype, "--malloc", args.malloc]  # the same allocator settings as ours
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def __call__(self, i: int) -> tuple[float, float]:
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        return tuple(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------ measurements


def decode_loop_copies(model: LanguageModel, params, prompts, mask, gen_cfg: GenerationConfig) -> list[str]:
    """Buffers of ≥ one layer's K cache written per step by the compiled decode loop (see module doc)."""
    text = generate.lower(model, params, prompts, mask, jax.random.key(0), gen_cfg).compile().as_text()
    cfg = model.config
    columns = prompts.shape[1] + gen_cfg.max_new_tokens
    layer_cache = prompts.shape[0] * cfg.num_kv_heads * cfg.head_dim * columns
    writes = large_loop_writes(text, "decode_loop", layer_cache)
    return [f"{w.opcode} {w.shape} ({w.op_name})" for w in writes]


def group_prefill(model: LanguageModel, params, prompts: int, prompt_len: int, group: int, new: int,
                  repeats: int = 5) -> dict:
    """Prefill time and FLOPs for ``prompts`` prompts × ``group`` samples: shared (one prefill per prompt,
    the cache copied to its rows) vs each row prefilled (the prompts repeated). Importable by the RL
    iteration benchmarks."""
    rng = np.random.RandomState(1)
    tokens = rng.randint(3, model.config.vocab_size, (prompts, prompt_len)).astype(np.int32)
    mask = np.ones_like(tokens)
    shared_cfg = GenerationConfig(max_new_tokens=new, group_size=group)
    repeated_cfg = GenerationConfig(max_new_tokens=new)
    run = jax.jit(prefill, static_argnames=("model", "config"))
    cases = {
        "shared": (tokens, mask, shared_cfg),
        "repeated": (np.repeat(tokens, group, 0), np.repeat(mask, group, 0), repeated_cfg),
    }
    call = lambda case: jax.block_until_ready(run(model, params, *cases[case]))
    for case in cases:
        call(case)  # compile
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for case in cases:
            times[case].append(seconds(call, case))
    flops = {"shared": prefill_flops(model.config, prompts, prompt_len),
             "repeated": prefill_flops(model.config, prompts * group, prompt_len)}
    out = {"prompts": prompts, "prompt_len": prompt_len, "group_size": group}
    for k in cases:
        out[k] = {"times_s": times[k], "median_s": statistics.median(times[k]), "gflop": flops[k] / 1e9}
    ratios = [r / s for s, r in zip(times["shared"], times["repeated"])]
    out["speedup"] = _spread(ratios)
    out["flops_ratio"] = flops["repeated"] / flops["shared"]
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bandwidth-mib", type=int, default=None,
                        help="size of the copy-bandwidth probe (default 256 MiB on CPU, 2048 elsewhere)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--no-copy-check", action="store_true", help="skip the compiled decode-loop check")
    parser.add_argument("--group-prefill", action="store_true", help="also time group sampling's prefill")
    parser.add_argument("--group-prompts", type=int, default=4)
    parser.add_argument("--group-prompt-len", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--malloc", default="retain", choices=["retain", "glibc"],
                        help="retain: keep freed host memory for the next call (jaxrlhf.host_memory, as the "
                        "jaxrlhf command does), in both processes; glibc: the C library's defaults")
    parser.add_argument("--torch-worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new < 2:  # the decode time per step is (generate − prefill) over the steps after the first token
        parser.error(f"--new must be >= 2 (the decode steps after the first token are timed), got {args.new}")
    return args


def main() -> None:
    args = parse_args()
    host_memory_retained = args.malloc == "retain" and retain_freed_memory()  # before the runtime's threads
    if args.torch_worker:
        torch_worker(args)
        return
    load_at_start = os.getloadavg()[0]
    cfg = PRESETS[args.preset](args)
    cfg = dataclasses.replace(
        cfg, dtype=args.dtype,
        max_position_embeddings=max(cfg.max_position_embeddings, args.prompt + args.new,
                                    args.group_prompt_len + args.new),
    )
    model = LanguageModel(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    prompts = make_prompts(cfg.vocab_size, args.batch, args.prompt, args.repeats + 1)
    mask = np.ones((args.batch, args.prompt), np.int32)
    gen_cfg = GenerationConfig(max_new_tokens=args.new, temperature=1.0)  # no stop ids: full length
    new_tokens = args.batch * args.new
    flops = generation_flops(cfg, args.batch, args.prompt, args.new)
    on_cpu = jax.default_backend() == "cpu"
    probe_n, probe_chain = (2048 if on_cpu else 8192), default_probe_chain()
    peak = matmul_peak_flops(probe_n, jnp.dtype(args.dtype), chain=probe_chain)
    probe_bytes = (args.bandwidth_mib or (256 if on_cpu else 2048)) * 2**20
    bandwidth = copy_bandwidth(probe_bytes)
    reading = read_bandwidth(probe_bytes)

    start = time.perf_counter()
    compiled = generate.lower(model, params, prompts[0], mask, jax.random.key(0), gen_cfg).compile()
    compile_s = time.perf_counter() - start
    run_prefill = jax.jit(prefill, static_argnames=("model", "config"))
    jax.block_until_ready(compiled(params, prompts[0], mask, jax.random.key(0)))  # warm-up
    jax.block_until_ready(run_prefill(model, params, prompts[0], mask, gen_cfg))

    def jax_generate(i: int) -> None:
        jax.block_until_ready(compiled(params, prompts[i], mask, jax.random.key(i)))

    def jax_prefill(i: int) -> None:
        jax.block_until_ready(run_prefill(model, params, prompts[i], mask, gen_cfg))

    with tempfile.TemporaryDirectory() as workdir:
        torch_run = None if args.no_torch else TorchBaseline(cfg, params, args, workdir)
        # Alternate the implementations so that each pair of timings sees the same machine conditions
        # (shared CPUs drift); the speed-up is the median of the per-pair ratios.
        jax_times, jax_cpu, prefill_times, torch_times, torch_cpu = [], [], [], [], []
        for i in range(1, args.repeats + 1):
            wall, cpu = wall_and_cpu_seconds(jax_generate, i)
            jax_times.append(wall)
            jax_cpu.append(cpu)
            prefill_times.append(seconds(jax_prefill, i))
            if torch_run is not None:
                wall, cpu = torch_run(i)
                torch_times.append(wall)
                torch_cpu.append(cpu)
        if torch_run is not None:
            torch_run.close()

    decode_steps = args.new - 1
    per_step = [(g - p) / decode_steps for g, p in zip(jax_times, prefill_times)]
    need = decode_bytes_per_step(cfg, args.batch, args.prompt, args.new)
    bound = need["total"] / bandwidth["bytes_per_s"]
    read_bound = need["total"] / reading["bytes_per_s"]
    result = {
        "benchmark": "generation",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # Other work on a shared machine: the 1-minute load average when the run started and ended.
        "load_average": [load_at_start, os.getloadavg()[0]],
        "host_memory_retained": host_memory_retained,
        "shape": {
            "preset": args.preset,
            "layers": cfg.num_layers,
            "d_model": cfg.hidden_size,
            "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads,
            "vocab": cfg.vocab_size,
            "batch": args.batch,
            "prompt": args.prompt,
            "new_tokens": args.new,
            "dtype": args.dtype,
            "params": cfg.num_params(),
            "scan_layers": cfg.scan_layers,
            "scan_decode": cfg.scan_decode,
        },
        "matmul_peak_gflops": peak / 1e9,
        "matmul_probe": (f"{probe_chain} dependent matmul(s) of {probe_n}x{probe_n} {args.dtype} "
                         "arrays in one jitted call (2·n³ FLOPs each), best of 5, before the timed calls"),
        "copy_bandwidth": bandwidth,
        "read_bandwidth": reading,
        "model_gflop_per_call": flops / 1e9,
        "jaxrlhf": _summary(jax_times, new_tokens, flops, peak) | {"compile_s": compile_s, "cpu_s": jax_cpu},
        "decode": {
            "prefill_s": _spread(prefill_times),
            "s_per_step": _spread(per_step),
            "bytes_per_step": need,
            "bound_s_per_step": bound,
            "bound_s_per_step_full_cache": (need["weights"] + need["kv_cache_full_length"])
            / bandwidth["bytes_per_s"],
            "fraction_of_bound": bound / statistics.median(per_step),
            "bound_s_per_step_read": read_bound,
            "fraction_of_read_bound": read_bound / statistics.median(per_step),
        },
    }
    if not args.no_copy_check:
        result["decode"]["loop_copies"] = decode_loop_copies(model, params, prompts[0], mask, gen_cfg)
    if torch_run is not None:
        ratios = [t / j for j, t in zip(jax_times, torch_times)]
        result["pytorch"] = _summary(torch_times, new_tokens, flops, peak) | {
            "cpu_s": torch_cpu,
            "version": torch_run.info["version"],
            "threads": torch_run.info["threads"],
            "process": "separate (alternating call by call with jaxrlhf)",
        }
        result["speedup_vs_pytorch"] = statistics.median(ratios)
        result["speedup_vs_pytorch_spread"] = _spread(ratios)
        result["speedup_per_pair"] = ratios
        # The same ratio in CPU seconds (less disturbed by other processes on a shared machine).
        result["cpu_seconds_ratio_vs_pytorch"] = _spread([t / j for j, t in zip(jax_cpu, torch_cpu)])
    if args.group_prefill:
        result["group_prefill"] = group_prefill(model, params, args.group_prompts, args.group_prompt_len,
                                                args.group_size, args.new, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

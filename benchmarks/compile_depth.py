"""Compile time against depth: generation and the PPO update at 6, 12 and 24 layers, blocks scanned or
unrolled; and generation tokens/s with the blocks scanned or unrolled.

Compile: a GPT-2 shape of small width (d_model 128, 4 heads, vocab 1024), generation of batch 8 × (prompt
32 + 32 new tokens) and the PPO update (policy with a value head, batch 8 × (32 + 32), 1 epoch × 1
minibatch), each lowered from abstract shapes and compiled with the persistent cache off. Wall seconds and
this process's CPU seconds are reported (the CPU figure is less disturbed by other work on a shared
machine), with the compiled program's size in lines. Variants:

- ``scan``: every pass scans over the blocks, decoding included (``scan_decode=True``);
- ``default``: full-sequence passes (training, scoring, prefill) scan; decode steps run the blocks unrolled
  over one weight and cache buffer per layer (``scan_layers=True, scan_decode=False``);
- ``unrolled``: every pass unrolled (``scan_layers=False``).

Throughput: the generation benchmark's default shape (6 layers, d_model 384, batch 32, prompt 64, 64 new
tokens, float32), the variants alternated call by call; medians and ranges.

    python benchmarks/compile_depth.py [--layers 6 12 24] [--repeats 5] [--skip-ppo]

Prints one JSON object; ``targets`` holds the issue's two checks (24-layer compile ≤ 1.5 × 6-layer; the
variant's generation no slower than unrolled) and whether its decode loop copies nothing per step
(``decode_loop_copies``: the weight and cache slices a rolled layer loop copies before its matmuls read them,
at the compile shape). XLA flags come from the environment and are recorded (``xla_flags``): on a GPU,
``XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true`` lets the matmuls read such slices in place
(``benchmarks/accelerator.sh`` runs the scanned variant that way too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import steps as S
from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.heads import init_value_head
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.rollout.loop_copies import large_loop_writes

VARIANTS = {
    "scan": dict(scan_layers=True, scan_decode=True),
    "default": dict(scan_layers=True, scan_decode=False),
    "unrolled": dict(scan_layers=False, scan_decode=False),
}


def _compile(lowered) -> tuple[dict, str]:
    """Compile time (wall and this process's CPU seconds) and size of ``lowered``, and the optimised HLO."""
    wall, cpu = time.perf_counter(), time.process_time()
    text = lowered.compile().as_text()
    stats = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
             "hlo_lines": len(text.splitlines())}
    return stats, text


def small_config(layers: int, variant: str):
    return gpt2_config(vocab_size=1024, hidden_size=128, num_layers=layers, num_heads=4,
                       max_position_embeddings=128, **VARIANTS[variant])


def generation_lowered(layers: int, variant: str, batch: int = 8, prompt: int = 32, new: int = 32):
    """Generation of ``batch`` × (``prompt`` + ``new``) tokens at the compile shape, lowered from shapes."""
    model = LanguageModel(small_config(layers, variant))
    params = jax.eval_shape(model.init, jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
    config = GenerationConfig(max_new_tokens=new)
    return generate.lower(model, params, tokens, tokens, jax.random.key(0), config)


def generation_compile(layers: int, variant: str) -> tuple[dict, list[str]]:
    """Generation's compile stats and what its decode loop copies per step (:func:`decode_loop_copies`), from
    one compilation."""
    stats, text = _compile(generation_lowered(layers, variant))
    return stats, _loop_copies(text, layers, variant)


def _loop_copies(text: str, layers: int, variant: str) -> list[str]:
    writes = large_loop_writes(text, "decode_loop", small_config(layers, variant).hidden_size ** 2)
    return [f"{w.opcode} {w.shape} ({w.op_name.rsplit('/', 1)[-1]})" for w in writes]


def decode_loop_copies(layers: int, variant: str) -> list[str]:
    """What the compiled decode loop copies per step at the compile shape: every buffer of at least d_model²
    elements (a layer's smallest weight matrix; a layer's K cache is larger, a step's activations and logits
    smaller) that an iteration writes, in-place cache updates excepted (``jaxrlhf.rollout.loop_copies``).
    A rolled layer loop lists here each weight and cache slice the backend copies before reading it; [] means
    the step reads every weight and cache byte in place (the unrolled step on every backend; a scanned one on
    a backend that fuses the slice into the matmul, e.g. XLA:GPU's dynamic-slice fusion)."""
    return generation_compile(layers, variant)[1]


def ppo_update_compile(layers: int, variant: str, batch: int = 8, prompt: int = 32,
                       response: int = 32) -> dict:
    model = LanguageModel(small_config(layers, variant))
    ppo = S.PPOConfig(epochs=1, num_minibatches=1)
    optimizer = S.make_optimizer(S.OptimizerConfig(learning_rate=1e-6), 1000)
    policy = S.PolicyParams(jax.eval_shape(model.init, jax.random.key(0)), init_value_head(128))
    state = jax.eval_shape(lambda p: S.create_rl_state(p, optimizer, S.kl_controller(ppo).init()), policy)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    batch_shapes = S.Experience(
        sequences=jax.ShapeDtypeStruct((batch, prompt + response), jnp.int32),
        sequence_mask=jax.ShapeDtypeStruct((batch, prompt + response), jnp.int32),
        response_mask=f32(batch, response),
        old_logprobs=f32(batch, response),
        ref_logprobs=f32(batch, response),
        old_values=f32(batch, response),
        advantages=f32(batch, response),
        returns=f32(batch, response),
        scores=f32(batch),
    )
    update = jax.jit(S.make_ppo_update(model, None, ppo, optimizer))
    return _compile(update.lower(state, batch_shapes, jax.random.key(0)))[0]


def generation_throughput(repeats: int, variants: list[str]) -> dict:
    batch, prompt, new = 32, 64, 64
    base = gpt2_config(vocab_size=8192, hidden_size=384, num_layers=6, num_heads=6,
                       max_position_embeddings=256)
    params = LanguageModel(base).init(jax.random.key(0))
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 8192, (batch, prompt)).astype(np.int32) for _ in range(repeats + 1)]
    mask = np.ones((batch, prompt), np.int32)
    config = GenerationConfig(max_new_tokens=new)
    runs = {}
    for v in variants:
        model = LanguageModel(dataclasses.replace(base, **VARIANTS[v]))
        runs[v] = generate.lower(model, params, prompts[0], mask, jax.random.key(0), config).compile()
        jax.block_until_ready(runs[v](params, prompts[0], mask, jax.random.key(0)))  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(1, repeats + 1):
        for v in variants:  # alternate, so drifts of a shared machine hit every variant alike
            start = time.perf_counter()
            jax.block_until_ready(runs[v](params, prompts[i], mask, jax.random.key(i)))
            times[v].append(time.perf_counter() - start)
    out = {"shape": {"layers": 6, "d_model": 384, "batch": batch, "prompt": prompt, "new_tokens": new}}
    for v, t in times.items():
        med = statistics.median(t)
        out[v] = {"times_s": t, "median_s": med, "tokens_per_s": batch * new / med,
                  "range_tokens_per_s": [batch * new / max(t), batch * new / min(t)]}
    if "unrolled" in times:
        for v in variants:
            if v != "unrolled":
                ratios = [u / s for u, s in zip(times["unrolled"], times[v])]
                out[v]["speed_vs_unrolled_median"] = statistics.median(ratios)
                out[v]["speed_vs_unrolled_range"] = [min(ratios), max(ratios)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5, help="timed generation calls per variant")
    parser.add_argument("--skip-ppo", action="store_true", help="skip the PPO-update compiles")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    jax.config.update("jax_enable_compilation_cache", False)  # every compile is a real one

    compile_times: dict = {"generation": {}, "ppo_update": {}}
    copies: dict[str, list[str]] = {}
    for variant in args.variants:
        generation = {str(n): generation_compile(n, variant) for n in args.layers}
        compile_times["generation"][variant] = {n: stats for n, (stats, _) in generation.items()}
        # At the smallest depth; per variant, the buffers the decode loop copies every step.
        copies[variant] = generation[str(min(args.layers))][1]
        # The PPO update has no decode: "scan" and "default" compile the same program.
        if not args.skip_ppo and variant != "scan":
            per_depth = {str(n): ppo_update_compile(n, variant) for n in args.layers}
            compile_times["ppo_update"][variant] = per_depth
    lo, hi = str(min(args.layers)), str(max(args.layers))
    growth = {
        phase: {
            v: {k: t[hi][k] / t[lo][k] for k in ("wall_s", "cpu_s", "hlo_lines")} for v, t in per.items()
        }
        for phase, per in compile_times.items()
    }
    result = {
        "benchmark": "compile_depth",
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # Other work on a shared machine: the 1-minute load average when the run started and ended.
        "load_average": [load_at_start, os.getloadavg()[0]],
        "compile_shape": {"d_model": 128, "heads": 4, "vocab": 1024, "batch": 8, "prompt": 32, "new": 32},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compile": compile_times,
        f"compile_growth_{hi}_over_{lo}_layers": growth,
        "decode_loop_copies": copies,
    }
    if not args.skip_throughput:
        result["generation_throughput"] = generation_throughput(args.repeats, args.variants)
    targets = {}
    for v in args.variants:
        if v == "unrolled":
            continue
        gen = growth["generation"][v]["cpu_s"]
        ppo = growth["ppo_update"].get("default" if v == "scan" else v, {}).get("cpu_s")
        speed = result.get("generation_throughput", {}).get(v, {}).get("speed_vs_unrolled_median")
        targets[v] = {
            "generation_compile_within_1.5x": gen <= 1.5,
            "ppo_update_compile_within_1.5x": None if ppo is None else ppo <= 1.5,
            "generation_no_slower_than_unrolled": None if speed is None else speed >= 1.0,
            "decode_copies_nothing": not result["decode_loop_copies"][v],
        }
    result["targets"] = targets
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

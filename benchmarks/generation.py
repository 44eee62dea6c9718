"""Generation throughput: jaxrlhf's jitted KV-cache sampler vs Hugging Face ``generate`` (PyTorch).

Both run the same random weights (a GPT-2 shape by default: 6 layers, d_model 384, 6 heads, vocab 8192),
batch 32, prompt 64, 64 new tokens, multinomial sampling at temperature 1 with no top-k/top-p, every row
forced to the full length. Compile time and warm-up are reported apart from the timed repeats. Model FLOP/s
(prefill + decode, counted analytically) are compared with a float32 matmul peak measured in the same run.
The two implementations alternate call by call, and the speed-up is the median of the per-pair ratios, so
slow drifts of a shared machine affect both alike.

    python benchmarks/generation.py [--batch 32 --prompt 64 --new 64 --repeats 5 --no-torch]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models import hf_io
from jaxrlhf.models.config import ModelConfig, gpt2_config
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.train.timing import matmul_peak_flops


def generation_flops(cfg: ModelConfig, batch: int, prompt: int, new: int) -> float:
    """Model FLOPs of prefill + decode: 2·(non-embedding params) per token, attention 4·L·d·context per
    token, and the LM head (2·d·V) for the last prompt token and each decoded token."""
    d, layers = cfg.hidden_size, cfg.num_layers
    per_token = 2 * cfg.num_params(include_embeddings=False)
    head = 2 * d * cfg.vocab_size
    prefill = batch * (prompt * per_token + 4 * layers * d * prompt * (prompt + 1) / 2 + head)
    decode = sum(batch * (per_token + 4 * layers * d * (prompt + j + 1) + head) for j in range(new - 1))
    return float(prefill + decode)


def _summary(times: list[float], new_tokens: int, flops: float, peak: float) -> dict:
    med = statistics.median(times)
    return {
        "times_s": times,
        "median_s": med,
        "tokens_per_s": new_tokens / med,
        "model_gflops_per_s": flops / med / 1e9,
        "fraction_of_matmul_peak": flops / med / peak,
    }


def _torch_generator(cfg: ModelConfig, params, prompts, args):
    """Hugging Face ``generate`` on the same weights (saved and reloaded through our HF export)."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        hf_io.save(f"{tmp}/model", LanguageModel(dataclasses.replace(cfg, dtype="float32")), params)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/model").eval()
    if args.dtype == "bfloat16":
        hf_model = hf_model.to(torch.bfloat16)
    attn_mask = torch.ones((args.batch, args.prompt), dtype=torch.long)

    def run(i: int) -> None:
        torch.manual_seed(i)
        with torch.no_grad():
            hf_model.generate(
                input_ids=torch.from_numpy(prompts[i]).long(),
                attention_mask=attn_mask,
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=0,
            )

    run(0)  # warm-up
    return run


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = parser.parse_args()

    cfg = gpt2_config(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        max_position_embeddings=max(256, args.prompt + args.new),
        dtype=args.dtype,
    )
    model = LanguageModel(cfg)
    params = model.init(jax.random.key(0))
    rng = np.random.RandomState(0)
    prompts = [
        rng.randint(3, args.vocab, size=(args.batch, args.prompt)).astype(np.int32)
        for _ in range(args.repeats + 1)
    ]
    mask = np.ones((args.batch, args.prompt), np.int32)
    gen_cfg = GenerationConfig(max_new_tokens=args.new, temperature=1.0)  # no stop ids: full length
    new_tokens = args.batch * args.new
    flops = generation_flops(cfg, args.batch, args.prompt, args.new)

    peak = matmul_peak_flops()

    start = time.perf_counter()
    compiled = generate.lower(model, params, prompts[0], mask, jax.random.key(0), gen_cfg).compile()
    compile_s = time.perf_counter() - start
    del compiled
    jax.block_until_ready(generate(model, params, prompts[0], mask, jax.random.key(0), gen_cfg))  # warm-up

    def jax_generate(i: int) -> None:
        jax.block_until_ready(generate(model, params, prompts[i], mask, jax.random.key(i), gen_cfg))

    torch_generate = None if args.no_torch else _torch_generator(cfg, params, prompts, args)
    # Interleave the two implementations so that each pair of timings sees the same machine conditions
    # (shared CPUs drift); the speed-up is the median of the per-pair ratios.
    jax_times, torch_times = [], []
    for i in range(1, args.repeats + 1):
        jax_times.append(seconds(jax_generate, i))
        if torch_generate is not None:
            torch_times.append(seconds(torch_generate, i))
    result = {
        "benchmark": "generation",
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "shape": {
            "layers": args.layers,
            "d_model": args.d_model,
            "heads": args.heads,
            "vocab": args.vocab,
            "batch": args.batch,
            "prompt": args.prompt,
            "new_tokens": args.new,
            "dtype": args.dtype,
            "params": cfg.num_params(),
        },
        "matmul_peak_gflops": peak / 1e9,
        "model_gflop_per_call": flops / 1e9,
        "jaxrlhf": _summary(jax_times, new_tokens, flops, peak) | {"compile_s": compile_s},
    }
    if torch_generate is not None:
        import torch

        result["pytorch"] = _summary(torch_times, new_tokens, flops, peak) | {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        ratios = [t / j for j, t in zip(jax_times, torch_times)]
        result["speedup_vs_pytorch"] = statistics.median(ratios)
        result["speedup_per_pair"] = ratios
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()

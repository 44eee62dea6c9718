"""One full PPO (or critic-free GRPO) iteration, phase by phase: generation, scoring (reward model +
reference + values + advantages) and the update (epochs × minibatches), on random weights.

The iteration is the trainer's: its phases come from ``jaxrlhf.train.rl_setup.build_rl_phases`` and run in
``jaxrlhf.steps.rl_iteration.make_rl_iteration``, each timed (blocking on its outputs) as in ``jaxrlhf ppo``.

Default shape: a tiny GPT-2 (6 layers, d_model 384, 6 heads, vocab 8192), batch 32, prompt 64, response 64,
4 epochs × 1 minibatch; the reward model and the reference have the policy's architecture, the critic is a
value head on the policy (``--critic separate``: a second model of the same shape, with its own optimiser).

``--algorithm grpo --group-size 8`` runs GRPO on the same tokens: ``--batch`` / 8 prompts with 8 samples each
(so the same B sequences of P + N tokens), group-normalised advantages, no critic and no value head, the same
epochs × minibatches. Generation samples the groups by repeating each prompt G times
(``jaxrlhf.steps.rl_iteration.generate_groups``): each prompt's prefill is computed G times until the rollout
layer shares it (the JSON says which, under ``group_prefill``).

Every phase is jitted; compile time is reported apart from the timed iterations. MFU of the update is measured
against a large matmul of the compute dtype timed in the same run (on a CPU that is the only meaningful
"peak"; on accelerators pass ``--peak-tflops`` for the vendor number too).

Runs on whatever devices JAX sees, data-parallel by default (``--data``/``--fsdp`` shape the mesh), so
the same script reports tokens/s/device and MFU on a multi-GPU or TPU host
(``--preset gpt2-medium --dtype bfloat16``); multi-host jobs start it on every host
(``jax.distributed`` is initialised from the environment).

    python benchmarks/ppo_iteration.py [--preset tiny|gpt2-small|gpt2-medium|llama-1b] [--iterations 3]
        [--algorithm ppo|grpo] [--group-size 8] [--critic shared|separate]

Prints one JSON object (process 0 only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel
from jaxrlhf import steps as S
from jaxrlhf.models.config import ModelConfig, gpt2_config, llama_config
from jaxrlhf.models.heads import init_reward_head, init_value_head
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.generate import GenerationConfig
from jaxrlhf.steps.rl_iteration import make_rl_iteration
from jaxrlhf.train.model_setup import flops_per_token
from jaxrlhf.train.rl_setup import build_rl_phases, reward_model_score_fn
from jaxrlhf.train.timing import Timers, matmul_peak_flops, transformer_flops_per_token

PRESETS = {
    "tiny": lambda v: gpt2_config(
        vocab_size=v or 8192, hidden_size=384, num_layers=6, num_heads=6, max_position_embeddings=1024
    ),
    "gpt2-small": lambda v: gpt2_config(
        vocab_size=v or 50257, hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=1024
    ),
    "gpt2-medium": lambda v: gpt2_config(
        vocab_size=v or 50257, hidden_size=1024, num_layers=24, num_heads=16, max_position_embeddings=1024
    ),
    # Llama 3.2 1B's shape (GQA 32/8, SwiGLU 8192, tied embeddings).
    "llama-1b": lambda v: llama_config(
        vocab_size=v or 128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    ),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences per iteration)")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations after the warm-up one")
    p.add_argument("--data", type=int, default=-1)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None, help="vendor peak per device, for a second MFU")
    p.add_argument("--algorithm", default="ppo", choices=["ppo", "grpo"])
    p.add_argument("--group-size", type=int, default=8, help="grpo: samples per prompt (divides --batch)")
    p.add_argument("--critic", default="shared", choices=["shared", "separate"], help="ppo: the critic")
    args = p.parse_args()
    if args.algorithm == "grpo" and args.batch % args.group_size:
        p.error(f"--batch {args.batch} is not a multiple of --group-size {args.group_size}")
    return args


def update_flops(cfg: ModelConfig, tokens: int, seq_len: int, epochs: int) -> float:
    """Training FLOPs of the update: 6·N + 12·L·d·T per token per epoch (policy with its value head)."""
    per_token = transformer_flops_per_token(
        cfg.num_params(), cfg.num_layers, cfg.hidden_size, seq_len, training=True
    )
    return float(per_token * tokens * epochs)


def main() -> None:
    args = parse_args()
    pcfg = parallel.ParallelConfig(data=args.data, fsdp=args.fsdp)
    parallel.initialize_distributed(pcfg)
    mesh = parallel.make_mesh(pcfg)
    cfg = dataclasses.replace(PRESETS[args.preset](args.vocab), dtype=args.dtype)
    model = LanguageModel(cfg)
    d = cfg.hidden_size
    B, P, N = args.batch, args.prompt, args.response
    grpo = args.algorithm == "grpo"
    G = args.group_size if grpo else 1
    split = dict(epochs=args.epochs, num_minibatches=args.minibatches, grad_accum_steps=args.grad_accum)
    separate = not grpo and args.critic == "separate"
    algo = S.GRPOConfig(group_size=G, **split) if grpo else S.PPOConfig(critic=args.critic, **split)
    gen_cfg = GenerationConfig(max_new_tokens=N, temperature=algo.temperature)  # no stop: full length
    optimizer = S.make_optimizer(S.OptimizerConfig(learning_rate=1e-6), 1000)
    place = lambda tree: parallel.place_state(mesh, tree, pcfg.fsdp_min_size)

    with jax.set_mesh(mesh):  # as the trainer: everything traced under the mesh
        # SETUP: policy (+ value head), reference and reward model, all placed on the mesh.
        init = jax.jit(
            model.init,
            out_shardings=parallel.state_shardings(mesh, model.abstract_params(), pcfg.fsdp_min_size),
        )
        keys = jax.random.split(jax.random.key(0), 5)
        # GRPO: no value head; PPO: a value head on the policy, or a separate critic.
        policy = S.PolicyParams(init(keys[0]), None if grpo or separate else init_value_head(d))
        critic = S.CriticParams(init(keys[4]), init_value_head(d)) if separate else None
        critic_optimizer = optimizer if separate else None
        kl = S.kl_controller(algo).init()
        state = place(S.create_rl_state(policy, optimizer, kl, critic, critic_optimizer))
        ref = place(S.PolicyParams(init(keys[1])))
        rm = place(S.RewardModelParams(init(keys[2]), init_reward_head(keys[3], d)))
        state_bytes = parallel.per_device_bytes(state)

        # The trainer's phases, built by the trainer's builder, run by the one RL iteration.
        score = reward_model_score_fn(model, rm)
        phases = build_rl_phases(model, model, model if separate else None, algo, gen_cfg, score, optimizer,
                                 critic_optimizer, parallel.state_shardings(mesh, state, pcfg.fsdp_min_size))
        timers = Timers()
        iteration = make_rl_iteration(phases, ref, around=timers)

        rng = np.random.RandomState(0)
        # Every process draws the same global batch and passes its own rows (as the data loader splits them).
        rows = B // G // jax.process_count()  # prompts
        local = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

        def timed_iteration(i: int, state):
            prompts = parallel.shard_batch(
                mesh,
                {  # B / G prompts: B sequences once each prompt has its G samples
                    "tokens": rng.randint(3, cfg.vocab_size, (B // G, P)).astype(np.int32)[local],
                    "mask": np.ones((B // G, P), np.int32)[local],
                },
            )
            timers.reset()
            with timers("total"):
                state, out = iteration(state, prompts, jax.random.fold_in(jax.random.key(1), i))
            return state, dict(timers.totals), out.metrics

        state, first, _ = timed_iteration(0, state)  # compiles every phase
        timed = []
        for i in range(args.iterations):
            state, times, metrics = timed_iteration(i + 1, state)
            timed.append(times)
    med = {k: statistics.median(t[k] for t in timed) for k in ("generation", "score", "update", "total")}
    compile_s = {k: max(first[k] - med[k], 0.0) for k in med}

    devices = mesh.size
    seq_tokens = B * (P + N)
    peak = matmul_peak_flops(8192 if jax.default_backend() != "cpu" else 2048, jnp.dtype(args.dtype))
    flops = update_flops(cfg, seq_tokens, P + N, args.epochs)
    if separate:  # the critic trains on every token too (no LM head)
        flops += flops_per_token(cfg, training=True, lm_head=False)(P + N) * seq_tokens * args.epochs
    result = {
        "benchmark": "ppo_iteration",
        "algorithm": args.algorithm,
        "critic": "none" if grpo else args.critic,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": devices,
        "processes": jax.process_count(),
        "mesh": dict(mesh.shape),
        "preset": args.preset,
        "params": cfg.num_params(),
        "dtype": args.dtype,
        "shape": {
            "batch": B,
            "prompt": P,
            "response": N,
            "epochs": args.epochs,
            "minibatches": args.minibatches,
            "grad_accum": args.grad_accum,
            "prompts": B // G,
            "group_size": G,
        },
        # How a group's prompt is prefilled: once per sample until rollout/generate.py shares it.
        **({"group_prefill": "repeated: each prompt prefilled group_size times"} if grpo else {}),
        "state_bytes_per_device": state_bytes,
        "compile_s": compile_s,
        "wall_s": med,
        "tokens_per_s": {
            "generation": B * N / med["generation"],
            "score": seq_tokens / med["score"],
            "update": seq_tokens * args.epochs / med["update"],
            "iteration": seq_tokens / med["total"],
        },
        "iteration_tokens_per_s_per_device": seq_tokens / med["total"] / devices,
        "matmul_peak_tflops_per_device": peak / 1e12,
        # Simulated CPU devices share one processor, whose measured peak is already the whole machine's.
        "update_mfu": flops / med["update"] / (peak if jax.default_backend() == "cpu" else peak * devices),
        "first_minibatch_ratio_error": float(metrics["val/ratio_abs_dev_first_minibatch"]),
    }
    if args.peak_tflops:
        result["update_mfu_vs_vendor_peak"] = flops / med["update"] / (args.peak_tflops * 1e12 * devices)
    if parallel.is_main_process():
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

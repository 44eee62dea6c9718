"""One full PPO (or critic-free GRPO) iteration, phase by phase: generation, scoring (reward model +
reference + values + advantages) and the update (epochs × minibatches), on random weights.

The iteration is the trainer's: its phases come from ``jaxrlhf.train.rl_setup.build_rl_phases`` and run in
``jaxrlhf.steps.rl_iteration.make_rl_iteration``, each timed (blocking on its outputs) as in ``jaxrlhf ppo``.

Default shape: a tiny GPT-2 (6 layers, d_model 384, 6 heads, vocab 8192), batch 32, prompt 64, response 64,
4 epochs × 1 minibatch; the reward model and the reference have the policy's architecture, the critic is a
value head on the policy (``--critic separate``: a second model of the same shape, with its own optimiser).

``--algorithm grpo --group-size 8`` runs GRPO on the same tokens: ``--batch`` / 8 prompts with 8 samples each
(so the same B sequences of P + N tokens), group-normalised advantages, no critic and no value head, the same
epochs × minibatches. Generation prefills each prompt once and samples its G responses from copies of its
cache (``jaxrlhf.steps.rl_iteration.generate_groups``; the JSON says so under ``group_prefill``).

Every phase is jitted; compile time is reported apart from the timed iterations. MFU of the update is measured
against a large matmul of the compute dtype timed in the same run (on a CPU that is the only meaningful
"peak"; on accelerators pass ``--peak-tflops`` for the vendor number too).

``iteration_mfu`` (issue 13 §1) is the whole iteration's: the *necessary* FLOPs ÷ (iteration time × that
in-run matmul peak), the median over the timed iterations, each against the higher of the probes taken just
before and just after it (a shared machine's speed drifts by 2× within minutes; the JSON names the probe
and gives the range, and ``iteration_mfu_vs_best_probe`` the median time against the run's best probe).
Necessary means the work an iteration cannot avoid (``necessary_flops``): generation (one forward
over each prompt and its response, LM head on the response tokens only), the reference's forward, the
reward model's forward (no LM head), a separate critic's forward, and the update's forward + backward
(3 × a forward per epoch, the critic's too). Anything else — a recompute of the policy's log-probs
(``--logprobs-from recompute``, the default, which buys the bit-exact first ratio, and gives a shared critic's
values on the way) — counts as overhead. With ``--logprobs-from rollout`` a shared critic's values are read
off the decode steps (``generate(..., value_head=…)``): the experience phase runs no policy forward at all.
The update's backward saves only the blocks' matmul outputs (``ModelConfig.remat``, default "dots") and the
LM head's backward is written out (``jaxrlhf.models.transformer.head_logits``); ``--remat`` picks another
policy for comparison. ``phase_share`` says which phase dominates.

Runs on whatever devices JAX sees, data-parallel by default (``--data``/``--fsdp`` shape the mesh), so
the same script reports tokens/s/device and MFU on a multi-GPU or TPU host
(``--preset gpt2-medium --dtype bfloat16``); multi-host jobs start it on every host
(``jax.distributed`` is initialised from the environment).

``--lora-rank R`` runs full fine-tuning and LoRA (rank R, α = 2R, on ``--lora-targets``) at the same shape,
their timed iterations alternating, and reports each one's state bytes per device: what is trained (params +
optimiser state), the frozen base LoRA keeps, and the reference copy full fine-tuning keeps (LoRA's reference
is its frozen base: none). The reward model, the same in both, is left out. ``--shapes-only`` computes those
bytes from shapes (``jax.eval_shape``) without running anything: for presets too slow to run here.

``--profile DIR`` runs one more iteration after the timed ones under ``jax.profiler`` and adds
``op_profile``: per phase, where its time went (``jaxrlhf.op_profile``: by kind of op, by region of the model
and the step, forward / backward / recompute, the top ops with their shapes). The process then starts XLA
with its optimised programs dumped to DIR/hlo (and, on the CPU, per-op trace events on); the trace is in
DIR/trace.

    python benchmarks/ppo_iteration.py [--preset tiny|gpt2-small|gpt2-medium|llama-1b] [--iterations 3]
        [--algorithm ppo|grpo] [--group-size 8] [--critic shared|separate] [--epochs 1]
        [--logprobs-from recompute|rollout] [--lora-rank 16 [--shapes-only]] [--profile DIR]

Prints one JSON object (process 0 only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import op_profile, parallel
from jaxrlhf import steps as S
from jaxrlhf.host_memory import retain_freed_memory
from jaxrlhf.models.config import REMAT_POLICIES, ModelConfig, gpt2_config, llama_config
from jaxrlhf.models.heads import init_reward_head, init_value_head
from jaxrlhf.models.lora import LoRAConfig, init_lora
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.generate import GenerationConfig
from jaxrlhf.steps.rl_iteration import make_rl_iteration
from jaxrlhf.steps.state import detach_frozen
from jaxrlhf.train.rl_setup import build_rl_phases, reward_model_score_fn
from jaxrlhf.train.timing import Timers, causal_attention_flops, default_probe_chain, matmul_peak_flops
from jaxrlhf.xla_flags import set_flags_before_start

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
    p.add_argument("--logprobs-from", default="recompute", choices=["recompute", "rollout"],
                   help="the old log-probs: a forward in the experience phase, or the sampled ones")
    p.add_argument("--malloc", default="retain", choices=["retain", "glibc"],
                   help="retain: keep freed host memory for the next call (jaxrlhf.host_memory, as the "
                   "jaxrlhf command does); glibc: the C library's defaults, for comparison")
    p.add_argument("--remat", default="dots", choices=REMAT_POLICIES,
                   help="what the blocks' backward saves (ModelConfig.remat)")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA of this rank vs full fine-tuning")
    p.add_argument("--lora-targets", default="q,k,v,o,up,down", help="LoRA: the adapted projections")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="one more iteration under jax.profiler: JSON op_profile (trace and programs in DIR)")
    p.add_argument("--shapes-only", action="store_true",
                   help="with --lora-rank: state bytes from shapes (jax.eval_shape), nothing run")
    args = p.parse_args()
    if args.shapes_only and not args.lora_rank:
        p.error("--shapes-only goes with --lora-rank")
    if args.algorithm == "grpo" and args.batch % args.group_size:
        p.error(f"--batch {args.batch} is not a multiple of --group-size {args.group_size}")
    return args


def forward_flops(cfg: ModelConfig, rows: int, start: int, end: int, head: bool) -> float:
    """One forward's FLOPs over positions start + 1 … end of ``rows`` sequences: 2·N_blocks per token (the
    matmul weights; embedding lookups are not matmuls), causal attention (``causal_attention_flops``) and,
    with ``head``, the LM head's 2·V·d on each of those tokens."""
    tokens = rows * (end - start)
    attention = causal_attention_flops(cfg.num_layers, cfg.num_heads * cfg.head_dim, start, end)
    blocks = 2.0 * cfg.num_params(include_embeddings=False) * tokens + rows * attention
    return blocks + (2.0 * cfg.vocab_size * cfg.hidden_size * tokens if head else 0.0)


def necessary_flops(cfg: ModelConfig, prompts: int, rows: int, prompt: int, response: int, epochs: int,
                    separate_critic: bool) -> dict[str, float]:
    """The FLOPs an iteration cannot avoid, by phase (see the module docstring). ``prompts`` prefills (one per
    prompt, shared by its group), ``rows`` sequences of ``prompt + response`` tokens; attention is counted
    causally (what the computation needs; PaLM's convention counts the full T×T, ~2% more at the default
    shape), as ``benchmarks/generation.py`` counts it. The LM head runs on response tokens only."""
    t = prompt + response

    lm_head = 2.0 * cfg.vocab_size * cfg.hidden_size * rows * response

    def full(head: bool) -> float:  # a forward over whole sequences, the LM head on the response tokens
        return forward_flops(cfg, rows, 0, t, head=False) + (lm_head if head else 0.0)

    generation = forward_flops(cfg, prompts, 0, prompt, head=False) + forward_flops(cfg, rows, prompt, t,
                                                                                    head=True)
    score = full(head=False) + full(head=True)  # the reward model; the reference (+ LM head)
    update = 3.0 * full(head=True) * epochs
    if separate_critic:
        score += full(head=False)
        update += 3.0 * full(head=False) * epochs
    return {"generation": generation, "score": score, "update": update,
            "total": generation + score + update}


def init_policy_state(key: jax.Array, model: LanguageModel, algo, optimizer, grpo: bool, separate: bool,
                      lora: LoRAConfig | None) -> tuple[S.RLState, S.PolicyParams | None]:
    """``(RL state, reference)``: full fine-tuning trains the whole policy and keeps a reference copy; LoRA
    trains adapters on the frozen base, which is also the reference (``None`` here: no copy)."""
    keys = jax.random.split(key, 4)
    d = model.config.hidden_size
    base = model.init(keys[0])
    value_head = None if grpo or separate else init_value_head(d)
    critic = S.CriticParams(model.init(keys[2]), init_value_head(d)) if separate else None
    critic_optimizer = optimizer if separate else None
    kl = S.kl_controller(algo).init()
    if lora is None:
        state = S.create_rl_state(S.PolicyParams(base, value_head), optimizer, kl, critic, critic_optimizer)
        return state, S.PolicyParams(model.init(keys[1]))
    adapters = init_lora(keys[3], model.config, lora)
    state = S.create_rl_state(S.PolicyParams(adapters, value_head), optimizer, kl, critic, critic_optimizer,
                              policy_frozen=S.PolicyParams(base))
    return state, None


def shape_bytes_per_device(mesh, tree, min_size: int) -> int:
    """Bytes of ``tree`` (arrays or ShapeDtypeStructs) on one device under ``parallel.state_shardings``."""
    fsdp = mesh.shape[parallel.FSDP_AXIS]
    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        split = fsdp if parallel.FSDP_AXIS in tuple(parallel.fsdp_spec(shape, fsdp, min_size)) else 1
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize // split
    return total


def state_accounting(mesh, state, ref, min_size: int) -> dict[str, int]:
    """Bytes per device of what is trained (params + optimiser state), the frozen base and the reference."""
    trained, frozen = detach_frozen(state)
    out = {
        "trained_params_and_optimizer": shape_bytes_per_device(mesh, trained, min_size),
        "frozen_base": shape_bytes_per_device(mesh, frozen, min_size),
        "reference_copy": 0 if ref is None else shape_bytes_per_device(mesh, ref, min_size),
    }
    out["total"] = sum(out.values())
    return out


def lora_comparison(args, mesh, pcfg, model, algo, optimizer, grpo: bool, separate: bool) -> dict:
    """State bytes per device of full fine-tuning vs LoRA from shapes (``jax.eval_shape``)."""
    lora = LoRAConfig(enabled=True, rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                      targets=tuple(args.lora_targets.split(",")))
    out = {}
    for name, cfg in (("full", None), ("lora", lora)):
        shapes = jax.eval_shape(lambda k, cfg=cfg: init_policy_state(k, model, algo, optimizer, grpo,
                                                                       separate, cfg), jax.random.key(0))
        out[name] = state_accounting(mesh, *shapes, pcfg.fsdp_min_size)
    out["lora"]["trained_params"] = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(
            lambda k: init_lora(k, model.config, lora), jax.random.key(0))))
    return {"config": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
            "state_bytes_per_device": out, "ratios": lora_ratios(out)}


def lora_ratios(out: dict) -> dict[str, float]:
    full, lora = out["full"], out["lora"]
    return {
        # What gets gradients and optimiser state: the adapters (+ value head) alone.
        "trained_params_and_optimizer": full["trained_params_and_optimizer"]
        / lora["trained_params_and_optimizer"],
        # Everything the policy side holds: full = params + Adam + reference copy; LoRA = base + adapters.
        "total_with_reference": full["total"] / lora["total"],
        # The same without the reference copy (as if full fine-tuning's reference were offloaded).
        "total_without_reference": (full["total"] - full["reference_copy"]) / lora["total"],
    }


def profiled_iteration(directory: str, run: dict, timed_iteration, index: int) -> dict:
    """One more iteration of ``run`` under ``jax.profiler``, each phase inside an ``op_profile.phase``
    window; returns ``op_profile.profile_phases`` of it (the programs from the dump in directory/hlo)."""
    timers = run["timers"]

    @contextlib.contextmanager
    def around(name: str):
        with op_profile.phase(name), timers(name):
            yield

    timed_run = {**run, "iteration": make_rl_iteration(run["phases"], run["ref"], around=around)}
    trace_dir = os.path.join(directory, "trace")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        timed_iteration(index, timed_run)
    finally:
        jax.profiler.stop_trace()
    return {"phases": op_profile.profile_phases(trace_dir, os.path.join(directory, "hlo")),
            "what": "one iteration after the timed ones, under jax.profiler (its per-op tracing slows it: "
                    "compare wall_ms with wall_s); ms per call of each phase, see jaxrlhf.op_profile",
            "trace_dir": trace_dir}


def main() -> None:
    args = parse_args()
    host_memory_retained = args.malloc == "retain" and retain_freed_memory()  # before the runtime's threads
    if args.profile:  # before the backend starts
        set_flags_before_start(op_profile.xla_flags(os.path.join(args.profile, "hlo")))
        # Every program compiled here, so that each one is in the dump (a persistent-cache hit is not).
        jax.config.update("jax_enable_compilation_cache", False)
    pcfg = parallel.ParallelConfig(data=args.data, fsdp=args.fsdp)
    parallel.initialize_distributed(pcfg)
    mesh = parallel.make_mesh(pcfg)
    cfg = dataclasses.replace(PRESETS[args.preset](args.vocab), dtype=args.dtype, remat=args.remat)
    model = LanguageModel(cfg)
    d = cfg.hidden_size
    B, P, N = args.batch, args.prompt, args.response
    grpo = args.algorithm == "grpo"
    G = args.group_size if grpo else 1
    split = dict(epochs=args.epochs, num_minibatches=args.minibatches, grad_accum_steps=args.grad_accum)
    separate = not grpo and args.critic == "separate"
    split["logprobs_from"] = args.logprobs_from
    algo = S.GRPOConfig(group_size=G, **split) if grpo else S.PPOConfig(critic=args.critic, **split)
    gen_cfg = GenerationConfig(max_new_tokens=N, temperature=algo.temperature)  # no stop: full length
    optimizer = S.make_optimizer(S.OptimizerConfig(learning_rate=1e-6), 1000)
    place = lambda tree: parallel.place_state(mesh, tree, pcfg.fsdp_min_size)

    shape = {"batch": B, "prompt": P, "response": N, "epochs": args.epochs, "minibatches": args.minibatches,
             "grad_accum": args.grad_accum, "prompts": B // G, "group_size": G}
    lora_result = None
    if args.lora_rank:
        lora_result = lora_comparison(args, mesh, pcfg, model, algo, optimizer, grpo, separate)
    if args.shapes_only:
        result = {"benchmark": "ppo_iteration", "algorithm": args.algorithm,
                  "critic": "none" if grpo else args.critic, "preset": args.preset,
                  "params": cfg.num_params(), "dtype": args.dtype, "devices": mesh.size,
                  "mesh": dict(mesh.shape), "shape": shape,
                  "lora": {**lora_result, "method": "state bytes from shapes (jax.eval_shape, "
                           "parallel.state_shardings): nothing was run"}}
        if parallel.is_main_process():
            print(json.dumps(result, indent=2))
        return
    variants = {"full": None}
    if args.lora_rank:
        lora_cfg = LoRAConfig(enabled=True, **{k: lora_result["config"][k] for k in ("rank", "alpha")},
                              targets=tuple(lora_result["config"]["targets"]))
        variants["lora"] = lora_cfg

    with jax.set_mesh(mesh):  # as the trainer: everything traced under the mesh
        # SETUP: per variant the policy (+ value head or critic) and its reference, and one reward model.
        init = jax.jit(
            model.init,
            out_shardings=parallel.state_shardings(mesh, model.abstract_params(), pcfg.fsdp_min_size),
        )
        keys = jax.random.split(jax.random.key(0), 5)
        rm = place(S.RewardModelParams(init(keys[2]), init_reward_head(keys[3], d)))
        score = reward_model_score_fn(model, rm)
        runs = {}
        for name, lora_cfg in variants.items():
            run_model = model if lora_cfg is None else dataclasses.replace(model, lora_alpha=lora_cfg.alpha)

            def make(k, m=run_model, c=lora_cfg):
                return init_policy_state(k, m, algo, optimizer, grpo, separate, c)

            shardings = parallel.state_shardings(mesh, jax.eval_shape(make, jax.random.key(0)),
                                                 pcfg.fsdp_min_size)
            state, ref = jax.jit(make, out_shardings=shardings)(jax.random.key(0))
            measured = parallel.per_device_bytes((state, ref))
            accounting = state_accounting(mesh, state, ref, pcfg.fsdp_min_size)
            assert measured == accounting["total"], (measured, accounting)  # shapes' count = the arrays'
            ref = state.policy.frozen if ref is None else ref  # LoRA: the base with the adapters off
            timers = Timers()
            # The trainer's phases, built by the trainer's builder, run by the one RL iteration.
            phases = build_rl_phases(run_model, run_model, run_model if separate else None, algo, gen_cfg,
                                     score, optimizer, optimizer if separate else None,
                                     parallel.state_shardings(mesh, state, pcfg.fsdp_min_size))
            runs[name] = {"state": state, "ref": ref, "phases": phases, "timers": timers, "bytes": accounting}
        for r in runs.values():
            r["iteration"] = make_rl_iteration(r["phases"], r["ref"], around=r["timers"])
        state_bytes = runs["full"]["bytes"]["trained_params_and_optimizer"]

        rng = np.random.RandomState(0)
        # Every process draws the same global batch and passes its own rows (as the data loader splits them).
        rows = B // G // jax.process_count()  # prompts
        local = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

        def timed_iteration(i: int, r: dict):
            prompts = parallel.shard_batch(
                mesh,
                {  # B / G prompts: B sequences once each prompt has its G samples
                    "tokens": rng.randint(3, cfg.vocab_size, (B // G, P)).astype(np.int32)[local],
                    "mask": np.ones((B // G, P), np.int32)[local],
                },
            )
            timers = r["timers"]
            timers.reset()
            with timers("total"):
                key = jax.random.fold_in(jax.random.key(1), i)
                r["state"], out = r["iteration"](r["state"], prompts, key)
            return dict(timers.totals), out.metrics

        firsts = {name: timed_iteration(0, r)[0] for name, r in runs.items()}  # compiles every phase
        probe_n = 8192 if jax.default_backend() != "cpu" else 2048
        probe_chain = default_probe_chain()
        # Probed before the timed iterations and after each one: on a shared machine whose speed drifts, each
        # iteration is measured against the peak of the probes either side of it.
        peaks = [matmul_peak_flops(probe_n, jnp.dtype(args.dtype), chain=probe_chain)]
        timed = {name: [] for name in runs}
        for i in range(args.iterations):
            for name, r in runs.items():  # alternating: the variants see the same machine load
                times, metrics = timed_iteration(i + 1, r)
                timed[name].append(times)
                r["metrics"] = metrics
            peaks.append(matmul_peak_flops(probe_n, jnp.dtype(args.dtype), chain=probe_chain))
        profile = None
        if args.profile:
            profile = profiled_iteration(args.profile, runs["full"], timed_iteration, args.iterations + 1)
    phase_names = ("generation", "score", "update", "total")
    med = {k: statistics.median(t[k] for t in timed["full"]) for k in phase_names}
    first, metrics = firsts["full"], runs["full"]["metrics"]
    compile_s = {k: max(first[k] - med[k], 0.0) for k in med}
    if args.lora_rank:
        lora_result["measured"] = {}
        for name, r in runs.items():
            lora_result["measured"][name] = {
                "state_bytes_per_device": r["bytes"],
                "wall_s_median": {k: statistics.median(t[k] for t in timed[name]) for k in phase_names},
                "wall_s_min_max": {k: [min(t[k] for t in timed[name]), max(t[k] for t in timed[name])]
                                   for k in phase_names},
                "first_minibatch_ratio_error": float(r["metrics"]["val/ratio_abs_dev_first_minibatch"]),
            }
        lora_result["measured"]["ratios"] = lora_ratios({n: runs[n]["bytes"] for n in runs})
        lora_result["method"] = ("state bytes of the arrays held (parallel.per_device_bytes, equal to the "
                                 "count from shapes); wall times: median and [min, max] over the timed "
                                 "iterations, the two variants alternating")

    devices = mesh.size
    seq_tokens = B * (P + N)
    peak = max(peaks)
    necessary = necessary_flops(cfg, B // G, B, P, N, args.epochs, separate)
    # Per timed iteration (of the full run): necessary FLOPs ÷ (its time × the better probe either side).
    around = [max(a, b) for a, b in itertools.pairwise(peaks)]
    per_device = 1 if jax.default_backend() == "cpu" else mesh.size
    per_iteration = [necessary["total"] / t["total"] / (p * per_device)
                     for t, p in zip(timed["full"], around, strict=True)]
    # Simulated CPU devices share one processor, whose measured peak is already the whole machine's.
    machine_peak = peak if jax.default_backend() == "cpu" else peak * devices
    # The update's MFU counts what it must compute, as the iteration's does (before 2026-12-04 it counted
    # 6·N per token on every token: the LM head on prompt tokens too, +15% at the default shape).
    flops = necessary["update"]
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
        "remat": args.remat,
        "host_memory_retained": host_memory_retained,
        "shape": shape,
        # How a group's prompt is prefilled (GenerationConfig.group_size).
        **({"group_prefill": "shared: one prefill per prompt"} if grpo else {}),
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
        "update_mfu": flops / med["update"] / machine_peak,  # = phase_mfu["update"]
        "first_minibatch_ratio_error": float(metrics["val/ratio_abs_dev_first_minibatch"]),
        "logprobs_from": args.logprobs_from,
        "necessary_tflops": {k: v / 1e12 for k, v in necessary.items()},
        "flop_count": "matmul FLOPs: 2·N_blocks per token, causal attention (4·L·H·hd per attended "
                      "position), the LM head on response tokens only; backward = 2 × forward",
        # Median over the timed iterations, each against the probes either side of it (range beside it).
        "iteration_mfu": statistics.median(per_iteration),
        "iteration_mfu_range": [min(per_iteration), max(per_iteration)],
        # The median iteration time against the best probe of the whole run (a lower bound).
        "iteration_mfu_vs_best_probe": necessary["total"] / med["total"] / machine_peak,
        "phase_mfu": {k: necessary[k] / med[k] / machine_peak for k in ("generation", "score", "update")},
        "phase_share": {k: med[k] / med["total"] for k in ("generation", "score", "update")},
        "matmul_probe": {
            "what": f"{probe_chain} dependent matmul(s) of {probe_n}x{probe_n} {args.dtype} arrays in one "
                    "jitted call (2·n³ FLOPs each), best of 5, on device 0, in this process before the timed "
                    "iterations and after each one",
            "tflops": [x / 1e12 for x in peaks],
        },
    }
    if lora_result is not None:
        result["lora"] = lora_result
    if profile is not None:
        result["op_profile"] = profile
    if args.peak_tflops:
        result["update_mfu_vs_vendor_peak"] = flops / med["update"] / (args.peak_tflops * 1e12 * devices)
    if parallel.is_main_process():
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

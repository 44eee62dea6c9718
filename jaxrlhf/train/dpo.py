"""``jaxrlhf dpo``: direct preference optimisation of a policy on {"prompt", "chosen", "rejected"} pairs
(chat messages and TRL's implicit-prompt form too), tied to a frozen reference.

    pairs → reference log-probs (once per pair before training, or each step) → DPO / cDPO / IPO / hinge
    step (``jaxrlhf.steps.dpo``) → log, evaluate, checkpoint → export the policy as a Hugging Face causal LM

The reference is ``reference.path`` or, by default, the policy's initial weights. With
``dpo.precompute_ref_logprobs`` (the default) its log-probs are computed in one pass over the train and eval
pairs at start-up and batched with them (``jaxrlhf.train.dpo_data`` says why they are recomputed rather than
stored), and the reference's weights are then freed; otherwise the reference runs on every batch
(``timing/reference``). Step metrics use TRL's names (``loss/dpo``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``); held-out ones are the same
under ``eval/`` (``eval/loss``, ``eval/rewards/accuracies``, …), on ``data.eval_file`` or, with
``dpo.eval_fraction``, on pairs held out of the train file. Checkpoints hold ``{"train": TrainState over
PolicyParams, "rng"}`` and the data iterator's position.

With ``lora.enabled`` the policy trains adapters on its frozen base, and by default the reference is that
base with the adapters off (the same arrays: no second copy); checkpoints hold only the adapters, and the
export is the merged model plus the adapters alone in PEFT's format (``export_adapter/``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.config import ConfigError
from jaxrlhf.data import Batch
from jaxrlhf.models.lora import LoRAConfig
from jaxrlhf.parallel import ParallelConfig
from jaxrlhf.steps import OptimizerConfig, PolicyParams, create_train_state, make_optimizer
from jaxrlhf.steps.dpo import DPO_METRICS, DPOConfig, make_dpo_eval, make_dpo_step, make_reference_logps
from jaxrlhf.steps.state import model_params
from jaxrlhf.train.data_setup import eval_batches, load_dataset, make_collate, train_iterator
from jaxrlhf.train.dpo_data import (
    drop_identical_pairs,
    hold_out,
    precompute_reference_logps,
    with_reference_logps,
)
from jaxrlhf.train.loop import LoopHooks, StepOutcome, training_loop
from jaxrlhf.train.lora_setup import export_adapters, lora_model, merged_lm
from jaxrlhf.train.model_setup import LoadedModel, check_length, export_model, flops_per_token, load_model
from jaxrlhf.train.reporting import host_scalars
from jaxrlhf.train.rl_setup import load_reference
from jaxrlhf.train.run import Run, RunResult, compile_step, total_steps
from jaxrlhf.train.run_config import (
    CheckpointSection,
    DataSection,
    LoggingSection,
    ModelSection,
    ReferenceSection,
    TrainSection,
    check_common,
    check_grad_accum,
)
from jaxrlhf.train.supervised import batch_tokens
from jaxrlhf.train.timing import mfu, throughput

log = logging.getLogger("jaxrlhf")

POSTFIX = ("loss/dpo", "rewards/accuracies", "rewards/margins", "lr")
EVAL_KEYS = ("loss/dpo", *DPO_METRICS)


@dataclasses.dataclass(frozen=True)
class DPORunConfig:
    """``jaxrlhf dpo`` (see configs/dpo.yaml)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    # TRL's DPO learning rate (1e-6) by default: DPO moves far from the reference at SFT-like rates.
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=1e-6))
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    reference: ReferenceSection = dataclasses.field(default_factory=ReferenceSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=lambda: LoggingSection(run_dir="runs/dpo"))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


class DPOData:
    """The pairs of a run: train (and held-out) examples and the collate their batches go through."""

    def __init__(self, train: list[Any], held_out: list[Any] | None, collate: Any):
        self.train, self.held_out, self.collate = train, held_out, collate


def load_pairs(cfg: DPORunConfig, tokenizer: Any) -> DPOData:
    """Train and held-out pairs (``data.eval_file``, else ``dpo.eval_fraction`` of the train file) with the
    identical-pair policy applied; errors name the file and line."""
    data, dpo = cfg.data, cfg.dpo

    def pairs(path: str) -> list[Any]:
        return drop_identical_pairs(load_dataset(path, "preference", tokenizer, data), path,
                                    dpo.identical_pairs)

    train = pairs(data.train_file)
    held_out = None
    if data.eval_file:
        held_out = pairs(data.eval_file)
        if dpo.eval_fraction:
            log.warning("dpo.eval_fraction=%g is ignored: data.eval_file is set", dpo.eval_fraction)
    elif dpo.eval_fraction:
        train, held_out = hold_out(train, dpo.eval_fraction, cfg.train.seed, data.train_file)
        log.info("eval: %d pairs held out of %s (dpo.eval_fraction=%g, never trained on); %d left to train",
                 len(held_out), data.train_file, dpo.eval_fraction, len(train))
    else:
        log.warning("no data.eval_file and dpo.eval_fraction=0: held-out preference accuracy is not measured")
    return DPOData(train, held_out, make_collate("preference", data, tokenizer))


def evaluate_dpo(evaluate: Callable[[Any, Batch], Any], params: Any, batches: Iterable[Batch]) -> dict:
    """Pair-weighted means of the eval metrics over all batches: ``eval/loss``, ``eval/rewards/…``,
    ``eval/logps/…``."""
    sums = dict.fromkeys(EVAL_KEYS, 0.0)
    pairs = 0.0
    for batch in batches:
        m = host_scalars(evaluate(params, batch))
        for k in EVAL_KEYS:
            sums[k] += m[k] * m["pairs"]
        pairs += m["pairs"]
    names = {k: "eval/loss" if k == "loss/dpo" else f"eval/{k}" for k in EVAL_KEYS}
    return {names[k]: v / max(pairs, 1.0) for k, v in sums.items()}


def dpo_hooks(
    run: Run,
    step_fn: Any,
    reference: Callable[[Batch], Batch] | None,
    flops: Callable[[int], float],
    evaluate: Callable[[Any], dict[str, float]] | None,
    eval_every: int,
) -> LoopHooks:
    """Each step: the batch on the mesh, the reference's log-probs when not cached (``timing/reference``),
    the jitted update (``timing/update``). ``perf/tokens_per_s`` and ``perf/mfu`` are the update's, over the
    real tokens of both responses' sequences."""
    report = run.report
    step_fn = report.watch("step", step_fn)

    def step(state: Any, batch: Batch, key: jax.Array) -> tuple[Any, StepOutcome]:
        device_batch = run.shard(batch)
        if reference is not None:
            with report.timers("reference") as t:
                device_batch = {**device_batch, **t.block(reference(device_batch))}
        with report.timers("update") as t:
            state, metrics = t.block(step_fn(state, device_batch, key))
        tokens, seq_len = batch_tokens(batch)
        return state, StepOutcome(host_scalars(metrics), {"tokens": tokens}, seq_len)

    def window_metrics(step_number: int, outcome: StepOutcome) -> dict[str, float]:
        seconds, tokens = report.timers.totals.get("update", 0.0), report.window.tallies["tokens"]
        perf = {"perf/tokens_per_s": throughput(tokens, seconds)}
        if reference is not None:
            reference_seconds = report.timers.totals.get("reference", 0.0)
            perf["perf/reference_tokens_per_s"] = throughput(tokens, reference_seconds)
        if report.peak_known:
            perf["perf/mfu"] = mfu(flops(outcome.seq_len), tokens, seconds, report.peak_flops)
        return perf

    return LoopHooks(step, window_metrics, evaluate=evaluate, eval_every=eval_every, postfix=POSTFIX)


def reference_model(cfg: DPORunConfig, run: Run, policy: LoadedModel, key: jax.Array) -> tuple[Any, Any]:
    """(model, LM params on the mesh) of the reference: ``reference.path`` or the policy's initial weights
    (shared with the policy when they are only read before training)."""
    precompute = cfg.dpo.precompute_ref_logprobs
    if cfg.reference.path is None and (precompute or cfg.lora.enabled):  # LoRA: the policy's frozen base
        return policy.model, run.place(policy.params, "reference params")
    model, params = load_reference(cfg.reference.path, policy, cfg.model.dtype, key)
    if cfg.reference.offload and not precompute:
        log.info("reference params kept in host memory (reference.offload)")
        return model, parallel.to_host(params.lm)  # numpy: copied to the devices by each call
    if cfg.reference.offload:
        log.info("reference.offload has no effect with dpo.precompute_ref_logprobs (the reference runs once)")
    return model, run.place(params.lm, "reference params")


def train_dpo(cfg: DPORunConfig) -> RunResult:
    """Run DPO end to end: load, cache the reference's log-probs, train, evaluate, export the policy."""
    check_common(cfg.model, cfg.data, cfg.checkpoint, cfg.logging, cfg.train)
    check_grad_accum("dpo.grad_accum_steps", cfg.dpo.grad_accum_steps, cfg.data)
    with Run("dpo", cfg, cfg.checkpoint, cfg.logging, cfg.train, cfg.model.dtype,
             parallel_cfg=cfg.parallel) as run:
        init_key, ref_key, rng = jax.random.split(jax.random.key(cfg.train.seed), 3)
        policy = load_model(cfg.model, init_key)
        lora = cfg.lora.enabled
        if lora and cfg.reference.offload and cfg.reference.path is None:
            raise ConfigError("reference.offload: with lora.enabled the reference is the policy's own base, "
                              "which stays on the devices")
        # LoRA: adapters trained on the frozen base, policy.params (the base) also the default reference.
        model, adapters, _ = lora_model(cfg.lora, policy.model, policy.params,
                                        jax.random.fold_in(init_key, 1))
        policy = policy._replace(model=model)
        check_length(policy.model.config, cfg.data.max_prompt_length + cfg.data.max_response_length)
        data = load_pairs(cfg, policy.tokenizer)
        run.check_batch_size("data.batch_size", cfg.data.batch_size)
        run.check_micro_batch("dpo.grad_accum_steps", cfg.data.batch_size // cfg.dpo.grad_accum_steps)
        eval_size = cfg.data.eval_batch_size or cfg.data.batch_size
        if data.held_out is not None:
            run.check_batch_size("data.eval_batch_size", eval_size)

        ref_model, ref_lm = reference_model(cfg, run, policy, ref_key)
        # LoRA's frozen base: the default reference's arrays on the mesh (one copy), else placed below.
        base = ref_lm if lora and cfg.reference.path is None else policy.params
        ref_jit = compile_step(make_reference_logps(ref_model), donate=False)
        reference: Callable[[Batch], Batch] | None = lambda batch: ref_jit(ref_lm, batch)
        collate = data.collate
        if cfg.dpo.precompute_ref_logprobs:
            data = cache_reference_logps(cfg, run, data, reference, eval_size)
            collate = with_reference_logps(data.collate)
            reference = ref_lm = None  # nothing reads the reference's weights again
        else:
            run.report.watch("reference", ref_jit)

        batches = train_iterator(data.train, cfg.data.batch_size, cfg.train.seed, collate, cfg.data.shuffle,
                                 cfg.data.train_file)
        total = total_steps(cfg.train, batches.batches_per_epoch)
        optimizer = make_optimizer(cfg.optimizer, total)
        if lora:
            state = run.place(create_train_state(PolicyParams(adapters), optimizer),
                              "policy adapters + optimiser state")
            if base is policy.params:  # a reference of its own: the base is not on the mesh yet
                base = run.place(base, "frozen base params")
            state = state._replace(frozen=PolicyParams(base))
        else:
            state = run.place(create_train_state(PolicyParams(policy.params), optimizer),
                              "policy params + optimiser state")
        step_fn = compile_step(make_dpo_step(policy.model, optimizer, cfg.dpo),
                               state_shardings=run.state_shardings(state))
        evaluate = None
        if data.held_out is not None:
            eval_jit = compile_step(make_dpo_eval(policy.model, cfg.dpo), donate=False)
            # Its own compiled reference: eval batches have their own size, which the watched training
            # reference would report as a recompilation.
            eval_ref_jit = compile_step(make_reference_logps(ref_model), donate=False)

            def evaluate_batch(params: Any, batch: Batch) -> Any:
                device_batch = run.shard(batch)
                if reference is not None:
                    device_batch = {**device_batch, **eval_ref_jit(ref_lm, device_batch)}
                return eval_jit(params, device_batch)

            held_out = data.held_out
            evaluate = lambda s: evaluate_dpo(
                evaluate_batch, model_params(s), eval_batches(held_out, eval_size, collate))
        hooks = dpo_hooks(run, step_fn, reference, flops_per_token(policy.model.config, training=True),
                          evaluate, cfg.train.eval_every)
        state, result = training_loop(run, state, rng, batches, total, hooks)
        if not result.stopped_early:
            frozen = None if state.frozen is None else state.frozen.lm
            lm = merged_lm(cfg.lora, policy.model, state.params.lm, frozen)
            export = export_model(os.path.join(run.run_dir, "export"), policy.model, lm, policy.tokenizer,
                                  source=cfg.model.path)
            if lora:
                export_adapters(run.run_dir, cfg.lora, policy.model, state.params.lm, cfg.model.path)
            result.export_dir = str(export)
        return result


def cache_reference_logps(cfg: DPORunConfig, run: Run, data: DPOData, reference: Callable[[Batch], Batch],
                          batch_size: int) -> DPOData:
    """``data`` with the reference's log-probs attached to every train and held-out pair (one pass)."""
    start = time.perf_counter()
    on_mesh = lambda batch: reference(run.shard(batch))
    train = precompute_reference_logps(on_mesh, data.train, batch_size, data.collate, cfg.data.train_file)
    held_out = None
    if data.held_out is not None:
        source = cfg.data.eval_file or f"{cfg.data.train_file} (held out)"
        held_out = precompute_reference_logps(on_mesh, data.held_out, batch_size, data.collate, source)
    pairs = len(train) + len(held_out or ())
    log.info("reference log-probs of %d pairs cached in %.1f s (recomputed at each start-up; mean %.3g "
             "chosen, %.3g rejected on the train pairs)", pairs, time.perf_counter() - start,
             float(np.mean([p.ref_chosen_logp for p in train])),
             float(np.mean([p.ref_rejected_logp for p in train])))
    return DPOData(train, held_out, data.collate)

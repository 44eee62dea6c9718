"""``jaxrlhf ilql``: offline value-based RL (Implicit Language Q-Learning) on rated responses
{"prompt", "response", "reward"} (the rating format; ``"rating"`` is read too), the reward given at the last
response token.

    rated responses → ILQL step (``jaxrlhf.steps.ilql``: Q heads over the vocabulary, V head, Polyak target Q
    heads; the backbone trained too unless ``ilql.freeze_backbone``) → log, evaluate, checkpoint → export

The learned heads act at decoding time: ``generate(..., guidance=value_guidance(target_q_heads, β))``
samples from π_base·exp(β·(Q − V)) (``jaxrlhf.rollout.guidance``). The export ``<run_dir>/export`` is the
backbone as a Hugging Face causal LM with the heads beside it in ``jaxrlhf_heads.safetensors`` under
``ilql.*`` (:func:`load_ilql_heads` reads them back). Metrics: loss/ilql, loss/q, loss/v, loss/cql, loss/bc,
q/mean, q/target, v/mean, td/target, td/error; held-out ones under ``eval/`` (``data.eval_file`` or
``data.eval_fraction``).
Checkpoints hold ``{"train": TrainState over ILQLParams, "rng"}`` and the data iterator's position.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import Batch, DataError
from jaxrlhf.models import hf_io
from jaxrlhf.parallel import ParallelConfig
from jaxrlhf.steps import OptimizerConfig, make_optimizer
from jaxrlhf.steps.ilql import (
    ILQL_METRICS,
    ILQLConfig,
    create_ilql_state,
    init_ilql_params,
    make_ilql_eval,
    make_ilql_step,
)
from jaxrlhf.steps.params import ILQLParams
from jaxrlhf.train.data_setup import eval_batches, make_collate, train_and_eval_sets, train_iterator
from jaxrlhf.train.loop import training_loop
from jaxrlhf.train.model_setup import check_length, export_model, flops_per_token, load_model
from jaxrlhf.train.reporting import host_scalars
from jaxrlhf.train.run import Run, RunResult, compile_step, total_steps
from jaxrlhf.train.run_config import (
    CheckpointSection,
    DataSection,
    LoggingSection,
    ModelSection,
    TrainSection,
    check_common,
    check_grad_accum,
)
from jaxrlhf.train.supervised import supervised_hooks

log = logging.getLogger("jaxrlhf")

POSTFIX = ("loss/ilql", "q/mean", "v/mean", "td/error")
HEADS_KEY = "ilql"


@dataclasses.dataclass(frozen=True)
class ILQLRunConfig:
    """``jaxrlhf ilql`` (see configs/ilql.yaml)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    ilql: ILQLConfig = dataclasses.field(default_factory=ILQLConfig)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=lambda: LoggingSection(run_dir="runs/ilql"))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)


def heads_dict(params: ILQLParams) -> dict[str, Any]:
    """ILQL's heads as an export stores them: ``{"ilql": {"q": {"0": …}, "v": …, "target_q": …}}``."""
    number = lambda heads: {str(i): h for i, h in enumerate(heads)}
    return {HEADS_KEY: {"q": number(params.q_heads), "v": params.v_head,
                        "target_q": number(params.target_q_heads)}}


def load_ilql_heads(path: str | os.PathLike) -> tuple[tuple[Any, ...], Any, tuple[Any, ...]]:
    """(online Q heads, V head, target Q heads) of a ``jaxrlhf ilql`` export; a DataError without them."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such directory (give a `jaxrlhf ilql` run's export/)")
    heads = hf_io.load_heads(path).get(HEADS_KEY)
    if not heads or not {"q", "v", "target_q"} <= set(heads):
        raise DataError(f"{path}: no ILQL heads (no '{HEADS_KEY}.q/v/target_q' in "
                        "jaxrlhf_heads.safetensors); is it a `jaxrlhf ilql` export?")
    ordered = lambda d: tuple(d[k] for k in sorted(d, key=int))
    return ordered(heads["q"]), heads["v"], ordered(heads["target_q"])


def check_ratings(examples: Iterable[Any], path: str) -> None:
    """Every example must have at least one response token (the reward sits on the last one)."""
    for e in examples:
        if len(e.response) == 0:
            raise DataError(f"{e.source}: empty response: ILQL puts the reward at the last response token, "
                            f"and this one has none (in {path})")


def evaluate_ilql(evaluate: Any, params: Any, batches: Iterable[Batch]) -> dict[str, float]:
    """Token-weighted means of the step's loss metrics over the held-out batches, under ``eval/``."""
    sums = dict.fromkeys(ILQL_METRICS, 0.0)
    tokens = 0.0
    for batch in batches:
        m = host_scalars(evaluate(params, batch))
        for k in ILQL_METRICS:
            sums[k] += m[k] * m["tokens"]
        tokens += m["tokens"]
    return {f"eval/{k}": v / max(tokens, 1.0) for k, v in sums.items()}


def train_ilql(cfg: ILQLRunConfig) -> RunResult:
    """Run ILQL end to end: load the backbone and the rated responses, train, evaluate, export."""
    check_common(cfg.model, cfg.data, cfg.checkpoint, cfg.logging, cfg.train)
    check_grad_accum("ilql.grad_accum_steps", cfg.ilql.grad_accum_steps, cfg.data)
    with Run("ilql", cfg, cfg.checkpoint, cfg.logging, cfg.train, cfg.model.dtype,
             parallel_cfg=cfg.parallel) as run:
        init_key, heads_key, rng = jax.random.split(jax.random.key(cfg.train.seed), 3)
        model, lm, tokenizer, _ = load_model(cfg.model, init_key)
        check_length(model.config, cfg.data.max_prompt_length + cfg.data.max_response_length)
        collate = make_collate("rating", cfg.data, tokenizer)
        train_set, eval_set = train_and_eval_sets("rating", tokenizer, cfg.data, cfg.train.seed)
        check_ratings(train_set, cfg.data.train_file)
        log.info("rewards of %s: mean %.4g, std %.4g, min %.4g, max %.4g", cfg.data.train_file,
                 *(f(np.array([e.rating for e in train_set])) for f in (np.mean, np.std, np.min, np.max)))
        run.check_batch_size("data.batch_size", cfg.data.batch_size)
        run.check_micro_batch("ilql.grad_accum_steps", cfg.data.batch_size // cfg.ilql.grad_accum_steps)
        batches = train_iterator(train_set, cfg.data.batch_size, cfg.train.seed, collate, cfg.data.shuffle,
                                 cfg.data.train_file)
        evaluate = None
        if eval_set is not None:
            check_ratings(eval_set, cfg.data.eval_file or cfg.data.train_file)
            size = cfg.data.eval_batch_size or cfg.data.batch_size
            run.check_batch_size("data.eval_batch_size", size)
            eval_jit = compile_step(make_ilql_eval(model, cfg.ilql), donate=False)
            on_mesh = lambda params, batch: eval_jit(params, run.shard(batch))
            evaluate = lambda s: evaluate_ilql(on_mesh, s.params, eval_batches(eval_set, size, collate))
        total = total_steps(cfg.train, batches.batches_per_epoch)
        optimizer = make_optimizer(cfg.optimizer, total)
        params = init_ilql_params(heads_key, model, lm, cfg.ilql)
        state = run.place(create_ilql_state(params, optimizer, cfg.ilql), "ILQL params + optimiser state")
        step_fn = compile_step(make_ilql_step(model, optimizer, cfg.ilql),
                               state_shardings=run.state_shardings(state))
        hooks = supervised_hooks(run, step_fn, flops_per_token(model.config, training=True), evaluate,
                                 cfg.train.eval_every, postfix=POSTFIX)
        state, result = training_loop(run, state, rng, batches, total, hooks)
        if not result.stopped_early:
            export = export_model(os.path.join(run.run_dir, "export"), model, state.params.lm, tokenizer,
                                  heads=heads_dict(state.params), score_head=None, source=cfg.model.path)
            result.export_dir = str(export)
        return result

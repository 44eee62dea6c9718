"""``jaxrlhf ppo`` / ``a2c`` / ``grpo`` / ``rloo``: RL fine-tuning of a policy against a reward model or a
reward function (or a verifiable reward: any oracle, e.g. ``reward.function: task:arithmetic``).

Each step of the training loop is one RL iteration (:func:`jaxrlhf.steps.rl_iteration.make_rl_iteration`),
its phases jitted by :func:`jaxrlhf.train.rl_setup.build_rl_phases` and timed (``timing/generation``,
``timing/score``, ``timing/update``, ``timing/step_total``)::

    prompts batch → generate → score: reward (reward model / jittable fn / host fn once per batch) +
    experience (log-probs, reference, values, KL-penalised rewards, GAE) → update (the KL controller is
    updated inside) → log, checkpoint

The critic-free commands (``grpo``, ``rloo``; REINFORCE++, ReMax, Dr. GRPO, DAPO and GSPO are configs of
them) run the same loop with ``group_size`` samples per prompt, group advantages and no critic or value head;
their metrics add TRL's ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``completions/*``, ``kl``,
``entropy`` and ``clip_ratio/*``.

Each iteration draws a fresh key from the run's key. Checkpoints hold ``{"rl": RLState, "rng": key}`` and
the prompt iterator's position, so a resumed run continues exactly. The reference policy (default: the
policy's initial weights) is rebuilt at start-up, never checkpointed. ``episode`` counts sequences trained
on (prompts × group size for the critic-free methods).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.config import ConfigError
from jaxrlhf.models.lora import LoRAConfig
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.parallel import ParallelConfig
from jaxrlhf.steps import (
    A2CConfig,
    ClippedEpochsConfig,
    GRPOConfig,
    OptimizerConfig,
    PGConfig,
    PolicyParams,
    PPOConfig,
    RLConfig,
    RLOOConfig,
    RLState,
    create_rl_state,
    kl_controller,
    make_optimizer,
)
from jaxrlhf.steps.experience import update_micro_batch_rows
from jaxrlhf.steps.rl_iteration import IterationOutput, RLPhases, make_rl_iteration
from jaxrlhf.train.checkpoint import CheckpointManager
from jaxrlhf.train.data_setup import load_dataset, make_collate, train_iterator
from jaxrlhf.train.loop import LoopHooks, StepOutcome, training_loop
from jaxrlhf.train.lora_setup import export_adapters, lora_model, merged_lm
from jaxrlhf.train.model_setup import LoadedModel, check_length, export_model, flops_per_token, load_model
from jaxrlhf.train.reporting import Reporting, host_scalars
from jaxrlhf.train.reward_functions import (
    RewardFunctions,
    TrainerState,
    check_prompt_columns,
    reward_metrics,
    take_columns,
)
from jaxrlhf.train.rl_setup import (
    build_rl_phases,
    load_critic,
    load_reference,
    make_score_fn,
    policy_with_value_head,
    sampling_settings,
)
from jaxrlhf.train.run import Run, RunResult, total_steps
from jaxrlhf.train.run_config import (
    CheckpointSection,
    CriticSection,
    DataSection,
    GenerationSection,
    LoggingSection,
    ModelSection,
    ReferenceSection,
    RewardSection,
    TrainSection,
    check_common,
    check_rl,
    critic_init_path,
)
from jaxrlhf.train.timing import mfu, throughput

log = logging.getLogger("jaxrlhf")

POSTFIX = ("objective/scores", "objective/kl", "policy/approxkl_avg", "lr")
RATIO_FIRST = "val/ratio_abs_dev_first_minibatch"  # mean |r − 1| on the first minibatch, before any update


@dataclasses.dataclass(frozen=True)
class PPORunConfig:
    """``jaxrlhf ppo`` (see configs/ppo.yaml)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    reference: ReferenceSection = dataclasses.field(default_factory=ReferenceSection)
    critic: CriticSection = dataclasses.field(default_factory=CriticSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=lambda: LoggingSection(run_dir="runs/ppo"))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


@dataclasses.dataclass(frozen=True)
class A2CRunConfig:
    """``jaxrlhf a2c`` (see configs/a2c.yaml)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    a2c: A2CConfig = dataclasses.field(default_factory=A2CConfig)
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    reference: ReferenceSection = dataclasses.field(default_factory=ReferenceSection)
    critic: CriticSection = dataclasses.field(default_factory=CriticSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=lambda: LoggingSection(run_dir="runs/a2c"))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


@dataclasses.dataclass(frozen=True)
class GRPORunConfig:
    """``jaxrlhf grpo`` (see configs/grpo.yaml; Dr. GRPO, DAPO, GSPO: configs/dr_grpo.yaml, dapo.yaml,
    gspo.yaml)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    reference: ReferenceSection = dataclasses.field(default_factory=ReferenceSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=lambda: LoggingSection(run_dir="runs/grpo"))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


@dataclasses.dataclass(frozen=True)
class RLOORunConfig:
    """``jaxrlhf rloo`` (see configs/rloo.yaml; REINFORCE++, ReMax: configs/reinforce_pp.yaml, remax.yaml)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    rloo: RLOOConfig = dataclasses.field(default_factory=RLOOConfig)
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    reference: ReferenceSection = dataclasses.field(default_factory=ReferenceSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=lambda: LoggingSection(run_dir="runs/rloo"))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


RLRunConfig = PPORunConfig | A2CRunConfig | GRPORunConfig | RLOORunConfig
# The command of each run config, which is also the name of its algorithm section.
COMMAND_OF = {PPORunConfig: "ppo", A2CRunConfig: "a2c", GRPORunConfig: "grpo", RLOORunConfig: "rloo"}


class RLSetup(NamedTuple):
    """An RL run's jitted phases and what they need besides the state."""

    phases: RLPhases
    ref_params: PolicyParams
    state: RLState  # the initial state, placed on the mesh
    critic_model: LanguageModel | None
    update_flops: Callable[[int], float]  # seq_len -> training FLOPs per token of all the update trains
    passes: int  # passes of the update over each token (epochs)
    sequences: int  # sequences trained on per iteration: prompts × group size (a ReMax rollout has more)
    updates: int = 0  # optimiser updates of the whole run (the schedule's length): TRL's max_steps


def _iteration_rows(cfg: RLRunConfig, algo: RLConfig) -> tuple[int, int]:
    """(sequences trained on per iteration, minibatches they split into)."""
    rows = cfg.data.batch_size * (algo.group_size if isinstance(algo, PGConfig) else 1)
    return rows, algo.num_minibatches if isinstance(algo, ClippedEpochsConfig) else 1


def check_minibatch_split(cfg: RLRunConfig, algo: RLConfig) -> None:
    """The sequences of an iteration (prompts × group size) split into minibatches × micro-batches of equal
    size: a ConfigError naming the key otherwise, before anything is loaded."""
    key = COMMAND_OF[type(cfg)]
    rows, minibatches = _iteration_rows(cfg, algo)
    if rows % minibatches or (rows // minibatches) % algo.grad_accum_steps:
        size = "data.batch_size" + (f" × {key}.group_size" if isinstance(algo, PGConfig) else "")
        # Blame the key that does not divide (a2c has no num_minibatches: one minibatch).
        blamed = "num_minibatches" if rows % minibatches else "grad_accum_steps"
        parts = (f"{minibatches} minibatches ({key}.num_minibatches) × " if isinstance(
            algo, ClippedEpochsConfig) else "")
        raise ConfigError(f"{key}.{blamed}: {size} = {rows} sequences per iteration do not split into "
                          f"{parts}{algo.grad_accum_steps} micro-batches ({key}.grad_accum_steps) of equal "
                          "size")


def build_rl(cfg: RLRunConfig, run: Run, policy: LoadedModel, critic_key: jax.Array, total: int) -> RLSetup:
    """Reference, critic, reward, optimisers, the initial state (placed) and the jitted phases."""
    algo = rl_algorithm(cfg)
    epochs = isinstance(algo, ClippedEpochsConfig)
    dtype, model, tokenizer = cfg.model.dtype, policy.model, policy.tokenizer
    generation = sampling_settings(cfg.generation, algo.temperature, tokenizer, model.config)
    check_length(
        model.config,
        cfg.data.max_prompt_length + generation.max_new_tokens,
        "data.max_prompt_length + generation.max_new_tokens",
    )
    lora, base = cfg.lora.enabled, None
    if lora:  # the policy trains adapters on its frozen base; by default the base is also the reference
        if cfg.reference.offload:
            raise ConfigError("reference.offload: with lora.enabled the reference is the policy's own base, "
                              "which stays on the devices")
        model, adapters, base = lora_model(cfg.lora, model, policy.params, jax.random.fold_in(critic_key, 1))
        policy = policy._replace(model=model)
    if lora and cfg.reference.path is None:
        ref_model, ref_params = model, PolicyParams(base)  # the base with the adapters off: no copy
    else:
        ref_model, ref_params = load_reference(cfg.reference.path, policy, dtype, critic_key)
    critic_free = isinstance(algo, PGConfig)
    separate = not critic_free and algo.critic == "separate"  # critic-free: no critic, no value head
    policy_params = policy_with_value_head(policy, not critic_free and not separate)
    if lora:
        policy_params = policy_params._replace(lm=adapters)
    critic_model, critic_params = (None, None)
    if separate:  # initialised from critic.path, by default the reward model if there is one
        critic_model, critic_params = load_critic(critic_init_path(cfg.critic, cfg.reward), policy, dtype,
                                                  critic_key)
    score = make_score_fn(cfg.reward, tokenizer, dtype, run.place, run.mesh, model.config.vocab_size)
    if isinstance(score, RewardFunctions):  # which rollout rows the prompt columns go with
        score.greedy_baseline = bool(critic_free and algo.greedy_baseline)
    run.check_batch_size("data.batch_size", cfg.data.batch_size)
    run.check_micro_batch(f"{COMMAND_OF[type(cfg)]}.grad_accum_steps",
                          update_micro_batch_rows(algo, _iteration_rows(cfg, algo)[0]))
    if cfg.reward.micro_batch_size is not None:
        run.check_micro_batch("reward.micro_batch_size", cfg.reward.micro_batch_size)
    if cfg.reference.offload:
        ref_params = parallel.to_host(ref_params)  # numpy: copied to the devices by each experience call
        log.info("reference params kept in host memory (reference.offload)")
    else:
        ref_params = run.place(ref_params, "reference params")

    updates = total * (algo.epochs * algo.num_minibatches if epochs else 1)  # the schedule's length
    optimizer = make_optimizer(cfg.optimizer, updates)
    critic_optimizer = make_optimizer(cfg.optimizer, updates) if separate else None
    kl_state = kl_controller(algo).init()
    state = create_rl_state(policy_params, optimizer, kl_state, critic_params, critic_optimizer,
                            policy_frozen=None if base is None else PolicyParams(base))
    state = run.place(state, "policy (+ critic) params + optimiser state")
    if lora and cfg.reference.path is None:
        state = state._replace(policy=state.policy._replace(frozen=ref_params))  # one copy of the base
    phases = build_rl_phases(model, ref_model, critic_model, algo, generation, score, optimizer,
                             critic_optimizer, run.state_shardings(state), run.report.watch)
    policy_flops = flops_per_token(model.config, training=True)
    critic_flops = flops_per_token(critic_model.config, training=True, lm_head=False) if separate else None
    return RLSetup(
        phases,
        ref_params,
        state,
        critic_model,
        update_flops=lambda n: policy_flops(n) + (critic_flops(n) if critic_flops is not None else 0.0),
        passes=algo.epochs if epochs else 1,
        sequences=cfg.data.batch_size * (algo.group_size if critic_free else 1),
        updates=updates,
    )


def rl_algorithm(cfg: RLRunConfig) -> RLConfig:
    """The algorithm section of an RL run config (``ppo``, ``a2c``, ``grpo`` or ``rloo``)."""
    return getattr(cfg, COMMAND_OF[type(cfg)])


def rl_hooks(cfg: RLRunConfig, run: Run, setup: RLSetup, tokenizer: Any) -> LoopHooks:
    """The loop hooks of an RL run: each step is one timed iteration."""
    report = run.report
    iteration = make_rl_iteration(setup.phases, setup.ref_params, around=report.timers)
    last: list[IterationOutput] = []  # the latest rollout and scores, for the sample text

    def step(state: RLState, batch: dict, key: jax.Array) -> tuple[RLState, StepOutcome]:
        batch = take_columns(setup.phases.score, batch)  # host columns for reward functions (TRL's form)
        if isinstance(setup.phases.score, RewardFunctions):  # TRL's trainer_state: optimiser updates so far
            setup.phases.score.trainer_state = TrainerState(int(state.policy.step), setup.updates)
        state, out = iteration(state, run.shard(batch), key)
        last[:] = [out]
        # Reduced on the devices: a multi-host rollout has rows no single process holds.
        tallies = {"tokens": float(jnp.sum(out.rollout.sequence_mask)),
                   "response_tokens": float(jnp.sum(out.rollout.response_mask)),
                   # ReMax's greedy baseline rows are generated but not trained on
                   "trained_tokens": float(jnp.sum(out.rollout.sequence_mask[:setup.sequences]))}
        metrics = {**host_scalars(out.metrics), **reward_metrics(setup.phases.score)}
        return state, StepOutcome(metrics, tallies, int(out.rollout.sequences.shape[1]))

    def window_metrics(step_number: int, outcome: StepOutcome) -> dict[str, float]:
        record = rl_perf(report, outcome.seq_len, setup.update_flops, setup.passes)
        record["episode"] = step_number * setup.sequences
        return record

    def after_step(step_number: int, state: RLState, outcome: StepOutcome) -> None:
        ratio = outcome.metrics.get(RATIO_FIRST, 0.0)
        if step_number == 1 and ratio > 1e-3:
            log.warning("first update: mean |ratio - 1| = %.3g on the first minibatch (sampling and "
                        "training log-probs differ)", ratio)
        if cfg.logging.sample_every and step_number % cfg.logging.sample_every == 0:
            out = last[0]
            score = float(parallel.to_host(out.scores[0]))
            report.log_text("samples", sample_text(tokenizer, out.rollout, score), step_number)

    return LoopHooks(step, window_metrics, after_step, postfix=POSTFIX)


def train_rl(cfg: RLRunConfig) -> RunResult:
    """``jaxrlhf ppo`` / ``a2c`` / ``grpo`` / ``rloo``: the method end to end (by the config's type); returns
    where the run and its export are."""
    command = COMMAND_OF[type(cfg)]
    check_common(cfg.model, cfg.data, cfg.checkpoint, cfg.logging, cfg.train)
    check_rl(cfg.reward)
    check_minibatch_split(cfg, rl_algorithm(cfg))
    with Run(
        command,
        cfg,
        cfg.checkpoint,
        cfg.logging,
        cfg.train,
        cfg.model.dtype,
        state_key="rl",
        parallel_cfg=cfg.parallel,
    ) as run:
        init_key, critic_key, rng = jax.random.split(jax.random.key(cfg.train.seed), 3)
        policy = load_model(cfg.model, init_key)
        tokenizer = policy.tokenizer
        prompts = load_dataset(cfg.data.train_file, "prompt", tokenizer, cfg.data)
        check_prompt_columns(cfg.reward, tokenizer, prompts)
        batches = train_iterator(
            prompts,
            cfg.data.batch_size,
            cfg.train.seed,
            make_collate("prompt", cfg.data, tokenizer, columns=True),
            cfg.data.shuffle,
            cfg.data.train_file,
        )
        total = total_steps(cfg.train, batches.batches_per_epoch)
        setup = build_rl(cfg, run, policy, critic_key, total)
        hooks = rl_hooks(cfg, run, setup, tokenizer)
        state, result = training_loop(run, setup.state, rng, batches, total, hooks)
        if not result.stopped_early:
            result.export_dir = str(export_policy(run.run_dir, policy, state, setup.critic_model, cfg.lora,
                                                  cfg.model.path))
        return result


def export_policy(run_dir: str, policy: LoadedModel, state: RLState, critic_model: Any,
                  lora: LoRAConfig | None = None, base_path: str | None = None) -> Any:
    """``<run_dir>/export``: the policy LM (+ its shared value head), with LoRA adapters merged (and alone,
    in PEFT's format, in ``<run_dir>/export_adapter``); a separate critic goes to
    ``<run_dir>/export_critic``."""
    params = state.policy.params
    heads = None if params.value_head is None else {"value_head": params.value_head}
    frozen = None if state.policy.frozen is None else state.policy.frozen.lm
    lm = merged_lm(lora or LoRAConfig(), policy.model, params.lm, frozen)
    export = export_model(os.path.join(run_dir, "export"), policy.model, lm, policy.tokenizer, heads=heads,
                          source=base_path)
    if frozen is not None and lora is not None:
        export_adapters(run_dir, lora, policy.model, params.lm, base_path)
    if state.critic is not None:
        export_model(
            os.path.join(run_dir, "export_critic"),
            critic_model,
            state.critic.params.lm,
            policy.tokenizer,
            heads={"value_head": state.critic.params.value_head},
            score_head="value_head",  # a *ForSequenceClassification checkpoint, as a reward model's
        )
    return export


def rl_perf(report: Reporting, seq_len: int, update_flops: Callable[[int], float],
            passes: int) -> dict[str, float]:
    """Throughput of the logging window's phases (real tokens: prompt + response), and the update's MFU."""
    tallies = report.window.tallies
    tokens, response = tallies["tokens"], tallies["response_tokens"]
    totals = {k: report.timers.totals.get(k, 0.0) for k in ("generation", "score", "update", "step_total")}
    trained = tallies.get("trained_tokens", tokens) * passes
    perf = {
        "perf/tokens_per_s": throughput(tokens, totals["step_total"]),
        "perf/generation_tokens_per_s": throughput(response, totals["generation"]),
        "perf/score_tokens_per_s": throughput(tokens, totals["score"]),
        "perf/update_tokens_per_s": throughput(trained, totals["update"]),
    }
    if report.peak_known:
        perf["perf/mfu"] = mfu(update_flops(seq_len), trained, totals["update"], report.peak_flops)
    return perf


def sample_text(tokenizer: Any, rollout: Any, score: float) -> str:
    """The first row of a rollout as ``prompt / response / score`` text (for ``text.jsonl``)."""
    p = rollout.sequences.shape[1] - rollout.response_mask.shape[1]
    seq, mask = parallel.to_host((rollout.sequences[0], rollout.sequence_mask[0]))  # row 0 on every process
    prompt = tokenizer.decode(seq[:p][mask[:p] > 0])
    response = tokenizer.decode(seq[p:][mask[p:] > 0])
    return f"prompt: {prompt!r}\nresponse: {response!r}\nscore: {score:.4g}"


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """The committed checkpoint steps of an RL run, ascending."""
    return CheckpointManager(Path(run_dir) / "checkpoints", max_to_keep=None, async_save=False).all_steps()


def policy_lm_params(run_dir: str | os.PathLike, step: int, model: LanguageModel,
                     location: tuple[str, ...] = ("rl", "policy", "params", "lm")) -> Any:
    """The policy's LM params at ``step`` of an RL run's checkpoints (as :func:`train_rl` writes them:
    ``{"rl": RLState, "rng"}``), e.g. to evaluate a policy along training. ``location``: the keys of the LM
    params inside the checkpoint (a DPO run's: ``("train", "params", "lm")``).

    Restored without a target (which would need the optimiser's state layout) and rebuilt in the model's
    params structure by path; a missing leaf or a wrong shape is an error naming both.
    """
    manager = CheckpointManager(Path(run_dir) / "checkpoints", max_to_keep=None, async_save=False)
    state, _ = manager.restore(step)
    manager.close()
    try:
        saved = state
        for key in location:
            saved = saved[key]
    except (KeyError, TypeError) as e:
        where = ".".join(location)
        raise ValueError(f"{run_dir}/checkpoints step {step}: no policy params at {where}") from e

    def leaf(path: tuple, abstract: jax.ShapeDtypeStruct) -> jax.Array:
        node = saved
        for k in path:
            name = str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
            if not isinstance(node, dict) or name not in node:
                raise ValueError(f"{run_dir}/checkpoints step {step}: no leaf {jax.tree_util.keystr(path)}")
            node = node[name]
        if tuple(np.shape(node)) != tuple(abstract.shape):
            raise ValueError(f"{run_dir}/checkpoints step {step}: {jax.tree_util.keystr(path)} has shape "
                             f"{np.shape(node)}, the model expects {abstract.shape}")
        return jnp.asarray(node, abstract.dtype)

    return jax.tree_util.tree_map_with_path(leaf, model.abstract_params())

"""``jaxrlhf ppo`` / ``jaxrlhf a2c``: RL fine-tuning of a policy against a reward model or reward function.

One iteration, each phase timed (``timing/generation``, ``timing/score``, ``timing/update``,
``timing/step_total``)::

    prompts batch → generate (jitted) → score: reward (reward model jitted / jittable fn / host fn once per
    batch) + experience (log-probs, reference, values, KL-penalised rewards, GAE; jitted) → update (jitted;
    the KL controller is updated inside) → log, checkpoint

Each iteration splits fresh generation and update keys from the run's key. Checkpoints hold
``{"rl": RLState, "rng": key}`` and the prompt iterator's position, so a resumed run continues exactly. The
reference policy (default: the policy's initial weights) is rebuilt at start-up, never checkpointed.
``episode`` counts sequences.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.config import ConfigError
from jaxrlhf.models.heads import init_value_head
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.parallel import ParallelConfig
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.steps import (
    A2CConfig,
    OptimizerConfig,
    PPOConfig,
    RewardModelScorer,
    RLState,
    create_rl_state,
    get_reward_fn,
    kl_controller,
    make_a2c_update,
    make_experience_fn,
    make_optimizer,
    make_ppo_update,
)
from jaxrlhf.train.checkpoint import CheckpointManager
from jaxrlhf.train.common import Run, RunResult, compile_step, to_host, total_steps
from jaxrlhf.train.data_setup import load_dataset, make_collate, train_iterator
from jaxrlhf.train.model_setup import (
    LoadedModel,
    check_length,
    export_model,
    flops_per_token,
    load_model,
    load_reward_model,
)
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
)
from jaxrlhf.train.timing import mfu, throughput

log = logging.getLogger("jaxrlhf")

POSTFIX = ("objective/scores", "objective/kl", "policy/approxkl_avg", "lr")


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


def _same_vocabulary(policy_tokenizer: Any, other: Any, key: str) -> None:
    if other is not None and other.get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(f"{key}: its tokenizer differs from the policy's (the models must share token ids)")


def _copy(tree: Any) -> Any:
    """Fresh buffers: the policy's are donated to the update, a reference or critic must not alias them."""
    return jax.tree.map(jnp.copy, tree)


def generation_config(gen: GenerationSection, temperature: float, tokenizer: Any) -> GenerationConfig:
    """Sampling settings; stop at the tokenizer's eos unless ``generation.stop_token_ids`` says otherwise."""
    if gen.temperature is not None and gen.temperature != temperature:
        raise ConfigError(
            f"generation.temperature: {gen.temperature} differs from the algorithm's temperature "
            f"{temperature} (sampling and every log-prob must use the same one; set the algorithm's)"
        )
    stop = gen.stop_token_ids if gen.stop_token_ids is not None else (tokenizer.eos_token_id,)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        return GenerationConfig(
            max_new_tokens=gen.max_new_tokens,
            min_new_tokens=gen.min_new_tokens,
            temperature=temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            stop_token_ids=tuple(int(s) for s in stop if s is not None),
            pad_token_id=int(pad),
        )
    except ValueError as e:
        raise ConfigError(f"generation: {e}") from None


def make_scorer(
    reward: RewardSection,
    policy_tokenizer: Any,
    dtype: str,
    place: Any = lambda t, name: t,
    mesh: Any = None,
) -> Any:
    """``score(rollout) -> [B]``: the jitted reward model or jittable function, or a host function (given
    ``mesh``, on each process's own rows of a multi-host rollout)."""
    if reward.model_path is not None:
        rm, norm = load_reward_model(reward.model_path, dtype)
        _same_vocabulary(policy_tokenizer, rm.tokenizer, "reward.model_path")
        if norm is None and reward.normalize:
            log.warning("%s has no reward normalisation; using raw rewards", reward.model_path)
        scorer = RewardModelScorer(rm.model, norm if reward.normalize else None, reward.micro_batch_size)
        score = compile_step(lambda params, rollout: scorer(params, rollout), donate=False)
        rm_params = place(rm.params, "reward model params")
        return lambda rollout: score(rm_params, rollout)
    assert reward.function is not None
    try:
        fn = get_reward_fn(reward.function)
    except ValueError as e:
        raise ConfigError(f"reward.function: {e}") from None
    if fn.jittable:
        return compile_step(fn.score_rollout, donate=False)
    if mesh is not None:  # each process scores the rows it holds; the scores form one global array
        return lambda r: parallel.shard_batch(mesh, fn.score_rollout(parallel.process_rows(mesh, r)))
    return lambda rollout: jnp.asarray(fn.score_rollout(rollout))


def _critic(cfg: Any, policy: LoadedModel, dtype: str, key: jax.Array) -> tuple[Any, Any]:
    """A separate critic's (model, {"lm", "value_head"}): from ``critic.path`` (its reward or value head
    initialising the value head) or the policy's initial weights with a zero value head."""
    if cfg.critic.path is None:
        model, lm, heads = policy.model, _copy(policy.params), policy.heads
    else:
        critic = load_model(ModelSection(path=cfg.critic.path, dtype=dtype), key, what="critic.path")
        _same_vocabulary(policy.tokenizer, critic.tokenizer, "critic.path")
        model, lm, heads = critic.model, critic.params, critic.heads
    head = heads.get("value_head") or heads.get("reward_head") or init_value_head(model.config.hidden_size)
    return model, {"lm": lm, "value_head": jax.tree.map(jnp.asarray, head)}


class RLSetup(NamedTuple):
    """Everything an RL iteration needs besides the state: the jitted phases and the frozen inputs."""

    generate: Any  # (policy lm params, prompt tokens, prompt mask, key) -> Rollout
    score: Any  # rollout -> scores [B]
    experience: Any  # (policy params, ref params, critic params, rollout, scores, kl_coef) -> (Experience, m)
    update: Any  # (RLState, Experience, key) -> (RLState, metrics)
    ref_params: Any
    update_flops: Any  # seq_len -> training FLOPs per token of everything the update trains
    passes: int  # passes of the update over each token (PPO epochs)


def build_rl(
    cfg: PPORunConfig | A2CRunConfig, run: Run, policy: LoadedModel, critic_key: jax.Array, total: int
) -> tuple[RLSetup, RLState, LanguageModel | None]:
    """Reference, critic, reward, optimisers, the initial state and the jitted phases."""
    is_ppo = isinstance(cfg, PPORunConfig)
    algo: Any = cfg.ppo if is_ppo else cfg.a2c
    dtype, model, tokenizer = cfg.model.dtype, policy.model, policy.tokenizer
    gen_cfg = generation_config(cfg.generation, algo.temperature, tokenizer)
    check_length(
        model.config,
        cfg.data.max_prompt_length + gen_cfg.max_new_tokens,
        "data.max_prompt_length + generation.max_new_tokens",
    )
    if cfg.reference.path is None:
        ref_model, ref_params = model, _copy(policy.params)
    else:
        ref = load_model(ModelSection(path=cfg.reference.path, dtype=dtype), critic_key, "reference.path")
        _same_vocabulary(tokenizer, ref.tokenizer, "reference.path")
        ref_model, ref_params = ref.model, ref.params
    shared = algo.critic == "shared"
    critic_model = critic_params = None
    if shared:
        head = policy.heads.get("value_head") or init_value_head(model.config.hidden_size)
        policy_params = {"lm": policy.params, "value_head": jax.tree.map(jnp.asarray, head)}
    else:
        policy_params = {"lm": policy.params}
        critic_model, critic_params = _critic(cfg, policy, dtype, critic_key)
    score = make_scorer(cfg.reward, tokenizer, dtype, run.place, run.mesh)
    run.check_batch_size("data.batch_size", cfg.data.batch_size)
    if cfg.reference.offload:
        ref_params = parallel.to_host(ref_params)  # numpy: copied to the devices by each experience call
        log.info("reference params kept in host memory (reference.offload)")
    else:
        ref_params = run.place(ref_params, "reference params")

    updates = total * (algo.epochs * algo.num_minibatches if is_ppo else 1)  # the schedule's length
    optimizer = make_optimizer(cfg.optimizer, updates)
    critic_optimizer = None if shared else make_optimizer(cfg.optimizer, updates)
    state = run.place(
        create_rl_state(
            policy_params, optimizer, kl_controller(algo).init(), critic_params, critic_optimizer
        ),
        "policy (+ critic) params + optimiser state",
    )

    sample = lambda params, tokens, mask, key: generate(model, params, tokens, mask, key, gen_cfg)
    make_update = make_ppo_update if is_ppo else make_a2c_update
    policy_flops = flops_per_token(model.config, training=True)
    critic_flops = None if shared else flops_per_token(critic_model.config, training=True, lm_head=False)
    setup = RLSetup(
        generate=run.watch("generate", compile_step(sample, donate=False)),
        score=score,
        experience=run.watch(
            "experience", compile_step(make_experience_fn(model, ref_model, critic_model, algo), donate=False)
        ),
        update=run.watch(
            "update",
            compile_step(
                make_update(model, critic_model, algo, optimizer, critic_optimizer),
                state_shardings=run.state_shardings(state),
            ),
        ),
        ref_params=ref_params,
        update_flops=lambda n: policy_flops(n) + (critic_flops(n) if critic_flops is not None else 0.0),
        passes=algo.epochs if is_ppo else 1,
    )
    return setup, state, critic_model


def rl_iteration(run: Run, setup: RLSetup, state: RLState, batch: dict, rng: jax.Array) -> tuple:
    """One timed iteration: generate → score (reward + experience) → update. Returns (state, rng, rollout,
    scores, host metrics)."""
    rng, gen_key, update_key = jax.random.split(rng, 3)
    with run.timers("generation") as t:
        rollout = t.block(setup.generate(state.policy.params["lm"], batch["tokens"], batch["mask"], gen_key))
    with run.timers("score") as t:
        scores = setup.score(rollout)
        critic_params = None if state.critic is None else state.critic.params
        experience, exp_metrics = t.block(
            setup.experience(
                state.policy.params, setup.ref_params, critic_params, rollout, scores, state.kl.kl_coef
            )
        )
    with run.timers("update") as t:
        state, update_metrics = t.block(setup.update(state, experience, update_key))
    host = to_host({**update_metrics, **exp_metrics})  # the β used for the rewards wins
    return state, rng, rollout, scores, host


def train_rl(cfg: PPORunConfig | A2CRunConfig) -> RunResult:
    """Run PPO or A2C end to end (by the config's type); returns where the run and its export are."""
    command = "ppo" if isinstance(cfg, PPORunConfig) else "a2c"
    check_common(cfg.model, cfg.data, cfg.checkpoint, cfg.logging, cfg.train)
    check_rl(cfg.reward)
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
        batches = train_iterator(
            prompts,
            cfg.data.batch_size,
            cfg.train.seed,
            make_collate("prompt", cfg.data, tokenizer),
            cfg.data.shuffle,
            cfg.data.train_file,
        )
        total = total_steps(cfg.train, batches.batches_per_epoch)
        setup, state, critic_model = build_rl(cfg, run, policy, critic_key, total)

        state, rng, step = run.resume_loop(state, rng, batches)
        run.start_progress(total, step)
        stopped = False
        while step < total and not stopped:
            with run.timers("step_total"):
                with run.timers("data"):
                    batch = run.shard(next(batches))
                state, rng, rollout, scores, host = rl_iteration(run, setup, state, batch, rng)
                step += 1
                # Reduced on the devices: a multi-host rollout has rows no single process holds.
                tokens = float(jnp.sum(rollout.sequence_mask))
                response_tokens = float(jnp.sum(rollout.response_mask))
            skips = host.pop("train/nonfinite_skips", 0.0)  # per iteration; the tracker logs the total
            if step == 1 and host.get("val/ratio_first_minibatch", 0.0) > 1e-3:
                log.warning(
                    "first update: ratio off by %.3g from 1 (sampling and training log-probs differ)",
                    host["val/ratio_first_minibatch"],
                )
            run.after_step(step, host, finite=skips == 0)
            run.window.tally(tokens=tokens, response_tokens=response_tokens)
            if run.should_log(step, total):
                record = _perf(run, int(rollout.sequences.shape[1]), setup.update_flops, setup.passes)
                record["episode"] = step * cfg.data.batch_size
                run.flush_window(step, record, POSTFIX)
            if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                text = _sample_text(tokenizer, rollout, float(parallel.to_host(scores[0])))
                run.metrics.log_text("samples", text, step)
            stopped = run.end_step(step, total, state, rng, batches)

        result = RunResult(run.run_dir, step, None, dict(run.last_logged), stopped_early=stopped)
        if not stopped:
            result.export_dir = str(export_policy(run.run_dir, policy, state, critic_model))
        return result


def export_policy(run_dir: str, policy: LoadedModel, state: RLState, critic_model: Any) -> Any:
    """``<run_dir>/export``: the policy LM (+ its shared value head); a separate critic goes to
    ``<run_dir>/export_critic``."""
    params = state.policy.params
    heads = {"value_head": params["value_head"]} if "value_head" in params else None
    export = export_model(
        os.path.join(run_dir, "export"), policy.model, params["lm"], policy.tokenizer, heads=heads
    )
    if state.critic is not None:
        export_model(
            os.path.join(run_dir, "export_critic"),
            critic_model,
            state.critic.params["lm"],
            policy.tokenizer,
            heads={"value_head": state.critic.params["value_head"]},
        )
    return export


def _perf(run: Run, seq_len: int, update_flops: Any, passes: int) -> dict[str, float]:
    """Throughput of the logging window's phases (real tokens: prompt + response), and the update's MFU."""
    tokens, response = run.window.tallies["tokens"], run.window.tallies["response_tokens"]
    totals = {k: run.timers.totals.get(k, 0.0) for k in ("generation", "score", "update", "step_total")}
    trained = tokens * passes
    flops = update_flops(seq_len)
    perf = {
        "perf/tokens_per_s": throughput(tokens, totals["step_total"]),
        "perf/generation_tokens_per_s": throughput(response, totals["generation"]),
        "perf/score_tokens_per_s": throughput(tokens, totals["score"]),
        "perf/update_tokens_per_s": throughput(trained, totals["update"]),
    }
    if run.peak_known:
        perf["perf/mfu"] = mfu(flops, trained, totals["update"], run.peak_flops)
    return perf


def _sample_text(tokenizer: Any, rollout: Any, score: float) -> str:
    p = rollout.sequences.shape[1] - rollout.response_mask.shape[1]
    seq, mask = parallel.to_host((rollout.sequences[0], rollout.sequence_mask[0]))  # row 0 on every process
    prompt = tokenizer.decode(seq[:p][mask[:p] > 0])
    response = tokenizer.decode(seq[p:][mask[p:] > 0])
    return f"prompt: {prompt!r}\nresponse: {response!r}\nscore: {score:.4g}"


def train_ppo(cfg: PPORunConfig) -> RunResult:
    """``jaxrlhf ppo``."""
    return train_rl(cfg)


def train_a2c(cfg: A2CRunConfig) -> RunResult:
    """``jaxrlhf a2c``."""
    return train_rl(cfg)


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """The committed checkpoint steps of an RL run, ascending."""
    return CheckpointManager(Path(run_dir) / "checkpoints", max_to_keep=None, async_save=False).all_steps()


def policy_lm_params(run_dir: str | os.PathLike, step: int, model: LanguageModel) -> Any:
    """The policy's LM params at ``step`` of an RL run's checkpoints (as :func:`train_rl` writes them:
    ``{"rl": RLState, "rng"}``), e.g. to evaluate a policy along training.

    Restored without a target (which would need the optimiser's state layout) and rebuilt in the model's
    params structure by path; a missing leaf or a wrong shape is an error naming both.
    """
    manager = CheckpointManager(Path(run_dir) / "checkpoints", max_to_keep=None, async_save=False)
    state, _ = manager.restore(step)
    manager.close()
    try:
        saved = state["rl"]["policy"]["params"]["lm"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{run_dir}/checkpoints step {step}: no policy params at rl.policy.params.lm") from e

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

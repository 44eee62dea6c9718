"""The demo's building blocks: its data files, the trainer configs of each stage, and policies read back
from what the trainers wrote (Hugging Face exports, RL checkpoints).

Every stage hands the ordinary trainer ordinary JSONL files, so the same commands run on a user's own data:
``<run>/configs/<stage>.yaml`` is the stage's trainer config, loadable by ``jaxrlhf <stage> --config``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxrlhf.config import ConfigError, to_dict
from jaxrlhf.data import (
    LengthBuckets,
    PromptExample,
    TokenizeConfig,
    encode_prompt,
    pad_token_id,
    prompt_batch,
)
from jaxrlhf.experiments.demo_config import DemoConfig, TaskSection
from jaxrlhf.experiments.pipeline_data import configured_task
from jaxrlhf.experiments.policy_scoring import sample_rollouts
from jaxrlhf.models.transformer import LanguageModel, Params
from jaxrlhf.oracle import Oracle, Task, decode_batch, get_reward, rollout_reward_inputs
from jaxrlhf.rollout.generate import GenerationConfig
from jaxrlhf.train.dpo import DPORunConfig
from jaxrlhf.train.reward import RewardRunConfig
from jaxrlhf.train.rl import A2CRunConfig, GRPORunConfig, PPORunConfig, RLOORunConfig
from jaxrlhf.train.run_config import (
    CheckpointSection,
    DataSection,
    GenerationSection,
    LoggingSection,
    ModelSection,
    RewardSection,
    TrainSection,
)
from jaxrlhf.train.sft import SFTRunConfig

FEEDBACK_FILES = {"preference": "preferences", "ranking": "rankings", "rating": "ratings"}
REWARD_LOSS = {"preference": "pairwise", "ranking": "ranking", "rating": "rating"}


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """The layout of a demo run directory."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def stage(self, name: str) -> Path:
        return self.root / name

    def export(self, name: str) -> Path:
        return self.root / name / "export"

    def make(self) -> None:
        for d in (self.data, self.tokenizer, self.configs, self.plots):
            d.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------- task, oracle
def build_task(section: TaskSection) -> tuple[Task, Oracle]:
    """The task and the gold reward: the task's own, or ``task.oracle`` (any reward ``jaxrlhf.oracle.
    get_reward`` finds: a function of texts or of token arrays, a built-in, another task's oracle)."""
    task = configured_task(section.name, section.seed, section.options)
    if section.oracle is None:
        return task, task.oracle
    try:
        return task, get_reward(section.oracle, tokenizer=task.tokenizer)
    except ValueError as e:
        raise ConfigError(f"task.oracle: {e}") from None


def lengths(task: Task, add_bos: bool) -> tuple[int, int]:
    """(P, N): the prompt length (bos included) and the response length (eos included) of every batch."""
    return task.max_prompt_tokens + int(add_bos), task.max_response_tokens


def prompt_arrays(prompts: list[str], tokenizer: Any, prompt_length: int,
                  add_bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [len(prompts), P] tokens and mask, encoded exactly as the trainers' data layer does."""
    config = TokenizeConfig(max_prompt_length=prompt_length, max_length=prompt_length + 1, add_bos=add_bos)
    rows = [PromptExample(encode_prompt(tokenizer, p, config)[0]) for p in prompts]
    batch = prompt_batch(rows, buckets=LengthBuckets((prompt_length,), (1,)), pad_id=pad_token_id(tokenizer))
    return batch["tokens"], batch["mask"]


def generation_config(tokenizer: Any, max_new_tokens: int, temperature: float) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=pad_token_id(tokenizer))


# ----------------------------------------------------------------------------------------- data files
def feedback_pool(
    model: LanguageModel, params: Params, tokenizer: Any, task: Task, oracle: Oracle, cfg: DemoConfig,
    key: jax.Array,
) -> tuple[list[str], list[list[str]], list[list[float]], int]:
    """K responses of the SFT policy to each of ``feedback.prompts`` fresh prompts, with gold scores.

    Responses that never emitted eos are dropped (a record has no way to say "unfinished"; the data layer
    would append eos). The gold score is the oracle's array form on the sampled tokens, as in the
    evaluation. Returns (prompts, responses [P][≤K], gold [P][≤K], number dropped).
    """
    fb = cfg.feedback
    p_len, n_len = lengths(task, cfg.task.add_bos)
    prompts = task.sample_prompts(np.random.default_rng([cfg.run.seed, 2]), fb.prompts, split="feedback")
    tokens, mask = prompt_arrays(prompts, tokenizer, p_len, cfg.task.add_bos)
    tokens, mask = np.repeat(tokens, fb.responses_per_prompt, 0), np.repeat(mask, fb.responses_per_prompt, 0)
    gen = generation_config(tokenizer, n_len, fb.temperature)
    texts, finished, scores = [], [], []
    for rows, rollout in sample_rollouts(model, params, tokens, mask, key, gen, cfg.evaluation.chunk_size):
        arrays = [np.asarray(x)[rows] for x in rollout_reward_inputs(rollout)]
        _, responses, done = decode_batch(tokenizer, *arrays)
        gold = np.full(len(responses), np.nan, np.float32)
        if any(done):  # only finished responses are labelled, so only they are scored
            gold[np.asarray(done)] = np.asarray(oracle.score_tokens(*(a[np.asarray(done)] for a in arrays)))
        texts += responses
        finished += done
        scores += gold.tolist()
    k = fb.responses_per_prompt
    responses, gold, dropped = [], [], 0
    for i in range(len(prompts)):
        kept = [j for j in range(i * k, (i + 1) * k) if finished[j]]
        dropped += k - len(kept)
        responses.append([texts[j] for j in kept])
        gold.append([scores[j] for j in kept])
    return prompts, responses, gold, dropped


def split_feedback(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A random (train, eval) split of the records, at least one in each."""
    if len(records) < 2:
        raise ValueError(f"the annotator produced {len(records)} records; raise feedback.prompts or "
                         "feedback.responses_per_prompt (identical responses give no comparison)")
    order = np.random.default_rng([seed, 3]).permutation(len(records))
    n_eval = min(max(1, round(eval_fraction * len(records))), len(records) - 1)
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


# ----------------------------------------------------------------------------------------- trainer configs
def _data(cfg: DemoConfig, task: Task, train_file: str, eval_file: str | None,
          batch_size: int) -> DataSection:
    p_len, n_len = lengths(task, cfg.task.add_bos)
    return DataSection(train_file=train_file, eval_file=eval_file, batch_size=batch_size,
                       max_prompt_length=p_len, max_response_length=n_len, add_bos=cfg.task.add_bos,
                       prompt_buckets=(p_len,), response_buckets=(n_len,))


def _logging(cfg: DemoConfig, paths: DemoPaths, stage: str) -> LoggingSection:
    r = cfg.run
    return LoggingSection(run_dir=str(paths.stage(stage)), tensorboard=r.tensorboard, log_every=r.log_every,
                          progress_bar=r.progress_bar, level=r.log_level, mfu_matmul_size=r.mfu_matmul_size)


def sft_config(cfg: DemoConfig, task: Task, paths: DemoPaths, train_file: str,
               eval_file: str) -> SFTRunConfig:
    s = cfg.sft
    return SFTRunConfig(
        model=ModelSection(architecture=cfg.model, tokenizer=str(paths.tokenizer)),
        data=_data(cfg, task, train_file, eval_file, s.batch_size), optimizer=s.optimizer,
        checkpoint=CheckpointSection(every=s.steps, keep=1),
        logging=_logging(cfg, paths, "sft"), train=TrainSection(steps=s.steps, seed=cfg.run.seed),
    )


def reward_config(cfg: DemoConfig, task: Task, paths: DemoPaths, train_file: str,
                  eval_file: str) -> RewardRunConfig:
    r = cfg.reward
    loss = REWARD_LOSS[cfg.feedback.annotator.kind]
    return RewardRunConfig(
        model=ModelSection(path=str(paths.export("sft"))),
        data=_data(cfg, task, train_file, eval_file, r.batch_size), optimizer=r.optimizer,
        reward_model=dataclasses.replace(r.reward_model, loss=loss),
        checkpoint=CheckpointSection(every=r.steps, keep=1),
        logging=_logging(cfg, paths, "reward"), train=TrainSection(steps=r.steps, seed=cfg.run.seed),
    )


def checkpoint_every(iterations: int, points: int) -> CheckpointSection:
    """Checkpoints every ``iterations / points`` steps, all kept, so the evaluation can follow the policy
    along training."""
    every = max(1, iterations // points)
    return CheckpointSection(every=every, keep=iterations // every + 2)


def rl_config(cfg: DemoConfig, task: Task, paths: DemoPaths, algo: str, prompts_file: str,
              stage: str | None = None, seed: int | None = None, reward: RewardSection | None = None):
    """The PPO / A2C / GRPO / RLOO trainer config of the demo section ``algo`` in the sub-directory ``stage``
    (default: ``algo``), with training seed ``seed`` (default ``run.seed``) and ``reward`` (default: the
    proxy reward model): checkpoints every ``iterations / rl_points`` steps, all kept."""
    section = getattr(cfg, algo)
    stage = stage or algo
    common = dict(
        model=ModelSection(path=str(paths.export("sft"))),
        data=_data(cfg, task, prompts_file, None, section.batch_size), optimizer=section.optimizer,
        generation=GenerationSection(max_new_tokens=lengths(task, cfg.task.add_bos)[1]),
        reward=reward or RewardSection(model_path=str(paths.export("reward"))),
        checkpoint=checkpoint_every(section.iterations, cfg.evaluation.rl_points),
        logging=_logging(cfg, paths, stage),
        train=TrainSection(steps=section.iterations, seed=cfg.run.seed if seed is None else seed),
    )
    run_configs = {"ppo": PPORunConfig, "a2c": A2CRunConfig, "grpo": GRPORunConfig, "rloo": RLOORunConfig}
    return run_configs[algo](**{algo: section.algorithm}, **common)


def dpo_config(cfg: DemoConfig, task: Task, paths: DemoPaths, stage: str, seed: int, train_file: str,
               eval_file: str) -> DPORunConfig:
    """DPO on the annotator's preference pairs (the reward model's train and held-out files), from SFT."""
    d = cfg.dpo
    return DPORunConfig(
        model=ModelSection(path=str(paths.export("sft"))),
        data=_data(cfg, task, train_file, eval_file, d.batch_size), optimizer=d.optimizer, dpo=d.algorithm,
        checkpoint=checkpoint_every(d.steps, cfg.evaluation.rl_points),
        logging=_logging(cfg, paths, stage), train=TrainSection(steps=d.steps, seed=seed),
    )


def write_stage_config(paths: DemoPaths, name: str, config: Any) -> str:
    """``<run>/configs/<name>.yaml``: the trainer config as YAML, runnable as ``jaxrlhf <name> --config``."""
    path = paths.configs / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return str(path)


# ----------------------------------------------------------------------------------------- policies back
def relative(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to the run directory (for links in the report)."""
    return os.path.relpath(os.fspath(path), os.fspath(root))

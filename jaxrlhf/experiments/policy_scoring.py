"""Sample a policy on fixed prompts and score every sample: gold (oracle), proxy (reward model), KL to the
reference policy, and whether the answer is optimal. One jitted sampler and one jitted scorer, compiled
once per evaluator and reused for every policy of the same architecture (SFT, each RL checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.experiments.curves import CurvePoint, prompt_mean_ci
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.oracle import Oracle, Task, rollout_reward_inputs
from jaxrlhf.rl import RewardNormalization
from jaxrlhf.rollout.generate import GenerationConfig, Rollout, generate
from jaxrlhf.rollout.scoring import response_logprobs
from jaxrlhf.steps.experience import sequence_kl
from jaxrlhf.steps.reward_model import RewardModelScorer

SCORE_KEYS = ("gold", "proxy", "kl", "optimal", "finished", "length")


@dataclasses.dataclass(frozen=True)
class PolicyEval:
    """Summary of one policy on the evaluation prompts (means ± 95% half-widths over prompts)."""

    name: str
    gold: float
    gold_ci: float
    proxy: float
    proxy_ci: float
    kl: float
    kl_ci: float
    optimal: float
    finished: float
    length: float
    samples: int

    @property
    def sqrt_kl(self) -> float:
        return math.sqrt(max(self.kl, 0.0))

    def point(self, x: int) -> CurvePoint:
        return CurvePoint(x, self.kl, self.gold, self.gold_ci, self.proxy, self.proxy_ci, self.optimal)

    def metrics(self) -> dict[str, float]:
        """The summary as ``eval/*`` scalars for the metrics logger."""
        keys = ("gold", "gold_ci", "proxy", "proxy_ci", "kl", "kl_ci", "optimal", "finished", "length")
        return {f"eval/{k}": getattr(self, k) for k in keys} | {"eval/sqrt_kl": self.sqrt_kl}


def summarize(name: str, scores: dict[str, np.ndarray], samples_per_prompt: int) -> PolicyEval:
    """Per-sample scores [M·K] (prompt-major) → :class:`PolicyEval`, intervals over the M prompts."""
    grid = {k: np.asarray(v, np.float64).reshape(-1, samples_per_prompt) for k, v in scores.items()}
    gold, gold_ci = prompt_mean_ci(grid["gold"])
    proxy, proxy_ci = prompt_mean_ci(grid["proxy"])
    kl, kl_ci = prompt_mean_ci(grid["kl"])
    return PolicyEval(name, gold, gold_ci, proxy, proxy_ci, kl, kl_ci, float(grid["optimal"].mean()),
                      float(grid["finished"].mean()), float(grid["length"].mean()), grid["gold"].size)


def sample_rollouts(model: LanguageModel, params: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
                    key: jax.Array, generation: GenerationConfig,
                    chunk_size: int, sampler: Any = None) -> Iterator[tuple[slice, Rollout]]:
    """Rollouts for [R, P] prompts, ``chunk_size`` rows at a time: (the chunk's real rows, rollout).

    Every chunk has the same shape (the last one wraps around to the first prompts; ``rows`` trims those),
    so generation compiles once; chunk i samples with ``fold_in(key, i)``. ``sampler(tokens, mask, key) ->
    Rollout``, if given, samples instead of ``generate`` on ``params`` (value-guided decoding).
    """
    total = prompt_tokens.shape[0]
    size = min(chunk_size, total)
    for i, start in enumerate(range(0, total, size)):
        idx = np.arange(start, start + size) % total
        chunk = (jnp.asarray(prompt_tokens[idx]), jnp.asarray(prompt_mask[idx]), jax.random.fold_in(key, i))
        rollout = (generate(model, params, *chunk[:2], chunk[2], generation) if sampler is None
                   else sampler(*chunk))
        yield slice(0, min(size, total - start)), rollout


class PolicyEvaluator:
    """Samples policies of ``model`` at ``generation.temperature`` and scores the samples.

    ``reference_params`` is the KL reference (the SFT policy); the proxy is the reward model
    ``(reward_model, reward_params)`` with its normalisation; ``oracle`` gives the gold reward (jitted when
    it is jittable, else called on the host once per chunk); ``task.is_optimal_tokens`` says which answers
    are optimal. Rows are processed in chunks of ``chunk_size`` (one compiled shape).
    """

    def __init__(self, model: LanguageModel, reference_params: Any, reward_model: LanguageModel,
                 reward_params: Any, normalization: RewardNormalization | None, oracle: Oracle, task: Task,
                 generation: GenerationConfig, chunk_size: int = 512):
        self.model, self.reference_params, self.reward_params = model, reference_params, reward_params
        self.oracle, self.generation, self.chunk_size = oracle, generation, chunk_size
        scorer = RewardModelScorer(reward_model, normalization)
        temperature = generation.temperature
        jit_gold, jit_optimal = oracle.jittable, task.oracle.jittable
        self.task = task

        def score(params, ref_params, rm_params, rollout: Rollout) -> dict[str, jax.Array]:
            p = rollout.sequences.shape[1] - rollout.response_mask.shape[1]
            args = (rollout.sequences, rollout.sequence_mask, p, temperature)
            logp = response_logprobs(model, params, *args)
            ref_logp = response_logprobs(model, ref_params, *args)
            inputs = rollout_reward_inputs(rollout)
            out = {
                "proxy": scorer(rm_params, rollout),
                "kl": sequence_kl(logp, ref_logp, rollout.response_mask),
                "finished": rollout.stopped.astype(jnp.float32),
                "length": jnp.sum(rollout.response_mask, axis=1).astype(jnp.float32),
            }
            if jit_gold:
                out["gold"] = oracle.score_tokens(*inputs)
            if jit_optimal:
                out["optimal"] = task.is_optimal_tokens(*inputs).astype(jnp.float32)
            return out

        self._score = jax.jit(score)

    def scores(self, params: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, key: jax.Array,
               keep_rollouts: bool = False,
               sampler: Any = None) -> tuple[dict[str, np.ndarray], list[Rollout]]:
        """Per-row scores (:data:`SCORE_KEYS`, each [R]) of samples of ``params``; the rollouts too when
        ``keep_rollouts`` (the last chunk's wrapped-around rows trimmed).

        ``sampler(tokens, mask, key) -> Rollout`` samples instead of ``params`` (value-guided decoding: a
        policy with no parameters of its own); the KL score is then the rollouts' own ``kl`` (the exact
        per-step KL to the reference, summed over each response), which it must report."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in SCORE_KEYS}
        rollouts = []
        for rows, rollout in sample_rollouts(self.model, params, prompt_tokens, prompt_mask, key,
                                             self.generation, self.chunk_size, sampler):
            out = jax.device_get(self._score(params, self.reference_params, self.reward_params, rollout))
            if sampler is not None:
                if rollout.kl is None:
                    raise ValueError("PolicyEvaluator.scores: the sampler's rollouts carry no kl")
                out["kl"] = np.asarray(rollout.kl)
            host_inputs = None
            if "gold" not in out or "optimal" not in out:  # host oracles: once per chunk
                host_inputs = [np.asarray(x) for x in rollout_reward_inputs(rollout)]
            if "gold" not in out:
                out["gold"] = np.asarray(self.oracle.score_tokens(*host_inputs))
            if "optimal" not in out:
                out["optimal"] = np.asarray(self.task.is_optimal_tokens(*host_inputs), np.float32)
            for k in SCORE_KEYS:
                parts[k].append(np.asarray(out[k])[rows])
            if keep_rollouts:
                rollouts.append(jax.tree.map(lambda x, rows=rows: np.asarray(x)[rows], rollout))
        return {k: np.concatenate(v) for k, v in parts.items()}, rollouts

    def evaluate(self, name: str, params: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
                 key: jax.Array, samples_per_prompt: int) -> PolicyEval:
        """Summary of ``params`` on prompts already repeated ``samples_per_prompt`` times (prompt-major)."""
        scores, _ = self.scores(params, prompt_tokens, prompt_mask, key)
        return summarize(name, scores, samples_per_prompt)

"""The methods ``jaxrlhf demo`` compares: one entry of :data:`METHODS` each.

A :class:`Method` says how to train it (the ordinary trainer on a config built from the demo's sections)
and how to read its policies back along training; everything else — the same held-out prompts, the same
sampling keys, the statistics, the table, the plot, the Gao fit — is shared. Adding a method to the
comparison is one entry here (and its name in ``methods`` of the demo config).

A method whose evaluation is not "sample the policy at each checkpoint" (value-guided decoding at several
β, say) overrides :meth:`Method.score_points`: it gets the evaluator, the prompts and the key every method
gets, and returns, per point of its curve, the per-sample scores the evaluator produces
(:data:`jaxrlhf.experiments.policy_scoring.SCORE_KEYS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrlhf.experiments.demo_config import DemoConfig
from jaxrlhf.experiments.demo_stages import DemoPaths, dpo_config, rl_config
from jaxrlhf.experiments.demo_vgd import build_vgd, train_vgd, vgd_points
from jaxrlhf.train.dpo import train_dpo
from jaxrlhf.train.rl import checkpoint_steps, policy_lm_params, train_rl
from jaxrlhf.train.run_config import RewardSection


@dataclasses.dataclass
class DemoContext:
    """What every method's training and evaluation may read: the config, the task and its gold reward, the
    run directory, the data files written so far, and the rewards the RL methods can optimise
    (``rewards``: ``"proxy"`` → the reward model export, ``"gold"`` → the oracle's ``reward.function``
    spec, ``"wco"`` / ``"uwo"`` → the registered ensemble rewards); ``trained``: what a method keeps in
    memory for its evaluation (value-guided decoding's learned heads), by stage."""

    cfg: DemoConfig
    task: Any
    oracle: Any
    paths: DemoPaths
    files: dict[str, str]
    rewards: dict[str, RewardSection] = dataclasses.field(default_factory=dict)
    trained: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage -> an in-memory result (VGD)


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the comparison.

    ``key``: its name in the demo config's ``methods`` and its stage directory (``<run>/<key>``, and
    ``<key>-seed<s>`` for the further seeds); ``name``: its label in tables and plots; ``optimises``: what it
    is trained against, for the report; ``command``: the trainer command its saved config runs with
    (``None``: the config is not runnable on its own, e.g. an in-process ensemble reward);
    ``build``: ``(ctx, stage, seed) -> trainer config``; ``train``: the trainer; ``params_at``: the LM
    params' keys inside its checkpoints; ``gao_form``: the Gao et al. functional form fitted to its curve
    (``None``: none is fitted); ``ensemble``: it needs the reward-model ensemble; ``x_label``: the unit of
    its curve's points; ``points``: for a method whose curve is not its checkpoints (value-guided decoding
    at several β, say), ``points(ctx, seed_index, evaluator, tokens, mask, key) -> [(x, per-sample
    scores)]`` replaces :meth:`score_points`' default (the first point should be its SFT-like start, or
    the curve starts at the SFT policy, which the evaluation prepends as x = 0); ``exports``: its run
    leaves a Hugging Face export (value-guided decoding has no policy weights of its own).
    """

    key: str
    name: str
    optimises: str
    command: str | None
    build: Callable[[DemoContext, str, int], Any]
    train: Callable[[Any], Any]
    params_at: tuple[str, ...] = ("rl", "policy", "params", "lm")
    gao_form: str | None = "rl"
    ensemble: bool = False
    x_label: str = "step"
    points: Callable[..., list[tuple[int, dict[str, np.ndarray]]]] | None = None
    exports: bool = True

    def stage(self, seed_index: int) -> str:
        """The stage directory of the run with the ``seed_index``-th seed."""
        return self.key if seed_index == 0 else f"{self.key}-seed{seed_index}"

    def policies(self, ctx: DemoContext, seed_index: int, model: Any) -> list[tuple[int, Any]]:
        """``(step, LM params)`` at every checkpoint of the run, in order of training."""
        stage = ctx.paths.stage(self.stage(seed_index))
        return [
            (step, policy_lm_params(stage, step, model, self.params_at)) for step in checkpoint_steps(stage)
        ]

    def score_points(
        self,
        ctx: DemoContext,
        seed_index: int,
        evaluator: Any,
        tokens: np.ndarray,
        mask: np.ndarray,
        key: jax.Array,
    ) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Per point of the method's curve: ``(x, per-sample scores)`` on the evaluation prompts, sampled
        with ``key`` (the same for every method and point: common random numbers)."""
        if self.points is not None:
            return self.points(ctx, seed_index, evaluator, tokens, mask, key)
        out = []
        for step, params in self.policies(ctx, seed_index, evaluator.model):
            scores, _ = evaluator.scores(params, tokens, mask, key)
            out.append((step, scores))
        return out


def _rl(algo: str, reward: str) -> Callable[[DemoContext, str, int], Any]:
    def build(ctx: DemoContext, stage: str, seed: int) -> Any:
        return rl_config(
            ctx.cfg, ctx.task, ctx.paths, algo, ctx.files["RL prompts"], stage, seed, ctx.rewards[reward]
        )

    return build


def _dpo(ctx: DemoContext, stage: str, seed: int) -> Any:
    return dpo_config(
        ctx.cfg, ctx.task, ctx.paths, stage, seed, ctx.files["feedback"], ctx.files["held-out feedback"]
    )


PROXY = "the reward model"
METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("ppo", "PPO", PROXY, "ppo", _rl("ppo", "proxy"), train_rl),
        Method("a2c", "A2C", PROXY, "a2c", _rl("a2c", "proxy"), train_rl),
        Method("grpo", "GRPO", PROXY, "grpo", _rl("grpo", "proxy"), train_rl),
        Method("rloo", "RLOO", PROXY, "rloo", _rl("rloo", "proxy"), train_rl),
        Method(
            "dpo",
            "DPO",
            "the annotator's preference pairs (no reward model)",
            "dpo",
            _dpo,
            train_dpo,
            params_at=("train", "params", "lm"),
        ),
        Method(
            "vgd",
            "Value-guided (ILQL)",
            "the reward model, offline: ILQL on the SFT policy's scored samples, decoding at each β",
            None,
            build_vgd,
            train_vgd,
            gao_form=None,
            x_label="β",
            points=vgd_points,
            exports=False,
        ),
        Method(
            "grpo_gold",
            "GRPO (gold)",
            "the gold reward itself (upper reference)",
            "grpo",
            _rl("grpo", "gold"),
            train_rl,
        ),
        Method(
            "ppo_wco",
            "PPO (RM ens. WCO)",
            "the worst case (min) of the reward-model ensemble",
            None,
            _rl("ppo", "wco"),
            train_rl,
            ensemble=True,
        ),
        Method(
            "ppo_uwo",
            "PPO (RM ens. UWO)",
            "the uncertainty-weighted reward-model ensemble (mean − λ·var)",
            None,
            _rl("ppo", "uwo"),
            train_rl,
            ensemble=True,
        ),
    )
}



def gold_reward_spec(cfg: DemoConfig) -> str:
    """``reward.function`` naming the demo's gold reward: ``task.oracle``, or ``task:<name>,<options>``."""
    if cfg.task.oracle is not None:
        return cfg.task.oracle
    options = {"seed": cfg.task.seed, **cfg.task.options}
    return "task:" + ",".join([cfg.task.name, *(f"{k}={v}" for k, v in options.items())])


def stage_directories(paths: DemoPaths, method: Method, seeds: int) -> list[Path]:
    return [paths.stage(method.stage(s)) for s in range(seeds)]

"""End to end on the CPU: the one RL iteration (generate → programmatic reward → experience → PPO / A2C /
GRPO / RLOO update), jitted as a whole, raises the reward "share of response tokens equal to X" from ≈ 1/V
to > 0.5; and the same iteration with per-phase timing gives the same result."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.heads import init_value_head
from jaxrlhf.oracle import get_reward
from jaxrlhf.rollout.generate import GenerationConfig
from jaxrlhf.steps import (
    A2CConfig,
    GRPOConfig,
    OptimizerConfig,
    PGConfig,
    PolicyParams,
    PPOConfig,
    RLOOConfig,
    create_rl_state,
    kl_controller,
    make_optimizer,
)
from jaxrlhf.steps.rl_iteration import PHASE_TIMERS, make_rl_iteration, make_rl_phases

V, X, B, P, N = 16, 5, 16, 4, 8


def setup(model, params, cfg, learning_rate):
    optimizer = make_optimizer(OptimizerConfig(learning_rate=learning_rate, schedule="constant"), 1000)
    value_head = None if isinstance(cfg, PGConfig) else init_value_head(32)  # critic-free: none
    state = create_rl_state(PolicyParams(params, value_head), optimizer, kl_controller(cfg).init())
    generation = GenerationConfig(max_new_tokens=N, temperature=cfg.temperature)
    score = get_reward(f"token_count:{X}").score_rollout
    phases = make_rl_phases(model, model, None, cfg, generation, score, optimizer)
    return state, phases, PolicyParams(params)  # the initial policy is the reference


def prompts(rng, rows=B):
    tokens = jnp.asarray(rng.randint(3, V, (rows, P)), jnp.int32)
    return {"tokens": tokens, "mask": jnp.ones_like(tokens)}


def train(model, params, cfg, learning_rate, iterations=40):
    """Mean score per iteration."""
    state, phases, ref = setup(model, params, cfg, learning_rate)
    iteration = jax.jit(make_rl_iteration(phases, ref))
    rng = np.random.RandomState(0)
    key = jax.random.key(1)
    rows = B // cfg.group_size if isinstance(cfg, PGConfig) else B  # the same sequences per iteration
    scores = []
    for _ in range(iterations):
        key, subkey = jax.random.split(key)
        state, out = iteration(state, prompts(rng, rows), subkey)
        metrics = out.metrics
        scores.append(float(metrics["objective/scores"]))
        assert float(metrics["val/ratio_abs_dev_first_minibatch"]) <= 1e-6
        assert float(metrics["train/skipped_updates"]) == 0
    return scores


@pytest.mark.parametrize("algorithm", ["ppo", "a2c"])
def test_rl_raises_a_programmatic_reward(algorithm, tiny_model, tiny_params):
    if algorithm == "ppo":
        cfg = PPOConfig(epochs=2, num_minibatches=2, kl_coef=0.01, missing_eos_penalty=0.0)
        scores = train(tiny_model, tiny_params, cfg, 1e-3)
    else:
        cfg = A2CConfig(kl_coef=0.01, missing_eos_penalty=0.0)
        scores = train(tiny_model, tiny_params, cfg, 1e-2)
    assert np.mean(scores[:3]) < 0.2  # ≈ 1/V at the start
    assert np.mean(scores[-5:]) > 0.5, scores


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_rl_raises_a_programmatic_reward(algorithm, tiny_model, tiny_params):
    """Four prompts × four samples: GRPO (group-normalised, KL k2 in the loss, per-sequence means) and RLOO
    (leave-one-out, KL k1 in the reward, token sum / constant), 16 sequences per iteration as above."""
    common = dict(group_size=4, epochs=2, num_minibatches=2, kl_coef=0.01, missing_eos_penalty=0.0)
    cfg = GRPOConfig(**common) if algorithm == "grpo" else RLOOConfig(**common)
    scores = train(tiny_model, tiny_params, cfg, 1e-3)
    assert np.mean(scores[:3]) < 0.2  # ≈ 1/V at the start
    assert np.mean(scores[-5:]) > 0.5, scores


def test_timed_phases_run_the_same_iteration(tiny_model, tiny_params):
    """``around`` times each phase (blocking inside it) and changes nothing else."""
    cfg = A2CConfig(kl_coef=0.01)
    state, phases, ref = setup(tiny_model, tiny_params, cfg, 1e-2)
    jitted = phases._replace(generate=jax.jit(phases.generate), experience=jax.jit(phases.experience),
                             update=jax.jit(phases.update), score=jax.jit(phases.score))
    entered = []

    @contextlib.contextmanager
    def around(name):
        entered.append(name)
        yield

    batch, key = prompts(np.random.RandomState(0)), jax.random.key(2)
    whole, whole_out = jax.jit(make_rl_iteration(phases, ref))(state, batch, key)
    timed, timed_out = make_rl_iteration(jitted, ref, around=around)(state, batch, key)
    assert entered == list(PHASE_TIMERS)
    np.testing.assert_array_equal(timed_out.rollout.sequences, whole_out.rollout.sequences)
    np.testing.assert_allclose(timed_out.scores, whole_out.scores, rtol=1e-6)
    # One program against four: only the rounding differs. Adam's first step moves a parameter by
    # lr·g/(|g| + ε), so where |g| is near ε a rounding-sized change of g shows at up to ~1e-4 of lr (1e-2).
    for a, b in zip(jax.tree.leaves(timed), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert set(timed_out.metrics) == set(whole_out.metrics)

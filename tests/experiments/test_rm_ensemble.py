"""Reward-model ensembles: the combinations against NumPy, the members' batches, vmapped training equal to K
separate runs, per-member normalisation, and the ensemble as a jittable token-array reward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.experiments.rm_ensemble import (
    Ensemble,
    combine_rewards,
    member_batches,
    normalize_members,
    stack_trees,
    train_ensemble,
)
from jaxrlhf.steps import OptimizerConfig, RewardModelConfig, RewardModelParams, create_train_state
from jaxrlhf.steps.optim import make_optimizer
from jaxrlhf.steps.reward_model import make_reward_model_step, make_reward_scorer

R = np.array([[0.5, -1.0, 2.0], [1.5, -0.5, 0.0], [-0.5, 0.0, 1.0]], np.float32)  # [K=3, B=3]


@pytest.mark.parametrize("jit", [False, True])
def test_combinations_match_numpy(jit):
    combine = jax.jit(combine_rewards, static_argnums=(1, 2)) if jit else combine_rewards
    np.testing.assert_allclose(combine(jnp.asarray(R), "mean", 0.5), R.mean(0), rtol=1e-6)
    np.testing.assert_allclose(combine(jnp.asarray(R), "wco", 0.5), [-0.5, -1.0, 0.0])
    # UWO: mean − λ·population variance; column 0: mean 0.5, var ((0)² + 1² + 1²)/3 = 2/3.
    np.testing.assert_allclose(combine(jnp.asarray(R), "uwo", 0.5), R.mean(0) - 0.5 * R.var(0), rtol=1e-6)
    assert float(combine(jnp.asarray(R), "uwo", 0.5)[0]) == pytest.approx(0.5 - 0.5 * 2 / 3, rel=1e-6)
    with pytest.raises(ValueError, match="combination must be one of"):
        combine_rewards(jnp.asarray(R), "max")


def test_member_batches_bootstrap_and_permutation():
    idx = member_batches(num_examples=50, members=3, batch_size=10, steps=5, bootstrap=False, seed=0)
    assert idx.shape == (5, 3, 10)
    for k in range(3):  # one epoch: every example once, in a member's own order
        assert sorted(idx[:, k].ravel()) == list(range(50))
    assert not np.array_equal(idx[:, 0], idx[:, 1])
    boot = member_batches(num_examples=50, members=3, batch_size=10, steps=5, bootstrap=True, seed=0)
    distinct = [len(set(boot[:, k].ravel())) for k in range(3)]
    # A bootstrap resample of n holds ≈ (1 − 1/e)·n distinct examples (here about 32 of 50), never all.
    assert all(20 <= d < 50 for d in distinct), distinct
    np.testing.assert_array_equal(boot, member_batches(50, 3, 10, 5, True, 0))  # seeded


@pytest.fixture(scope="module")
def tiny_rm():
    from jaxrlhf.models.config import gpt2_config
    from jaxrlhf.models.transformer import LanguageModel

    model = LanguageModel(
        gpt2_config(
            vocab_size=16,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
    )
    return model, model.init(jax.random.key(0))


def _pair_batch(rows, seed=0):
    rng = np.random.default_rng(seed)
    chosen, rejected = (rng.integers(3, 16, size=(len(rows), 6)).astype(np.int32) for _ in range(2))
    return {
        "chosen_tokens": chosen,
        "chosen_mask": np.ones_like(chosen),
        "rejected_tokens": rejected,
        "rejected_mask": np.ones_like(rejected),
        "row_mask": np.ones(len(rows), np.float32),
    }


def test_vmapped_training_equals_separate_runs(tiny_rm):
    """One vmapped computation over K members gives each member exactly what K separate runs of the ordinary
    step on its own batches give."""
    from jaxrlhf.models.heads import init_reward_head

    model, lm = tiny_rm
    examples = list(range(8))

    def collate(rows):  # a deterministic batch per list of example indices
        return _pair_batch(rows, seed=int(sum(rows) + 31 * rows[0]))

    rm_cfg = RewardModelConfig()
    opt = OptimizerConfig(learning_rate=1e-2)
    ens = train_ensemble(
        model,
        lm,
        examples,
        [],
        collate,
        members=2,
        steps=3,
        batch_size=2,
        optimizer_cfg=opt,
        rm_cfg=rm_cfg,
        bootstrap=True,
        seed=5,
    )
    indices = member_batches(8, 2, 2, 3, True, 5)
    optimizer = make_optimizer(opt, 3)
    step = jax.jit(make_reward_model_step(model, optimizer, rm_cfg))
    for k in range(2):
        head = init_reward_head(jax.random.key(5 * 1000 + k), 16)
        state = create_train_state(RewardModelParams(lm, head), optimizer)
        for t in range(3):
            state, _ = step(state, collate([examples[i] for i in indices[t, k]]), jax.random.key(0))
        member = jax.tree.map(lambda x, k=k: x[k], ens.params)
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_normalisation_and_reward_function(tiny_rm):
    """Each member normalised to mean 0 / std 1 on the given sequences; the reward function of the prompt and
    response arrays equals the combination of the normalised member scores of their concatenation, jitted."""
    from jaxrlhf.models.heads import init_reward_head

    model, lm = tiny_rm
    params = stack_trees([RewardModelParams(lm, init_reward_head(jax.random.key(k), 16)) for k in range(3)])
    ens = Ensemble(model, params, np.ones(3), np.zeros(3), [np.nan] * 3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 16, size=(40, 8)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[:5, :2] = 0  # some left padding
    ens = normalize_members(ens, tokens, mask, batch_size=16)
    score = make_reward_scorer(model)
    raw = np.stack(
        [np.asarray(score(jax.tree.map(lambda x, k=k: x[k], params), tokens, mask)) for k in range(3)]
    )
    normalized = ens.gain[:, None] * raw + ens.bias[:, None]
    np.testing.assert_allclose(normalized.mean(1), 0.0, atol=1e-4)
    np.testing.assert_allclose(normalized.std(1), 1.0, rtol=1e-3)
    fn = jax.jit(ens.reward_function("wco", 0.5))
    out = fn(tokens[:, :3], mask[:, :3], tokens[:, 3:], mask[:, 3:])
    np.testing.assert_allclose(np.asarray(out), normalized.min(0), rtol=1e-4, atol=1e-4)
    assert ens.reward_function("uwo", 0.5).jittable

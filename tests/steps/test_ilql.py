"""ILQL's step: the batch's actions/rewards/mask, the step's gradient against the loss formula written out
here, the Polyak target update, jit = no jit, accumulation, the frozen backbone, the non-finite guard, and a
toy task whose optimal token per state is known, which the greedy ILQL policy (argmax Q) finds."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.models.q_heads import q_head_apply
from jaxrlhf.models.transformer import positions_from_mask
from jaxrlhf.steps.ilql import (
    ILQLConfig,
    create_ilql_state,
    ilql_inputs,
    init_ilql_params,
    make_ilql_eval,
    make_ilql_step,
)

from .conftest import VOCAB


def rating_batch(seed: int = 0, b: int = 4, p: int = 3, n: int = 4) -> dict:
    """Left-padded prompts, right-padded responses (row 1 has 2 response tokens, row 3 is a padded row)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, VOCAB, (b, p + n)).astype(np.int32)
    mask = np.ones((b, p + n), np.int32)
    loss_mask = np.zeros((b, p + n), np.int32)
    loss_mask[:, p:] = 1
    mask[0, 0] = tokens[0, 0] = 0  # a left pad
    mask[1, p + 2:] = loss_mask[1, p + 2:] = tokens[1, p + 2:] = 0  # a short response
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask,
            "ratings": rng.normal(size=b).astype(np.float32), "row_mask": np.array([1, 1, 1, 0], np.int32)}


def test_inputs_put_the_rating_at_the_last_response_token():
    batch = rating_batch()
    actions, mask, rewards = map(np.asarray, ilql_inputs(batch))
    np.testing.assert_array_equal(actions, batch["tokens"][:, 1:])
    expected_mask = batch["loss_mask"][:, 1:] * batch["row_mask"][:, None]
    np.testing.assert_array_equal(mask, expected_mask)
    expected = np.zeros_like(rewards)
    expected[0, -1], expected[2, -1] = batch["ratings"][0], batch["ratings"][2]
    expected[1, 3] = batch["ratings"][1]  # the short response's last token is at column p + 1 = 4
    np.testing.assert_allclose(rewards, expected)


def reference_loss(heads, hidden, batch, cfg: ILQLConfig):
    """The ILQL loss written out from its definition, over hidden states [B, L, d]."""
    q_heads, v_head, target_heads = heads
    h = hidden[:, :-1]
    actions = batch["tokens"][:, 1:]
    m = (batch["loss_mask"][:, 1:] * batch["row_mask"][:, None]).astype(np.float32)
    b, t = m.shape
    r = np.zeros((b, t), np.float32)
    for i in range(b):
        real = np.flatnonzero(m[i])
        if real.size:
            r[i, real[-1]] = batch["ratings"][i]
    take = lambda q: jnp.take_along_axis(q, jnp.asarray(actions)[..., None], -1)[..., 0]
    v = h @ v_head["proj"]["kernel"][:, 0] + v_head["proj"]["bias"][0]
    next_v = jnp.concatenate([v[:, 1:] * m[:, 1:], jnp.zeros((b, 1))], axis=1)
    y = jax.lax.stop_gradient(r + cfg.gamma * next_v)
    total = m.sum()
    td = sum(jnp.sum(m * (take(q_head_apply(w, h)) - y) ** 2) / total for w in q_heads)
    tq = jax.lax.stop_gradient(jnp.minimum(*[take(q_head_apply(w, h)) for w in target_heads]))
    u = tq - v
    v_loss = jnp.sum(m * jnp.where(u < 0, 1 - cfg.expectile, cfg.expectile) * u**2) / total
    cql = 0.0
    for w in q_heads:
        q = q_head_apply(w, h)
        cql = cql + jnp.sum(m * (jax.nn.logsumexp(q, -1) - take(q))) / total
    return td + v_loss + cfg.cql_weight * cql


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_params):
    cfg = ILQLConfig(gamma=0.9, expectile=0.8, cql_weight=0.5, target_update_rate=0.25, freeze_backbone=True)
    params = init_ilql_params(jax.random.key(3), tiny_model, tiny_params, cfg)
    # Targets that differ from the online heads, so the min and the Polyak step are visible.
    params = params._replace(target_q_heads=jax.tree.map(lambda x: x + 0.05, params.target_q_heads),
                             v_head=jax.tree.map(lambda x: x + 0.1, params.v_head))
    return cfg, params


def test_step_gradient_is_the_loss_formulas_and_targets_follow_polyak(tiny_model, setup):
    cfg, params = setup
    batch = rating_batch()
    state = create_ilql_state(params, optax.sgd(1.0), cfg)
    new, metrics = jax.jit(make_ilql_step(tiny_model, optax.sgd(1.0), cfg))(state, batch, jax.random.key(0))
    hidden, _ = tiny_model.forward(params.lm, batch["tokens"], positions_from_mask(batch["mask"]),
                                   batch["mask"])
    heads = (params.q_heads, params.v_head, params.target_q_heads)
    loss, grads = jax.value_and_grad(reference_loss)(heads, hidden, batch, cfg)
    np.testing.assert_allclose(metrics["loss/ilql"], loss, rtol=1e-5)
    expected_q = jax.tree.map(lambda p, g: p - g, params.q_heads, grads[0])
    expected_v = jax.tree.map(lambda p, g: p - g, params.v_head, grads[1])
    chex_close = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)
    chex_close(new.params.q_heads, expected_q)
    chex_close(new.params.v_head, expected_v)
    # Frozen backbone: the LM is untouched; targets: (1 − ρ)·θ̂ + ρ·θ_new.
    chex_close(new.params.lm, params.lm)
    rho = cfg.target_update_rate
    chex_close(new.params.target_q_heads,
               jax.tree.map(lambda t, o: (1 - rho) * t + rho * o, params.target_q_heads, expected_q))
    assert int(new.step) == 1
    assert float(metrics["td/error"]) == pytest.approx(np.sqrt(float(metrics["loss/q"]) / 2), rel=1e-5)
    for name in ("loss/v", "loss/cql", "q/mean", "v/mean", "q/target", "td/target", "train/grad_norm"):
        assert np.isfinite(metrics[name]), name
    assert float(metrics["train/skipped_updates"]) == 0.0


def test_accumulation_equals_one_pass_and_the_backbone_trains_unless_frozen(tiny_model, tiny_params):
    # (Eager and jitted agree on the losses in tests/rl/test_ilql.py; an eager transformer step is slow.)
    cfg = ILQLConfig()
    params = init_ilql_params(jax.random.key(0), tiny_model, tiny_params, cfg)
    batch = rating_batch(1)
    batch["row_mask"][:] = 1
    optimizer = optax.sgd(0.1)
    state = create_ilql_state(params, optimizer, cfg)
    one, m_one = jax.jit(make_ilql_step(tiny_model, optimizer, cfg))(state, batch, jax.random.key(0))
    two, m_two = jax.jit(make_ilql_step(tiny_model, optimizer, ILQLConfig(grad_accum_steps=2)))(
        state, batch, jax.random.key(0))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), two.params, one.params)
    for name in ("loss/ilql", "loss/q", "loss/v", "loss/cql", "q/mean", "v/mean", "train/grad_norm"):
        np.testing.assert_allclose(m_two[name], m_one[name], rtol=1e-4, err_msg=name)
    assert not np.allclose(one.params.lm["embed"], params.lm["embed"])
    # The eval reports the step's loss before the update.
    evaluated = jax.jit(make_ilql_eval(tiny_model, cfg))(params, batch)
    np.testing.assert_allclose(evaluated["loss/ilql"], m_one["loss/ilql"], rtol=1e-6)


def test_a_trained_backbone_also_gets_the_lms_cross_entropy(tiny_model, tiny_params):
    """With the backbone trained, L = ILQL + λ_BC·mean_t −log π(a_t | s_t) over the response tokens (without
    it the Q/V/CQL losses wore the LM down: the data's NLL 0.689 → 1.365 in 200 steps on a tiny model); the
    step's backbone gradient is that of this sum, written out here."""
    cfg = ILQLConfig(gamma=0.9, expectile=0.8, cql_weight=0.5, bc_weight=0.7)
    params = init_ilql_params(jax.random.key(4), tiny_model, tiny_params, cfg)
    batch = rating_batch(2)
    state = create_ilql_state(params, optax.sgd(1.0), cfg)
    new, metrics = jax.jit(make_ilql_step(tiny_model, optax.sgd(1.0), cfg))(state, batch, jax.random.key(0))

    def total(lm):
        hidden, _ = tiny_model.forward(lm, batch["tokens"], positions_from_mask(batch["mask"]), batch["mask"])
        heads = (params.q_heads, params.v_head, params.target_q_heads)
        m = jnp.asarray(batch["loss_mask"][:, 1:] * batch["row_mask"][:, None], jnp.float32)
        logp = jax.nn.log_softmax(tiny_model.logits(lm, hidden[:, :-1]), -1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(batch["tokens"][:, 1:])[..., None], -1)[..., 0]
        bc = jnp.sum(m * nll) / jnp.sum(m)
        return reference_loss(heads, hidden, batch, cfg) + cfg.bc_weight * bc, bc

    (loss, bc), grad_lm = jax.value_and_grad(total, has_aux=True)(params.lm)
    np.testing.assert_allclose(metrics["loss/ilql"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/bc"], bc, rtol=1e-5)
    expected = jax.tree.map(lambda p, g: p - g, params.lm, grad_lm)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), new.params.lm, expected)
    # Unused (λ_BC = 0, or a frozen backbone): reported as 0.
    for off in (ILQLConfig(bc_weight=0.0), ILQLConfig(freeze_backbone=True)):
        evaluated = jax.jit(make_ilql_eval(tiny_model, off))(init_ilql_params(jax.random.key(4), tiny_model,
                                                                               tiny_params, off), batch)
        assert float(evaluated["loss/bc"]) == 0.0
    with pytest.raises(ValueError, match="bc_weight must be a finite number >= 0"):
        ILQLConfig(bc_weight=-1.0)


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_inputs_jitted_and_not(transform):
    batch = rating_batch(2)
    got = transform(ilql_inputs)(batch)
    jax.tree.map(np.testing.assert_array_equal, got, ilql_inputs(batch))


def test_a_non_finite_batch_leaves_everything_as_it_was(tiny_model, setup):
    cfg, params = setup
    batch = rating_batch()
    batch["ratings"][0] = np.nan
    state = create_ilql_state(params, optax.adam(1e-2), cfg)
    new, metrics = jax.jit(make_ilql_step(tiny_model, optax.adam(1e-2), cfg))(state, batch, jax.random.key(0))
    assert float(metrics["train/skipped_updates"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    assert int(new.step) == 0


def test_config_rejects_bad_values():
    for bad in ({"expectile": 1.0}, {"gamma": 1.5}, {"target_update_rate": 0.0}, {"num_q_heads": 0},
                {"cql_weight": -1.0}, {"grad_accum_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ILQLConfig(**bad)


# Toy task: prompt p ∈ PROMPTS, two response tokens. Reward ½·[a1 = first(p)] + ½·[a2 = second(a1)] at
# the end; the offline data are every (p, a1, a2), i.e. uniform behaviour. The optimal tokens are known.
PROMPTS = (3, 4, 5, 6)
ACTIONS = tuple(range(7, 15))
FIRST = {p: ACTIONS[(2 * p) % len(ACTIONS)] for p in PROMPTS}
SECOND = {a: ACTIONS[(3 * a + 1) % len(ACTIONS)] for a in ACTIONS}


def toy_data() -> dict:
    rows = list(itertools.product(PROMPTS, ACTIONS, ACTIONS))
    tokens = np.array(rows, np.int32)
    ratings = np.array([0.5 * (a1 == FIRST[p]) + 0.5 * (a2 == SECOND[a1]) for p, a1, a2 in rows], np.float32)
    n = len(rows)
    return {"tokens": tokens, "mask": np.ones((n, 3), np.int32),
            "loss_mask": np.tile(np.array([0, 1, 1], np.int32), (n, 1)), "ratings": ratings}


def train_toy(model, lm, steps: int = 400, seed: int = 0):
    # Q-learning alone (bc_weight 0): the data are uniform behaviour, and the LM's cross-entropy on them pulls
    # the tiny backbone towards a uniform LM, competing with the Q heads for its two layers.
    cfg = ILQLConfig(gamma=1.0, expectile=0.9, cql_weight=0.01, target_update_rate=0.05, bc_weight=0.0)
    optimizer = optax.adam(3e-3)
    state = create_ilql_state(init_ilql_params(jax.random.key(seed), model, lm, cfg), optimizer, cfg)
    step = jax.jit(make_ilql_step(model, optimizer, cfg))
    data = toy_data()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.choice(len(data["ratings"]), 64, replace=False)
        state, metrics = step(state, {k: v[rows] for k, v in data.items()}, jax.random.key(0))
    return state.params, metrics


@pytest.fixture(scope="module")
def toy_ilql(tiny_model, tiny_params):
    return train_toy(tiny_model, tiny_params)


def test_greedy_ilql_policy_finds_the_optimal_token_of_every_state(tiny_model, toy_ilql):
    params, metrics = toy_ilql
    assert float(metrics["td/error"]) < 0.2
    # First step: argmax_a Q(p, a) = FIRST[p]; second: argmax_a Q((p, a1), a) = SECOND[a1] for every a1.
    prompts = np.array(PROMPTS, np.int32)[:, None]
    hidden, _ = tiny_model.forward(params.lm, prompts, positions_from_mask(np.ones_like(prompts)),
                                   np.ones_like(prompts))
    q = np.minimum(*[np.asarray(q_head_apply(h, hidden[:, -1])) for h in params.target_q_heads])
    allowed = np.full(VOCAB, -np.inf)
    allowed[list(ACTIONS)] = 0.0  # the data's actions; Q of tokens never taken is pushed down by CQL anyway
    assert [int(a) for a in np.argmax(q + allowed, -1)] == [FIRST[p] for p in PROMPTS]
    assert [int(a) for a in np.argmax(q, -1)] == [FIRST[p] for p in PROMPTS]
    seqs = np.array([(p, a) for p in PROMPTS for a in ACTIONS], np.int32)
    hidden, _ = tiny_model.forward(params.lm, seqs, positions_from_mask(np.ones_like(seqs)),
                                   np.ones_like(seqs))
    q = np.minimum(*[np.asarray(q_head_apply(h, hidden[:, -1])) for h in params.target_q_heads])
    assert [int(a) for a in np.argmax(q, -1)] == [SECOND[a] for _, a in seqs]

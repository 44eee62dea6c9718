"""DPO step: sequence log-probs against NumPy, each loss's parameter gradient against its analytic weighting
of ∇log π(y_c) − ∇log π(y_r), accumulation, the guard, and the step at the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.models.transformer import positions_from_mask
from jaxrlhf.steps import PolicyParams, create_train_state
from jaxrlhf.steps.dpo import (
    DPO_METRICS,
    DPOConfig,
    make_dpo_eval,
    make_dpo_step,
    make_reference_logps,
    pair_logps,
    response_logps,
)

WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
B, P, N, V = 6, 4, 6, 16


def pair_batch(seed: int = 0) -> dict:
    """B pairs in the preference_batch layout (left-padded prompts, right-padded responses of varied
    lengths); the last row is padding (row_mask 0)."""
    rng = np.random.RandomState(seed)
    batch = {}
    prompt_pad = [i % 3 for i in range(B)]
    for side, offset in (("chosen", 0), ("rejected", 1)):
        tokens = rng.randint(3, V, (B, P + N)).astype(np.int32)
        mask = np.ones((B, P + N), np.int32)
        loss_mask = np.zeros((B, P + N), np.int32)
        for i in range(B):
            n = N - (i + offset) % 4
            mask[i, :prompt_pad[i]] = 0
            mask[i, P + n:] = 0
            loss_mask[i, P:P + n] = 1
        batch.update({f"{side}_tokens": tokens, f"{side}_mask": mask, f"{side}_loss_mask": loss_mask})
    batch["rejected_tokens"][:, :P] = batch["chosen_tokens"][:, :P]  # one prompt per pair
    row_mask = np.ones(B, np.int32)
    row_mask[-1] = 0
    for k in list(batch):
        batch[k][-1] = 0
    batch["row_mask"] = row_mask
    for k in [k for k in batch if k.endswith("tokens")]:
        batch[k] = np.where(batch[k.replace("tokens", "mask")] > 0, batch[k], 0).astype(np.int32)
    return batch


def numpy_response_logps(model, params, tokens, mask, loss_mask):
    logits, _, _ = model.apply(params, jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)),
                               jnp.asarray(mask))
    logits = np.asarray(logits, np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    token_lp = np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return (token_lp * loss_mask[:, 1:]).sum(1)


@pytest.fixture(scope="module")
def batch_with_reference(tiny_model, other_params):
    batch = pair_batch()
    refs = jax.jit(make_reference_logps(tiny_model))(other_params, batch)
    return {**batch, **jax.device_get(refs)}


def test_response_and_pair_logps_against_numpy(tiny_model, tiny_params):
    batch = pair_batch()
    chosen, rejected = jax.jit(lambda p, b: pair_logps(tiny_model, p, b))(tiny_params, batch)
    for side, got in (("chosen", chosen), ("rejected", rejected)):
        args = [batch[f"{side}_{k}"] for k in ("tokens", "mask", "loss_mask")]
        want = numpy_response_logps(tiny_model, tiny_params, *args)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(response_logps(tiny_model, tiny_params, *map(jnp.asarray, args)), want,
                                   rtol=1e-5, atol=1e-5)
    assert float(chosen[-1]) == 0.0 and np.all(np.asarray(chosen[:-1]) < -1.0)  # the padded pair: empty


# dℓ/dh per pair for each loss (tests/rl/test_preference.py checks these against dpo_loss itself).
SLOPES = {
    "sigmoid": (DPOConfig(beta=0.5), lambda h, b: -b * jax.nn.sigmoid(-b * h)),
    "cdpo": (DPOConfig(beta=0.5, label_smoothing=0.2),
             lambda h, b: -b * (0.8 * jax.nn.sigmoid(-b * h) - 0.2 * jax.nn.sigmoid(b * h))),
    "ipo": (DPOConfig(loss="ipo", beta=0.5), lambda h, b: 2.0 * (h - 1.0 / (2.0 * b))),
    "hinge": (DPOConfig(loss="hinge", beta=2.0), lambda h, b: jnp.where(b * h < 1.0, -b, 0.0)),
}


@pytest.mark.parametrize("name", sorted(SLOPES))
@WITH_AND_WITHOUT_JIT
def test_step_gradient_is_the_analytic_weighting_of_logprob_gradients(
    tiny_model, tiny_params, batch_with_reference, name, transform
):
    """With SGD(lr 1) the update is −∇L, and ∇L = Σ_b w_b·ℓ'(h_b)·(∇log π(y_c,b) − ∇log π(y_r,b)) / Σ w."""
    cfg, slope = SLOPES[name]
    batch = batch_with_reference
    policy = PolicyParams(tiny_params)
    (chosen, rejected), vjp = jax.vjp(lambda lm: pair_logps(tiny_model, lm, batch), tiny_params)
    h = (chosen - batch["ref_chosen_logps"]) - (rejected - batch["ref_rejected_logps"])
    w = jnp.asarray(batch["row_mask"], jnp.float32)
    weight = w * slope(h, cfg.beta) / w.sum()
    assert float(jnp.min(jnp.abs(cfg.beta * h - 1.0))) > 1e-3  # away from the hinge's kink
    (expected,) = vjp((weight, -weight))

    state = create_train_state(policy, optax.sgd(1.0))
    new, metrics = transform(make_dpo_step(tiny_model, optax.sgd(1.0), cfg))(state, batch, jax.random.key(0))
    delta = jax.tree.map(jnp.subtract, new.params.lm, tiny_params)
    jax.tree.map(lambda d, g: np.testing.assert_allclose(d, -g, rtol=2e-4, atol=1e-5), delta, expected)
    assert float(optax.tree.norm(expected)) > 1e-3
    assert float(metrics["train/grad_norm"]) == pytest.approx(float(optax.tree.norm(expected)), rel=1e-4)
    assert int(new.step) == 1 and float(metrics["train/skipped_updates"]) == 0.0


def test_step_at_the_reference_and_metric_names(tiny_model, tiny_params):
    """Policy = reference: h = 0 (up to float rounding between two compiled passes), so the sigmoid loss is
    log 2 and every implicit reward 0; logps/* are the policy's mean sequence log-probs."""
    batch = pair_batch()
    refs = make_reference_logps(tiny_model)(tiny_params, batch)
    opt = optax.adam(1e-3)
    step = jax.jit(make_dpo_step(tiny_model, opt, DPOConfig()))
    _, m = step(create_train_state(PolicyParams(tiny_params), opt), {**batch, **refs}, jax.random.key(0))
    assert set(m) == {"loss/dpo", *DPO_METRICS, "train/grad_norm", "train/skipped_updates", "lr"}
    assert float(m["loss/dpo"]) == pytest.approx(np.log(2.0), rel=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(m[k])) < 1e-6, k
    real = batch["row_mask"] > 0
    mean_ref = float(np.mean(np.asarray(refs["ref_chosen_logps"])[real]))
    assert float(m["logps/chosen"]) == pytest.approx(mean_ref, rel=1e-5)
    evaluate = jax.jit(make_dpo_eval(tiny_model, DPOConfig()))
    e = evaluate(PolicyParams(tiny_params), {**batch, **refs})
    assert float(e["pairs"]) == B - 1 and float(e["loss/dpo"]) == pytest.approx(np.log(2.0), rel=1e-6)


def test_grad_accumulation_equals_one_pass(tiny_model, tiny_params, batch_with_reference):
    batch = {k: v[:4] for k, v in batch_with_reference.items()}
    batch["row_mask"] = np.array([1, 1, 0, 1], np.int32)
    opt = optax.sgd(1.0)
    state = create_train_state(PolicyParams(tiny_params), opt)
    one = jax.jit(make_dpo_step(tiny_model, opt, DPOConfig(grad_accum_steps=1)))
    two = jax.jit(make_dpo_step(tiny_model, opt, DPOConfig(grad_accum_steps=2)))
    new_a, m_a = one(state, batch, jax.random.key(0))
    new_b, m_b = two(state, batch, jax.random.key(0))
    for k in ("loss/dpo", *DPO_METRICS, "train/grad_norm"):
        np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_a.params, new_b.params)


def test_non_finite_reference_skips_the_update(tiny_model, tiny_params, batch_with_reference):
    batch = dict(batch_with_reference)
    batch["ref_chosen_logps"] = np.array(batch["ref_chosen_logps"]).copy()
    batch["ref_chosen_logps"][0] = np.nan
    opt = optax.sgd(1.0)
    state = create_train_state(PolicyParams(tiny_params), opt)
    new, m = jax.jit(make_dpo_step(tiny_model, opt, DPOConfig()))(state, batch, jax.random.key(0))
    assert float(m["train/skipped_updates"]) == 1.0 and int(new.step) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params.lm, tiny_params)


def test_a_batch_without_reference_logps_names_the_missing_key(tiny_model, tiny_params):
    opt = optax.sgd(1.0)
    step = make_dpo_step(tiny_model, opt, DPOConfig())
    with pytest.raises(KeyError, match=r"no 'ref_chosen_logps'.*make_reference_logps"):
        step(create_train_state(PolicyParams(tiny_params), opt), pair_batch(), jax.random.key(0))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(loss="kto"), "DPOConfig.loss"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss="ipo", label_smoothing=0.1), "sigmoid loss .conservative DPO. only"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(eval_fraction=1.0), "eval_fraction"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**kwargs)

"""The non-finite guard inside a jitted step: all_finite, and an update rolled back (one lax.cond) on a NaN
gradient or loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.steps.guard import all_finite, apply_gradients_if_finite
from jaxrlhf.steps.state import create_train_state

WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


@WITH_AND_WITHOUT_JIT
def test_all_finite_looks_only_at_floating_leaves(transform):
    check = transform(all_finite)
    tree = {"w": jnp.ones((2, 3)), "count": jnp.array(7, jnp.int32), "key": jax.random.key(0), "x": 1.5}
    assert bool(check(tree)) is True
    assert bool(check({**tree, "w": jnp.ones((2, 3)).at[1, 2].set(jnp.nan)})) is False
    assert bool(check({**tree, "x": jnp.float32(-jnp.inf)})) is False
    assert bool(check({"b": jnp.array([1, 2]), "e": ()})) is True  # no floating leaf at all


@WITH_AND_WITHOUT_JIT
def test_update_is_rolled_back_when_not_finite(transform):
    opt = optax.adam(0.1)
    state = create_train_state({"w": jnp.array([1.0, 2.0])}, opt)
    step = transform(lambda s, g, loss: apply_gradients_if_finite(s, opt, g, loss))

    good, ok = step(state, {"w": jnp.array([1.0, -1.0])}, jnp.float32(0.5))
    assert bool(ok) and int(good.step) == 1
    np.testing.assert_allclose(good.params["w"], [0.9, 2.1], rtol=1e-5)

    for grads, loss in [({"w": jnp.array([jnp.nan, 1.0])}, 0.5), ({"w": jnp.ones(2)}, jnp.inf)]:
        bad, ok = step(good, grads, jnp.float32(loss))
        assert not bool(ok)
        jax.tree.map(np.testing.assert_array_equal, bad, good)  # params, Adam moments, count, step


def _compiled_lines(num_layers: int) -> int:
    from jaxrlhf.models.config import gpt2_config
    from jaxrlhf.models.transformer import LanguageModel
    from jaxrlhf.steps.sft import SFTConfig, make_sft_step

    model = LanguageModel(gpt2_config(vocab_size=16, hidden_size=16, num_layers=num_layers, num_heads=2,
                                      max_position_embeddings=16))
    opt = optax.adam(1e-3)
    state = create_train_state(jax.eval_shape(model.init, jax.random.key(0)), opt)
    batch = {k: jax.ShapeDtypeStruct((2, 8), jnp.int32) for k in ("tokens", "mask", "loss_mask")}
    step = jax.jit(make_sft_step(model, opt, SFTConfig()))
    return len(step.lower(state, batch, jax.random.key(0)).compile().as_text().splitlines())


def test_guarded_update_program_grows_linearly_with_the_number_of_leaves():
    # Regression: a per-leaf select on the all-finite flag made XLA copy the leaves-way AND into every
    # leaf's fusion, so the program grew with leaves² (4× the layers gave ~16× the AND chain).
    small, large = _compiled_lines(1), _compiled_lines(4)
    assert large < 4.5 * small, (small, large)

"""LoRA in the steps: only the adapters get gradients and optimiser state, the gradient is the merged
model's, and in RL the reference is the base with the adapters off (no second copy of the weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.heads import init_value_head
from jaxrlhf.models.lora import LoRAConfig, init_lora, merge_lora
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask
from jaxrlhf.oracle import get_reward
from jaxrlhf.rollout.generate import GenerationConfig
from jaxrlhf.steps import (
    GRPOConfig,
    OptimizerConfig,
    PolicyParams,
    PPOConfig,
    SFTConfig,
    create_rl_state,
    create_train_state,
    kl_controller,
    make_optimizer,
    make_sft_step,
)
from jaxrlhf.steps.rl_iteration import make_rl_phases
from jaxrlhf.steps.sft import sft_loss, target_mask
from jaxrlhf.steps.state import model_params, with_frozen
from jaxrlhf.train.run import compile_step

V = 16
LORA = LoRAConfig(enabled=True, rank=2, alpha=4.0, targets=("q", "v", "o", "up", "down"))


def setup():
    cfg = gpt2_config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64)
    model = LanguageModel(cfg, lora_alpha=LORA.alpha)
    base = model.init(jax.random.key(0))
    adapters = init_lora(jax.random.key(1), cfg, LORA)
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    return model, base, adapters


def sft_batch():
    tokens = jax.random.randint(jax.random.key(3), (4, 10), 3, V)
    mask = jnp.ones_like(tokens).at[1, :3].set(0)
    loss_mask = mask.at[:, :5].set(0)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def test_lora_gradient_is_the_merged_models_gradient():
    """∂CE/∂(A, B) through the in-layer low-rank term equals it through W + (α/r)·A·B."""
    model, base, adapters = setup()
    batch = sft_batch()

    def loss(params):
        logits = model.apply(params, batch["tokens"], positions_from_mask(batch["mask"]), batch["mask"])[0]
        return sft_loss(logits, batch["tokens"], target_mask(batch))[0]

    ours = jax.jit(jax.grad(with_frozen(loss, base)))(adapters)
    merged = jax.grad(lambda ad: loss(merge_lora(base, ad, model.config, LORA)))(adapters)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(merged), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    assert jax.tree.structure(ours) == jax.tree.structure(adapters)


def test_sft_step_trains_only_the_adapters():
    model, base, adapters = setup()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"), 10)
    state = create_train_state(adapters, optimizer, frozen=base)
    # The optimiser state covers the adapters only.
    adam_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert adam_leaves == 2 * sum(x.size for x in jax.tree.leaves(adapters))
    step = compile_step(make_sft_step(model, optimizer, SFTConfig()))
    base_copy = jax.tree.map(np.asarray, base)
    losses = []
    for _ in range(5):
        state, metrics = step(state, sft_batch(), jax.random.key(0))
        losses.append(float(metrics["loss/sft"]))
    assert losses[-1] < losses[0]
    assert state.frozen is base  # not donated: the same arrays live on
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base_copy), strict=True):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)


def rl_setup(cfg, value_head):
    model, base, adapters = setup()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"), 100)
    state = create_rl_state(PolicyParams(adapters, value_head), optimizer, kl_controller(cfg).init(),
                            policy_frozen=PolicyParams(base))
    generation = GenerationConfig(max_new_tokens=6, temperature=cfg.temperature)
    phases = make_rl_phases(model, model, None, cfg, generation, get_reward("token_count:5").score_rollout,
                            optimizer)
    return model, state, phases


def test_ppo_reference_is_the_base_with_adapters_off():
    cfg = PPOConfig(epochs=1, num_minibatches=2, kl_coef=0.05, missing_eos_penalty=0.0)
    model, state, phases = rl_setup(cfg, init_value_head(32))
    prompts = jax.random.randint(jax.random.key(4), (4, 4), 3, V)
    mask = jnp.ones_like(prompts)
    ref = state.policy.frozen  # PolicyParams(base): the policy's own base, no copy
    rollout = jax.jit(phases.generate)(model_params(state.policy), prompts, mask, jax.random.key(5))
    scores = phases.score(rollout)
    experience = jax.jit(phases.experience)
    batch, _ = experience(model_params(state.policy), ref, None, rollout, scores, state.kl)
    separately_loaded = PolicyParams(LanguageModel(model.config).init(jax.random.key(0)))
    batch_sep, _ = experience(model_params(state.policy), separately_loaded, None, rollout, scores, state.kl)
    np.testing.assert_allclose(batch.ref_logprobs, batch_sep.ref_logprobs, atol=1e-6, rtol=0)
    # The adapters move the policy off the reference.
    assert float(jnp.abs(batch.old_logprobs - batch.ref_logprobs).max()) > 1e-3

    update = compile_step(phases.update)
    base_before = jax.tree.map(np.asarray, ref.lm)
    adapters_before = jax.tree.map(np.asarray, state.policy.params.lm)
    new_state, metrics = update(state, batch, jax.random.key(6))
    assert float(metrics["train/updates"]) == 2
    assert new_state.policy.frozen is ref
    for a, b in zip(jax.tree.leaves(ref.lm), jax.tree.leaves(base_before), strict=True):
        np.testing.assert_array_equal(a, b)  # the reference is intact after the donating update
    moved = [float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(new_state.policy.params.lm), jax.tree.leaves(adapters_before))]
    assert max(moved) > 0


def test_grpo_with_lora_runs_on_the_adapters():
    cfg = GRPOConfig(group_size=2, epochs=1, num_minibatches=1, kl_coef=0.05)
    _, state, phases = rl_setup(cfg, None)
    prompts = jax.random.randint(jax.random.key(4), (2, 4), 3, V)
    rollout = jax.jit(phases.generate)(model_params(state.policy), prompts, jnp.ones_like(prompts),
                                       jax.random.key(5))
    batch, _ = jax.jit(phases.experience)(model_params(state.policy), state.policy.frozen, None, rollout,
                                          phases.score(rollout), state.kl)
    before = jax.tree.map(np.asarray, state.policy.params.lm)
    structure = jax.tree.structure(state.policy.params)
    new_state, metrics = compile_step(phases.update)(state, batch, jax.random.key(6))
    assert float(metrics["train/skipped_updates"]) == 0
    assert jax.tree.structure(new_state.policy.params) == structure
    assert optax.tree.norm(jax.tree.map(jnp.subtract, new_state.policy.params.lm, before)) > 0

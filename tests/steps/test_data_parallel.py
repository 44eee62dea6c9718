"""The steps run unchanged when jitted over a 4-device data-parallel mesh (fake CPU devices, in a fresh
process): the batch split along "data", parameters replicated, and the same results as on one device."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from jaxrlhf import steps as S
    from jaxrlhf.models.config import gpt2_config
    from jaxrlhf.models.heads import init_value_head
    from jaxrlhf.models.transformer import LanguageModel
    from jaxrlhf.rollout.generate import Rollout

    assert jax.device_count() == 4
    model = LanguageModel(gpt2_config(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2,
                                      max_position_embeddings=64))
    init = jax.jit(model.init)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, data = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    B, P, N = 8, 4, 6
    rng = np.random.RandomState(0)
    seq = rng.randint(3, 16, (B, P + N)).astype(np.int32)
    response_mask = np.ones((B, N), np.int32)
    response_mask[::3, 4:] = 0
    seq_mask = np.ones_like(seq)
    seq_mask[:, P:] = response_mask
    rollout = Rollout(jnp.asarray(seq), jnp.asarray(seq_mask), jnp.asarray(seq[:, P:]),
                      jnp.asarray(response_mask), jnp.zeros((B, N)), jnp.asarray(response_mask[:, -1] == 0))
    scores = jnp.asarray(rng.randn(B), jnp.float32)
    cfg = S.PPOConfig(epochs=2, num_minibatches=2, grad_accum_steps=2, temperature=0.7)
    opt = S.make_optimizer(S.OptimizerConfig(learning_rate=1e-3), 10)
    experience = jax.jit(S.make_experience_fn(model, model, None, cfg))
    update = S.make_ppo_update(model, None, cfg, opt)

    def ppo(shard):
        policy = {"lm": init(jax.random.key(0)), "value_head": init_value_head(32)}
        ref = {"lm": init(jax.random.key(1))}
        state = S.create_rl_state(policy, opt, S.kl_controller(cfg).init())
        put = (lambda x, s: jax.device_put(x, s)) if shard else (lambda x, s: x)
        batch, _ = experience(put(policy, replicated), put(ref, replicated), None, put(rollout, data),
                              put(scores, data), 0.05)
        assert not shard or batch.advantages.sharding.spec == PartitionSpec("data")
        return jax.jit(update, donate_argnums=0)(put(state, replicated), batch, jax.random.key(3))

    def sft(shard):
        sgd = S.make_optimizer(S.OptimizerConfig(learning_rate=1e-3), 10)
        state = S.create_train_state(init(jax.random.key(0)), sgd)
        batch = dict(tokens=seq, mask=seq_mask, loss_mask=seq_mask * (np.arange(P + N) >= P),
                     row_mask=np.ones(B, np.int32))
        put = (lambda x, s: jax.device_put(x, s)) if shard else (lambda x, s: x)
        step = jax.jit(S.make_sft_step(model, sgd, S.SFTConfig(grad_accum_steps=2)), donate_argnums=0)
        return step(put(state, replicated), put(batch, data), jax.random.key(0))

    for run in (ppo, sft):
        (one, one_metrics), (many, many_metrics) = run(False), run(True)
        gap = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one, many)
        assert max(jax.tree.leaves(gap)) < 1e-6, gap
        for k in one_metrics:
            np.testing.assert_allclose(one_metrics[k], many_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
    print("OK")
""")


@pytest.mark.slow  # about a minute cold (eight programs compiled in a fresh process), ~12 s cached
def test_steps_under_a_data_parallel_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600, cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-4000:]

"""``make_train(config) -> train(key, hparams)``: the pools' splits, the output's shapes, and the two promises
of the pure pipeline on a tiny configuration — a vmapped member equals the same seed run alone, and a member
of a vmapped hyper-parameter sweep equals the run with those values set statically in the config.

One vmapped program holds both kinds of member (two seeds at the defaults, a third seed with every RL
hyper-parameter changed), so the module compiles three programs in all.
"""

import dataclasses

import jax
import numpy as np
import pytest

from jaxrlhf.config import ConfigError
from jaxrlhf.experiments.pipeline import make_train, replace_config
from jaxrlhf.experiments.pipeline_config import (
    load_pipeline_config,
    stack_hparams,
    static_hparams,
)
from jaxrlhf.experiments.pipeline_data import prepare_data

TINY = (
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "task.options={min_digits: 3, max_digits: 3, max_response_tokens: 5}",
    "sft.demonstrations=64", "sft.batch_size=8", "sft.steps=4",
    "feedback.responses=16", "feedback.prompt_pool=16",
    "reward.batch_size=4", "reward.steps=3", "reward.normalization_samples=8", "reward.agreement_pairs=8",
    "rl.iterations=2", "rl.batch_size=4", "rl.prompt_pool=16", "rl.ppo.epochs=2",
    "evaluation.prompts=8", "evaluation.points=2",
)
# Every RL hyper-parameter a sweep may trace, away from its default (adaptive KL with a target it acts on).
CHANGED = {"rl.learning_rate": 3e-4, "rl.kl_coef": 0.2, "rl.clip_eps": 0.1, "rl.whiten_advantages": False,
           "rl.adaptive_kl": True, "rl.missing_eos_penalty": 0.5, "rl.normalize_reward": False}


@pytest.fixture(scope="module")
def config():
    return load_pipeline_config(None, [*TINY, "rl.ppo.kl_target=0.01", "rl.ppo.kl_horizon=100"])


@pytest.fixture(scope="module")
def runs(config):
    """(keys, vmapped outputs, single-run outputs) for members: seed 0 and seed 1 at the defaults, seed 2
    with CHANGED; the vmapped program traces every hyper-parameter, the single runs hold them static."""
    train = make_train(config)
    keys = jax.random.split(jax.random.key(7), 3)
    members = [static_hparams(config), static_hparams(config), static_hparams(config, **CHANGED)]
    vmapped = jax.jit(jax.vmap(train))(keys, stack_hparams(members))
    single = jax.jit(train)
    changed_config = replace_config(
        config, rl={"optimizer": dataclasses.replace(config.rl.optimizer, learning_rate=3e-4),
                    "ppo": dataclasses.replace(config.rl.ppo, kl_coef=0.2, clip_eps=0.1,
                                               whiten_advantages=False, adaptive_kl=True,
                                               missing_eos_penalty=0.5)},
        reward={"normalize": False})
    changed = jax.jit(make_train(changed_config, data=train.pipeline.data))
    static = [single(keys[0]), single(keys[1]), changed(keys[2])]
    return keys, vmapped, static, train.pipeline


def assert_trees_close(a, b, where):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{where}: {jax.tree_util.keystr(path)}")


def test_pools_come_from_disjoint_splits(config):
    data = prepare_data(config)
    assert data.overlap.max_overlap == 0
    assert data.demonstrations["tokens"].shape == (64, 3 + 5)
    assert {k: len(v) for k, v in data.prompts.items()} == {"feedback": 16, "rl": 16, "eval": 8}
    # The loss covers the completion and its eos, never the prompt.
    assert np.all(data.demonstrations["loss_mask"][:, :3] == 0)
    assert np.all(data.demonstrations["tokens"][data.demonstrations["loss_mask"].sum(1) > 0] >= 0)


@pytest.mark.slow
def test_vmapped_members_equal_their_single_runs(runs):
    _, vmapped, static, _ = runs
    for i in range(3):
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], vmapped), static[i], f"member {i}")


@pytest.mark.slow
def test_sweep_members_differ_where_their_hyper_parameters_do(runs):
    _, vmapped, _, _ = runs
    assert float(vmapped.rl["objective/kl_coef"][2, 0]) != pytest.approx(0.05)
    assert float(vmapped.rl["lr"][2, 0]) > float(vmapped.rl["lr"][0, 0])
    np.testing.assert_array_equal(vmapped.sft["loss/sft"][2] != vmapped.sft["loss/sft"][0], True)


@pytest.mark.slow
def test_output_shapes_and_values(runs, config):
    _, vmapped, _, pipeline = runs
    m = config.evaluation.prompts
    for field in ("gold", "proxy", "kl", "optimal", "finished", "length"):
        assert getattr(vmapped.curve, field).shape == (3, config.evaluation.points + 1, m)
    assert pipeline.evaluation_steps == (0, 1, 2)
    assert vmapped.sft["loss/sft"].shape == (3, config.sft.steps)
    assert vmapped.reward["loss/reward"].shape == (3, 1, config.reward.steps)
    assert vmapped.rl["objective/kl"].shape == (3, config.rl.iterations)
    # The first point is the SFT policy itself: KL 0; gold within the oracle's range.
    np.testing.assert_allclose(vmapped.curve.kl[:, 0], 0.0, atol=1e-5)
    assert np.all((vmapped.curve.gold >= -1) & (vmapped.curve.gold <= 1))
    assert np.all(np.isfinite(vmapped.reward["reward/oracle_agreement"]))


def test_bad_pipeline_config_names_the_key():
    with pytest.raises(ConfigError, match=r"evaluation\.points"):
        load_pipeline_config(None, [*TINY, "evaluation.points=3"])
    with pytest.raises(ConfigError, match=r"feedback\.prompt_pool"):
        load_pipeline_config(None, [*TINY, "feedback.annotator.kind=rating", "feedback.prompt_pool=8"])
    with pytest.raises(ConfigError, match=r"hyper-parameter 'rl\.beta'"):
        static_hparams(load_pipeline_config(None, TINY), **{"rl.beta": 0.1})


def test_out_of_range_hyper_parameters_name_the_field(config):
    """Python-number hyper-parameters are checked like the config's own values (a traced one cannot be)."""
    cases = [
        ({"rl.learning_rate": -1e-4}, r"'rl\.learning_rate': must be a finite number >= 0, got -0\.0001"),
        ({"rl.kl_coef": float("nan")}, r"'rl\.kl_coef': must be a finite number >= 0"),
        ({"rl.clip_eps": 0.0}, r"'rl\.clip_eps': must be a finite number > 0"),
        ({"feedback.flip_prob": 1.5}, r"'feedback\.flip_prob': must be in \[0, 1\], got 1\.5"),
        # The annotator's own rules: an infinite temperature or noise is refused here as there.
        ({"feedback.annotator_temperature": -1.0},
         r"'feedback\.annotator_temperature': must be a finite number >= 0"),
        ({"feedback.rating_noise": float("inf")}, r"'feedback\.rating_noise': must be a finite number >= 0"),
        ({"rl.whiten_advantages": 0.5}, r"'rl\.whiten_advantages': must be a bool \(or 0/1\), got 0\.5"),
        ({"feedback.responses": 32}, r"'feedback\.responses': must be <= the budget feedback\.responses "
                                     r"\(16\)"),
        ({"feedback.responses": 2.5}, r"'feedback\.responses': must be a whole number >= 0"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            static_hparams(config, **changes)
    edges = {"rl.whiten_advantages": 1, "feedback.responses": 0, "rl.vf_clip_eps": None}
    good = static_hparams(config, **edges)
    bad = good._replace(rl=good.rl._replace(kl_coef=-1.0))
    with pytest.raises(ConfigError, match=r"stack_hparams: member 1: hyper-parameter 'rl\.kl_coef'"):
        stack_hparams([good, bad])
    with pytest.raises(TypeError, match="member 0 is a dict, not an HParams"):
        stack_hparams([{"rl": 1}])
    with pytest.raises(ConfigError, match=r"member 1: hyper-parameter 'rl\.kl_coef'"):  # sections too
        stack_hparams([good.rl, bad.rl])
    assert stack_hparams([good.feedback, good.feedback]).flip_prob.shape == (2,)
    from jaxrlhf.steps import OptimizerConfig, make_optimizer
    with pytest.raises(ValueError, match=r"learning_rate must be a finite number >= 0, got -0\.1"):
        make_optimizer(OptimizerConfig(), 10, learning_rate=-0.1)


def test_misused_train_calls_say_what_to_do(config):
    train = make_train(config)
    grid = stack_hparams([static_hparams(config)] * 2)
    with pytest.raises(TypeError, match=r"hparams must be an HParams .* got dict"):
        train(jax.random.key(0), {"rl": {}})
    with pytest.raises(ValueError, match=r"hparams\.feedback\.annotator_temperature has shape \(2,\), not a "
                                         r"scalar: map over the members' axis"):
        train(jax.random.key(0), grid)
    # Python numbers are range-checked by train itself (as by static_hparams), and every field's type too.
    good = static_hparams(config)
    with pytest.raises(ConfigError, match=r"hyper-parameter 'rl\.kl_coef': must be a finite number >= 0"):
        train(jax.random.key(0), good._replace(rl=good.rl._replace(kl_coef=-1.0)))
    with pytest.raises(ConfigError, match=r"'rl\.learning_rate': must be a number, got 'big'"):
        static_hparams(config, **{"rl.learning_rate": "big"})
    with pytest.raises(ConfigError, match=r"member 1: hyper-parameter 'feedback\.flip_prob': must be a"):
        stack_hparams([good, good._replace(feedback=good.feedback._replace(flip_prob=[0.1]))])
    # The SFT policy's sampling temperature has the sampler's floor, in the pipeline and in the demo.
    from jaxrlhf.experiments.demo_config import FeedbackStage
    from jaxrlhf.experiments.pipeline_config import PipelineFeedbackSection

    for section in (PipelineFeedbackSection, FeedbackStage):
        with pytest.raises(ValueError, match=r"\.temperature must be a finite number >= 0\.001"):
            section(temperature=5e-4)
    with pytest.raises(ConfigError, match=r"^rl\.iterations: fixes the compiled program's shape"):
        jax.jit(lambda n: replace_config(config, rl={"iterations": n}))(3)


@pytest.mark.slow
def test_without_a_usable_query_the_reward_head_stays_untrained(config):
    """A budget below one query (feedback.responses 0 or 1) leaves the reward model untrained: its
    backbone is the SFT policy's and its step metrics NaN (it trained on uniformly drawn unusable rows)."""
    pipeline = make_train(config).pipeline
    key = jax.random.key(3)
    sft = pipeline.stages.sft(key)
    hp = static_hparams(config, **{"feedback.responses": 1}).feedback

    @jax.jit
    def reward(sft_params):
        feedback = pipeline.stages.feedback(key, sft_params, hp)
        return feedback.metrics, pipeline.stages.reward_model(key, sft_params, feedback)

    metrics, out = reward(sft.params)
    assert float(metrics["feedback/queries"]) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), out.params.lm, sft.params)
    assert np.all(np.isnan(out.metrics["loss/reward"]))


def test_run_rl_takes_a_raw_uint32_key_as_a_typed_one():
    """train(jax.random.PRNGKey(0)), the raw-key spelling, failed in run_rl's key split (a reshape of the
    split keys); it now gives what the typed key gives."""
    import jax.numpy as jnp

    from jaxrlhf.experiments.pipeline_rl import RLMethod, run_rl
    from jaxrlhf.experiments.pipeline_stages import EvalPoint

    def step(state, key):
        draw = jax.random.uniform(key)
        return state + draw, {"draw": draw}

    method = RLMethod(init=lambda key: jax.random.uniform(key), step=step, policy=lambda state: state)
    evaluate = lambda policy: EvalPoint(*([policy] * len(EvalPoint._fields)))
    raw = jax.jit(lambda k: run_rl(method, evaluate, 6, 2, k))(jax.random.PRNGKey(5))
    typed = jax.jit(lambda k: run_rl(method, evaluate, 6, 2, k))(jax.random.key(5))
    jax.tree.map(np.testing.assert_array_equal, raw, typed)
    assert raw.metrics["draw"].shape == (6,) and float(jnp.std(raw.metrics["draw"])) > 0

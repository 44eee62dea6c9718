"""The RL config: each field defined once, the algorithms' own defaults, the KL estimator's default and the
refusal of k1 as a KL in the loss; the critic-free config's defaults and bad-input errors."""

import dataclasses

import pytest

from jaxrlhf.steps.rl_config import (
    A2CConfig,
    ActorCriticConfig,
    ClippedEpochsConfig,
    GRPOConfig,
    PGConfig,
    PPOConfig,
    RLConfig,
    RLOOConfig,
)

CLASSES = (RLConfig, ActorCriticConfig, ClippedEpochsConfig, PPOConfig, A2CConfig, PGConfig, GRPOConfig,
           RLOOConfig)


def own_fields(cls) -> set[str]:
    return {name for name in vars(cls).get("__annotations__", {}) if name != "ALGORITHM_DEFAULTS"}


def test_every_field_is_defined_once():
    for cls in CLASSES:
        inherited = set().union(*(own_fields(base) for base in cls.__mro__[1:] if base in CLASSES))
        assert not inherited & own_fields(cls), (cls.__name__, inherited & own_fields(cls))
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}
    assert names(A2CConfig) == names(ActorCriticConfig)
    # The critic-free configs carry nothing of a critic.
    critic = own_fields(ActorCriticConfig)
    assert not critic & {f.name for f in dataclasses.fields(GRPOConfig)}
    assert own_fields(GRPOConfig) == own_fields(RLOOConfig) == set()


def test_no_field_is_left_none_that_an_algorithm_must_set():
    for cls in (PPOConfig, A2CConfig, GRPOConfig, RLOOConfig):
        config = cls()
        for key in ("kl_in_reward", "lam", "vf_coef", "epochs", "advantage", "loss_agg"):
            assert getattr(config, key, 0) is not None, (cls.__name__, key)


def test_algorithm_defaults_fill_the_fields_left_none():
    assert (PPOConfig().lam, PPOConfig().vf_coef) == (0.95, 0.1)
    assert (A2CConfig().lam, A2CConfig().vf_coef) == (1.0, 0.5)
    assert A2CConfig(lam=0.9).lam == 0.9
    # A replaced config keeps the resolved value; None asks for the default again.
    assert dataclasses.replace(A2CConfig(), lam=None).lam == 1.0
    assert dataclasses.replace(PPOConfig(vf_coef=0.3), epochs=2).vf_coef == 0.3


def test_kl_estimator_defaults_to_k1_in_the_reward_and_k2_in_the_loss():
    assert PPOConfig().kl_estimator is None and PPOConfig().effective_kl_estimator == "k1"
    assert PPOConfig(kl_in_reward=False).effective_kl_estimator == "k2"
    assert PPOConfig(kl_in_reward=False, kl_estimator="k3").effective_kl_estimator == "k3"
    assert PPOConfig(kl_estimator="k2").effective_kl_estimator == "k2"
    # The default follows the placement, so moving the KL into the loss stays valid.
    assert dataclasses.replace(PPOConfig(), kl_in_reward=False).effective_kl_estimator == "k2"


def test_k1_in_the_loss_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"A2CConfig\.kl_estimator: k1 cannot be the KL in the loss .* "
                                         r"expected gradient is 0"):
        A2CConfig(kl_in_reward=False, kl_estimator="k1")
    with pytest.raises(ValueError, match="kl_estimator: expected k1, k2, k3 or null"):
        PPOConfig(kl_estimator="k4")


def test_critic_free_defaults_follow_the_papers():
    grpo, rloo = GRPOConfig(), RLOOConfig()
    assert (grpo.advantage, grpo.kl_in_reward, grpo.effective_kl_estimator, grpo.loss_agg, grpo.epochs) == (
        "grpo", False, "k2", "sequence_mean", 1)
    assert (rloo.advantage, rloo.kl_in_reward, rloo.effective_kl_estimator, rloo.loss_agg) == (
        "rloo", True, "k1", "token_sum_norm")
    assert PPOConfig().epochs == 4 and PPOConfig().clip_eps_high is None
    assert GRPOConfig(advantage="remax").greedy_baseline and not grpo.greedy_baseline


@pytest.mark.parametrize("kwargs, message", [
    ({"group_size": 1}, r"GRPOConfig\.group_size: 1 is below 2, but the 'grpo' baseline"),
    ({"group_size": 1, "advantage": "rloo"}, r"group_size: 1 is below 2"),
    ({"group_size": 1, "advantage": "reinforce_pp_baseline"}, r"group_size: 1 is below 2"),
    ({"group_size": 1, "advantage": "reinforce_pp", "dynamic_sampling": True}, r"dynamic_sampling compares"),
    ({"advantage": "a2c"}, r"GRPOConfig\.advantage: expected one of grpo, dr_grpo"),
    ({"ratio": "none", "epochs": 2}, r"GRPOConfig\.ratio: 'none' .* first minibatch only"),
    ({"ratio": "sequence", "loss_agg": "token_mean"}, r"GRPOConfig\.loss_agg: GSPO"),
    ({"loss_agg": "mean"}, r"GRPOConfig\.loss_agg: expected one of"),
    ({"overlong_buffer": -1}, r"overlong_buffer must be >= 0"),
    ({"kl_estimator": "k1"}, r"GRPOConfig\.kl_estimator: k1 cannot be the KL in the loss"),
    ({"epochs": 0}, r"epochs \(0\) and num_minibatches"),
    # group_size: a whole number >= 1 whatever the estimator (the "below 2" text only where a group is used)
    ({"group_size": 0, "advantage": "remax"}, r"group_size must be a whole number >= 1, got 0"),
    ({"group_size": 2.5}, r"group_size must be a whole number >= 1, got 2\.5"),
    ({"clip_eps": 0.2, "clip_eps_high": 0.1}, r"clip_eps_high must be >= clip_eps \(0\.2\)"),
    ({"dual_clip": 0.5}, r"GRPOConfig\.dual_clip must be a finite number > 1, got 0\.5"),
    ({"dual_clip": -3.0}, r"dual_clip must be a finite number > 1"),
    ({"target_kl_early_stop": -1.0}, r"target_kl_early_stop must be a finite number > 0"),
    ({"entropy_coef": float("nan")}, r"entropy_coef must be a finite number, got nan"),
    ({"missing_eos_penalty": float("inf")}, r"missing_eos_penalty must be a finite number"),
    ({"overlong_penalty": -1.0}, r"overlong_penalty must be a finite number >= 0"),
    ({"kl_horizon": float("nan")}, r"kl_horizon must be >= 1, got nan"),
    # Settings the chosen ratio would ignore are refused, not dropped.
    ({"ratio": "sequence", "dual_clip": 3.0}, r"GRPOConfig\.dual_clip: GSPO's sequence ratio"),
    ({"ratio": "none", "clip_eps_high": 0.28}, r"GRPOConfig\.clip_eps_high: ratio: none"),
])
def test_critic_free_bad_input_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kwargs)


def test_a_numpy_integer_group_size_is_a_whole_number():
    """Built from code (a sweep over np.arange, say), np.int64(4) is as whole as 4."""
    import numpy as np

    assert GRPOConfig(group_size=np.int64(4)).group_size == 4
    with pytest.raises(ValueError, match=r"group_size must be a whole number >= 1, got np\.float64\(4\.0\)"):
        GRPOConfig(group_size=np.float64(4.0))


def test_estimators_without_a_group_accept_one_sample_per_prompt():
    assert GRPOConfig(group_size=1, advantage="reinforce_pp").group_size == 1
    assert RLOOConfig(group_size=1, advantage="remax", ratio="none").advantage == "remax"
    assert RLOOConfig(kl_estimator="k1").effective_kl_estimator == "k1"  # k1 in the reward is fine


@pytest.mark.parametrize("cls,kwargs,message", [
    (PPOConfig, {"logprobs_from": "sampler"}, "logprobs_from"),
    (PPOConfig, {"tis_cap": 0.0}, "tis_cap must be > 0"),
    (PPOConfig, {"tis_cap": 2.0, "logprobs_from": "rollout"}, "logprobs_from: recompute"),
    (GRPOConfig, {"tis_cap": 2.0, "ratio": "sequence"}, "sequence ratio"),
    (PPOConfig, {"vf_clip_eps": -0.2}, r"PPOConfig\.vf_clip_eps must be > 0 \(null: unclipped\)"),
    (PPOConfig, {"vf_clip_eps": float("nan")}, r"vf_clip_eps must be > 0"),
])
def test_logprob_source_and_tis_bad_input(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)

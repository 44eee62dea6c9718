"""The RL config: each field defined once, the algorithms' own defaults, the KL estimator's default and the
refusal of k1 as a KL in the loss."""

import dataclasses

import pytest

from jaxrlhf.steps.rl_config import A2CConfig, PPOConfig, RLConfig


def test_every_field_is_defined_once():
    shared = {f.name for f in dataclasses.fields(RLConfig)}
    for cls in (PPOConfig, A2CConfig):
        own = [name for name in vars(cls).get("__annotations__", {}) if name != "ALGORITHM_DEFAULTS"]
        assert not shared & set(own), (cls.__name__, shared & set(own))
    assert {f.name for f in dataclasses.fields(A2CConfig)} == shared


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

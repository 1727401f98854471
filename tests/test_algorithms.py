"""Key checks: today's names pass, the guide's old names translate, typos name the closest key."""

from __future__ import annotations

import logging

import pytest

from rl_pbt.algorithms import OLD_NAMES, translate_keys, valid_keys
from rl_pbt.errors import ConfigError

PPO = "ray.rllib.algorithms.ppo.PPOConfig"


def test_todays_names_are_valid():
    keys = valid_keys(PPO)
    for key in ("lr", "lambda", "clip_param", "kl_coeff", "num_epochs", "minibatch_size",
                "train_batch_size_per_learner", "num_env_runners", "num_envs_per_env_runner",
                "num_cpus_for_main_process", "num_gpus_per_learner", "entropy_coeff",
                "_model_config"):
        assert key in keys, key


@pytest.mark.parametrize(("old", "new"), sorted(OLD_NAMES.items()))
def test_old_names_translate_with_a_warning(old, new, caplog):
    with caplog.at_level(logging.WARNING):
        out = translate_keys({old: 1}, PPO, "algorithm.config")
    assert out == {new: 1}
    assert f"algorithm.config.{old} is an old RLlib name; using {new}" in caplog.text


@pytest.mark.parametrize(
    ("key", "closest"),
    [("clip_parm", "clip_param"), ("num_epoch", "num_epochs"), ("lamda", "lambda"),
     ("minibatch_sise", "minibatch_size")],
)
def test_unknown_key_names_the_closest(key, closest):
    with pytest.raises(ConfigError, match=f"algorithm.config.{key}: unknown key.*'{closest}'"):
        translate_keys({key: 1}, PPO, "algorithm.config")


@pytest.mark.parametrize("key", ["vf_share_layers", "sgd_minibatch_size"])
def test_keys_rllib_stores_but_ignores_are_rejected(key):
    """RLlib keeps these in to_dict() with DEPRECATED_VALUE and never reads them."""
    assert key not in valid_keys(PPO)


def test_old_and_new_name_together_is_an_error():
    with pytest.raises(ConfigError, match="keep only num_epochs"):
        translate_keys({"num_sgd_iter": 3, "num_epochs": 4}, PPO, "algorithm.config")


def test_env_is_managed_by_the_env_group():
    with pytest.raises(ConfigError, match=r"algorithm\.config\.env: unknown key"):
        translate_keys({"env": "CartPole-v1"}, PPO, "algorithm.config")

"""Key checks: today's names pass, the guide's old names translate, typos name the closest key."""

from __future__ import annotations

import logging

import pytest
from conftest import compose_config, config_error

from rl_pbt.algorithms import OLD_NAMES, translate_keys, valid_keys
from rl_pbt.errors import ConfigError
from rl_pbt.resolve import resolve

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


def test_an_old_name_beside_todays_wins_and_two_other_names_are_an_error():
    assert translate_keys({"num_sgd_iter": 3, "num_epochs": 4}, PPO, "algorithm.config") == {
        "num_epochs": 3}
    with pytest.raises(ConfigError, match="model and model_config both set; keep only "
                                          "_model_config"):
        translate_keys({"model": {}, "model_config": {}}, PPO, "algorithm.config")


def test_env_is_managed_by_the_env_group():
    with pytest.raises(ConfigError, match=r"algorithm\.config\.env: unknown key"):
        translate_keys({"env": "CartPole-v1"}, PPO, "algorithm.config")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [(["+algorithm.config.num_sgd_iter=5", "mutations.start=config",
       "~mutations.hyperparams.num_epochs"], {"num_epochs": 5}),
     (["+algorithm.config.train_batch_size=4000", "+algorithm.config.sgd_minibatch_size=64"],
      {"train_batch_size_per_learner": 4000, "minibatch_size": 64}),
     (["+algorithm.config.lambda_=0.9", "mutations.start=config",
       "~mutations.hyperparams.lambda"], {"lambda": 0.9})],
)
def test_an_old_name_added_over_the_yamls_key_is_used(overrides, expected, tmp_path, caplog):
    """The README's name table: the YAML sets today's names, so a guide's old name failed as
    'both set' for num_sgd_iter, sgd_minibatch_size and train_batch_size."""
    plan = resolve(compose_config(overrides), tmp_path, choices={"env": "cartpole"},
                   launch_dir=tmp_path)
    assert {key: plan.param_space[key] for key in expected} == expected
    assert "replaces" in caplog.text


@pytest.mark.parametrize("override", ["+algorithm.config.num_envs_per_worker=4",
                                      "+algorithm.config.num_envs_per_env_runner=4"])
def test_a_resources_key_set_in_algorithm_config_is_refused_not_overwritten(override, tmp_path):
    """resources.config won silently while the old name's warning said it was used."""
    assert config_error([override], tmp_path) == (
        "algorithm.config.num_envs_per_env_runner=4 conflicts with resources.config."
        "num_envs_per_env_runner=16, which sets how trials run on the machine; set "
        "resources.config.num_envs_per_env_runner=4 instead")

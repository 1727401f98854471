"""The PBT-ready trainable reports what RLlib's own PPO reports: the same result keys, before
and after an exploit's in-place rebuild, plus rl_pbt's probes; the batched env loop leaves out
only the timers of the connector pipeline it replaces."""

from __future__ import annotations

import pytest

from rl_pbt.trainable import PROBE, pbt_trainable

pytestmark = pytest.mark.slow

CONFIG = {"env": "CartPole-v1", "num_env_runners": 0, "num_envs_per_env_runner": 2,
          "train_batch_size_per_learner": 200, "minibatch_size": 100, "num_epochs": 2,
          "_model_config": {"fcnet_hiddens": [8]}}
#: RLlib's module-to-env connector pipeline, which rl_pbt's batched loop does in one step.
REPLACED_TIMERS = "env_runners/module_to_env_connector/"


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        name = f"{prefix}{key}"
        keys |= _keys(value, f"{name}/") if isinstance(value, dict) and value else {name}
    return keys


def _second_result(algo) -> dict:
    algo.train()  # the first result lacks keys that appear once an episode has ended
    return algo.train()


def test_results_have_rllibs_keys_before_and_after_an_exploit(ray_session, tmp_path):
    from ray.rllib.algorithms.ppo import PPO

    stock = PPO(config=CONFIG)
    theirs = _keys(_second_result(stock))
    stock.stop()
    ours_algo = pbt_trainable("ray.rllib.algorithms.ppo.PPO")(config=CONFIG)
    ours = _keys(_second_result(ours_algo))
    assert theirs - ours, "the batched loop should not run RLlib's connector timers"
    assert all(key.startswith(REPLACED_TIMERS) for key in theirs - ours), theirs - ours
    assert {key.split("/")[0] for key in ours - theirs} == {PROBE}
    # An exploit: the config rebuilt in the same process, then a checkpoint restored.
    saved = ours_algo.save(str(tmp_path / "ckpt")).checkpoint.path
    assert ours_algo.reset_config({**CONFIG, "lr": 1e-4, "num_epochs": 3})
    ours_algo.restore(saved)
    after = ours_algo.train()
    assert after[PROBE]["restored"]
    assert _keys(after) == ours
    ours_algo.stop()

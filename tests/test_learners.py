"""The PBT-ready trainable's learner steps Adam with the fused kernel, also after a restore."""

from __future__ import annotations

import pytest
import torch

from rl_pbt.learners import FusedAdamPPOLearner
from rl_pbt.trainable import _local_learner, pbt_trainable

pytestmark = pytest.mark.slow


def _optimizers(algo):
    return list(_local_learner(algo)._named_optimizers.values())


def test_fused_adam_trains_saves_and_restores(ray_session, tmp_path):
    trainable = pbt_trainable("ray.rllib.algorithms.ppo.PPO")
    config = {"env": "CartPole-v1", "num_env_runners": 0, "num_envs_per_env_runner": 2,
              "train_batch_size_per_learner": 200, "minibatch_size": 100, "num_epochs": 2,
              "_model_config": {"fcnet_hiddens": [8]}, "lr": 1e-3}
    algo = trainable(config=config)
    assert isinstance(_local_learner(algo), FusedAdamPPOLearner)
    assert all(g["fused"] for opt in _optimizers(algo) for g in opt.param_groups)
    result = algo.train()
    assert result["rl_pbt"]["digest_start"] != result["rl_pbt"]["digest_end"]  # it learned
    saved = algo.save(str(tmp_path / "ckpt")).checkpoint.path
    clone = trainable(config={**config, "lr": 5e-4})
    clone.restore(saved)
    assert all(g["fused"] for opt in _optimizers(clone) for g in opt.param_groups)
    for ours, theirs in zip(_optimizers(clone), _optimizers(algo), strict=True):
        for a, b in zip(ours.state.values(), theirs.state.values(), strict=True):
            torch.testing.assert_close(a["exp_avg"], b["exp_avg"])
    after = clone.train()["rl_pbt"]
    assert after["lr_first_update"] == pytest.approx(5e-4)  # the clone's own lr, not the saved
    algo.stop()
    clone.stop()


def test_a_checkpoint_of_rllibs_own_adam_restores_fused(ray_session, tmp_path):
    """torch takes ``fused`` from the saved param groups: RLlib's Adam saved it False."""
    from ray.rllib.algorithms.ppo import PPO

    config = {"env": "CartPole-v1", "num_env_runners": 0, "num_envs_per_env_runner": 2,
              "train_batch_size_per_learner": 200, "minibatch_size": 100, "num_epochs": 1,
              "_model_config": {"fcnet_hiddens": [8]}}
    stock = PPO(config=config)
    stock.train()
    saved = stock.save(str(tmp_path / "stock")).checkpoint.path
    stock.stop()
    algo = pbt_trainable("ray.rllib.algorithms.ppo.PPO")(config=config)
    algo.restore(saved)
    assert all(g["fused"] for opt in _optimizers(algo) for g in opt.param_groups)
    assert algo.train()["rl_pbt"]["updates"] > 0
    algo.stop()

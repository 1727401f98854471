"""The PBT-ready trainable's learner: Adam with the fused kernel (also after a restore), and
RLlib's PPO update in fewer operations with the same result."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rl_pbt.learners import FusedAdamPPOLearner, LeanPPOLearner
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
    assert isinstance(_local_learner(algo), LeanPPOLearner)
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


def _learner_pair(env: str, **training) -> tuple:
    """RLlib's update (with the same fused Adam) and rl_pbt's lean one, same weights, and a
    sample of episodes (PPO's learner connector changes episodes: each update gets a copy)."""
    from ray.rllib.algorithms.ppo import PPOConfig

    from rl_pbt.sampler import FastEnvRunner

    config = (PPOConfig().environment(env)
              .env_runners(num_env_runners=0, num_envs_per_env_runner=4)
              .training(num_epochs=3, minibatch_size=96, train_batch_size_per_learner=500,
                        **training)
              .rl_module(model_config={"fcnet_hiddens": [16, 16]}).debugging(seed=2))
    runner = FastEnvRunner(config=config)
    spaces = (runner.env.single_observation_space, runner.env.single_action_space)
    learners = [config.copy(copy_frozen=False).learners(learner_class=cls).build_learner(
        env=None, spaces={"__env__": spaces, "default_policy": spaces})
        for cls in (FusedAdamPPOLearner, LeanPPOLearner)]
    learners[1].module.set_state(learners[0].module.get_state())
    episodes = runner.sample(num_timesteps=500)
    runner.stop()
    return learners, episodes


def _update_twice(learner, episodes) -> tuple[dict, float]:
    np.random.seed(11)
    torch.manual_seed(11)
    for _ in range(2):
        results = learner.update(episodes=copy.deepcopy(episodes), num_epochs=3,
                                 minibatch_size=96, shuffle_batch_per_epoch=True,
                                 timesteps={"num_env_steps_sampled_lifetime": 500})
    return _flat(results), np.random.rand()


def _flat(tree: dict, prefix: tuple = ()) -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value.peek() if hasattr(value, "peek") else value
    return flat


@pytest.mark.parametrize(("env", "training"), [
    ("CartPole-v1", {}),  # PPO's defaults: KL term on, no entropy term
    ("CartPole-v1", {"entropy_coeff": [[0, 0.0], [1_000_000, 0.0]]}),  # a 0-d tensor, zero
    ("CartPole-v1", {"entropy_coeff": 0.01}),
    ("CartPole-v1", {"use_kl_loss": False, "grad_clip": 0.5}),
    ("Pendulum-v1", {"entropy_coeff": 0.01}),
])
def test_the_lean_update_is_rllibs_update(ray_session, env, training):
    """Same minibatches (and numpy draws after them), same loss, same steps: a categorical
    policy ends with bit-identical weights; a Gaussian one (RLlib's distribution classes,
    their operations on other memory layouts) within float rounding. Every metric RLlib
    reports is there with its value (timers aside)."""
    (theirs, ours), episodes = _learner_pair(env, **training)
    their_metrics, their_draw = _update_twice(theirs, episodes)
    our_metrics, our_draw = _update_twice(ours, episodes)
    assert ours.lean_update_reason is None
    assert ours._flat_modules["default_policy"][1] is not None  # the flat training pass ran
    # Every gradient step was the lean one (none handed to RLlib's), as many as RLlib took.
    (their_adam,) = theirs._named_optimizers.values()
    assert ours.lean_steps == int(next(iter(their_adam.state.values()))["step"]) > 0
    assert our_draw == their_draw
    their_weights = theirs.module.get_state()["default_policy"]
    our_weights = ours.module.get_state()["default_policy"]
    for name, value in their_weights.items():
        if env == "CartPole-v1":
            assert np.array_equal(our_weights[name], value), name
        else:
            np.testing.assert_allclose(our_weights[name], value, rtol=1e-5, atol=1e-6)
    assert our_metrics.keys() == their_metrics.keys()
    for key, value in their_metrics.items():
        if not any("timer" in part or "throughput" in part for part in key):
            np.testing.assert_allclose(our_metrics[key], value, rtol=1e-5, err_msg=str(key))


def test_a_custom_loss_or_a_nan_gradient_goes_rllibs_way(ray_session):
    """A subclass with its own loss runs RLlib's update; a nan gradient is zeroed as RLlib
    zeroes it (the single finiteness check finds it and hands over)."""
    (theirs, ours), episodes = _learner_pair("CartPole-v1")
    for learner in (theirs, ours):  # same weights, fresh optimizers
        grads = {pid: torch.ones_like(p) for pid, p in learner._params.items()}
        first = next(iter(grads))
        grads[first] = torch.full_like(grads[first], float("nan"))
        learner.apply_gradients(grads)
        assert torch.isfinite(learner._params[first]).all()
    for name, value in theirs.module.get_state()["default_policy"].items():
        assert np.array_equal(ours.module.get_state()["default_policy"][name], value), name

    class OwnLoss(LeanPPOLearner):
        def compute_loss_for_module(self, **kwargs):
            return super().compute_loss_for_module(**kwargs) * 1.0

    custom = OwnLoss.__new__(OwnLoss)
    custom.__dict__.update(ours.__dict__)
    custom.update(episodes=copy.deepcopy(episodes), num_epochs=1, minibatch_size=96,
                  timesteps={"num_env_steps_sampled_lifetime": 500})
    assert custom.lean_update_reason == "a custom loss"


def test_learner_rllib_keeps_rllibs_update(ray_session):
    """``learner=rllib``: RLlib's update (Adam still fused), and the probe says so."""
    config = {"env": "CartPole-v1", "num_env_runners": 0, "num_envs_per_env_runner": 2,
              "train_batch_size_per_learner": 200, "minibatch_size": 100, "num_epochs": 1,
              "_model_config": {"fcnet_hiddens": [8]}}
    for lean in (False, True):
        algo = pbt_trainable("ray.rllib.algorithms.ppo.PPO", lean_learner=lean)(config=config)
        expected = LeanPPOLearner if lean else FusedAdamPPOLearner
        assert type(_local_learner(algo)) is expected
        assert algo.train()["rl_pbt"]["lean_update"] is lean
        algo.stop()


def test_a_seeded_trial_starts_without_torchs_compiler(ray_session, tmp_path):
    """In a new process, as Tune starts a trial: set-up with a seed, training, a checkpoint and
    a restore leave TorchDynamo unimported (``rl_pbt.optimizers``, ``rl_pbt.seeding``: 1.1 s
    of each trial's start each), and torch's determinism flag is on as RLlib's seeding sets it."""
    import ray

    config = {"env": "CartPole-v1", "num_env_runners": 0, "num_envs_per_env_runner": 2,
              "train_batch_size_per_learner": 200, "minibatch_size": 100, "num_epochs": 1,
              "_model_config": {"fcnet_hiddens": [8]}, "seed": 3}

    # A runtime env of its own: a new worker process, never one an earlier test imported into.
    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"RL_PBT_TEST_NEW_WORKER": "1"}})
    def train_save_restore(path: str) -> tuple[bool, bool, bool]:
        import sys

        import torch as worker_torch

        algo = pbt_trainable("ray.rllib.algorithms.ppo.PPO")(config=config)
        learned = algo.train()["rl_pbt"]["updates"] > 0
        algo.restore(algo.save(path).checkpoint.path)
        algo.stop()
        return ("torch._dynamo" in sys.modules, worker_torch.are_deterministic_algorithms_enabled(),
                learned)

    imported, deterministic, learned = ray.get(train_save_restore.remote(str(tmp_path / "c")))
    assert (imported, deterministic, learned) == (False, True, True)


def test_a_compiled_learner_steps_with_torchs_adam(ray_session):
    """RLlib's compiled update needs the graph breaks of torch's optimizer wrappers, which
    EagerAdam skips: with ``torch_compile_learner`` the learner takes torch's own Adam, runs
    RLlib's update (not the lean one) and learns."""
    from rl_pbt.optimizers import EagerAdam

    config = {"env": "CartPole-v1", "num_env_runners": 0, "num_envs_per_env_runner": 2,
              "train_batch_size_per_learner": 200, "minibatch_size": 100, "num_epochs": 1,
              "_model_config": {"fcnet_hiddens": [8]}}
    trainable = pbt_trainable("ray.rllib.algorithms.ppo.PPO")
    for compiled, expected in ((False, EagerAdam), (True, torch.optim.Adam)):
        algo = trainable(config={**config, "torch_compile_learner": compiled})
        assert [type(o) for o in _optimizers(algo)] == [expected]
        if compiled:
            probe = algo.train()["rl_pbt"]
            assert probe["lean_update"] is False
            assert probe["digest_start"] != probe["digest_end"]
        algo.stop()

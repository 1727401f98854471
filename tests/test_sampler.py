"""rl_pbt's batched env loop returns exactly the episodes RLlib's loop returns, and leaves the
cases it does not reproduce to RLlib's loop."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.connectors.env_to_module import FlattenObservations
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from rl_pbt.sampler import FastEnvRunner
from rl_pbt.trainable import pbt_trainable

#: Sample calls of different sizes, so chunks are cut mid-episode and episodes end inside.
CALLS = (300, 500, 7, 260)


def _config(env: str, **settings) -> PPOConfig:
    config = (PPOConfig().environment(env)
              .env_runners(num_env_runners=0, num_envs_per_env_runner=4)
              .rl_module(model_config={"fcnet_hiddens": [16]}).debugging(seed=3))
    for key, value in settings.items():
        setattr(config, key, value)
    return config


def _sample_both(config: PPOConfig, **kwargs) -> tuple[list, list, list]:
    """The same weights, env seeds and torch seeds through RLlib's runner and rl_pbt's."""
    runners = [cls(config=config) for cls in (SingleAgentEnvRunner, FastEnvRunner)]
    runners[1].module.load_state_dict(runners[0].module.state_dict())
    samples = []
    for runner in runners:
        chunks = []
        for size in CALLS:
            torch.manual_seed(size)
            chunks.append(runner.sample(num_timesteps=size, **kwargs))
        samples.append(chunks)
    return samples[0], samples[1], runners


def _assert_same_episodes(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.t_started, a.t, a.is_terminated, a.is_truncated, a.is_numpy) == (
            b.t_started, b.t, b.is_terminated, b.is_truncated, b.is_numpy)
        columns = {"observations": (a.observations, b.observations),
                   "actions": (a.actions, b.actions), "rewards": (a.rewards, b.rewards)}
        assert a.extra_model_outputs.keys() == b.extra_model_outputs.keys()
        columns.update({k: (a.extra_model_outputs[k], b.extra_model_outputs[k])
                        for k in a.extra_model_outputs})
        for name, (x, y) in columns.items():
            assert x.lookback == y.lookback, name
            assert x.data.dtype == y.data.dtype, name
            np.testing.assert_array_equal(x.data, y.data, err_msg=name)
        assert list(a.infos) == list(b.infos)


def _continued_ids(chunks: list[list]) -> list[int]:
    """For each sample after the first: how many of its chunks continue an earlier chunk."""
    counts = []
    for before, after in pairwise(chunks):
        ids = {e.id_ for e in before}
        counts.append(sum(e.id_ in ids for e in after if e.t_started > 0))
    return counts


@pytest.mark.parametrize("env, settings", [
    ("CartPole-v1", {}),
    ("CartPole-v1", {"normalize_actions": False}),
    ("Pendulum-v1", {}),  # actions unsquashed into the env's bounds
    ("Pendulum-v1", {"normalize_actions": False, "clip_actions": True}),
])
def test_fast_loop_returns_rllibs_episodes(env, settings):
    theirs, ours, runners = _sample_both(_config(env, **settings))
    assert runners[1].fast_path, runners[1].fast_path_reason
    assert runners[1]._flat[1] is not None  # the flat forward pass was the one used
    assert sum(e.is_done for chunk in theirs for e in chunk) >= 4  # episodes ended inside
    for a, b in zip(ours, theirs, strict=True):
        _assert_same_episodes(a, b)
    assert _continued_ids(ours) == _continued_ids(theirs)
    assert sum(_continued_ids(ours)) > 0  # chunks cut mid-episode were continued
    metrics = [r.get_metrics() for r in runners]
    for key in ("episode_return_mean", "episode_len_mean", "num_episodes",
                "num_env_steps_sampled", "num_env_steps_sampled_lifetime"):
        assert metrics[1][key].peek() == metrics[0][key].peek(), key


def test_other_sampling_modes_go_through_rllibs_loop():
    """Greedy actions and whole episodes are RLlib's loop, before and after fast samples."""
    config = _config("CartPole-v1")
    runner = FastEnvRunner(config=config)
    reference = SingleAgentEnvRunner(config=config)
    reference.module.load_state_dict(runner.module.state_dict())
    calls = ({"num_timesteps": 70}, {"num_timesteps": 50, "explore": False},
             {"num_timesteps": 90}, {"num_episodes": 3}, {"num_timesteps": 120})
    results = {}
    for sampler in (runner, reference):
        results[sampler] = []
        for seed, kwargs in enumerate(calls):
            torch.manual_seed(seed)
            results[sampler].append(sampler.sample(**kwargs))
            if sampler is runner:
                assert runner.last_sample_fast == (kwargs.get("explore", True)
                                                   and "num_timesteps" in kwargs)
    for ours, theirs in zip(results[runner], results[reference], strict=True):
        _assert_same_episodes(ours, theirs)


class RecordingCallbacks(RLlibCallback):
    """Every episode callback, with what the callback can see of all the runner's episodes."""

    def _record(self, hook, *, episode, env_runner, env_index, **_):
        seen = tuple((e.t, e.is_done) for e in env_runner._ongoing_episodes)
        env_runner.calls.append((hook, env_index, episode.t, episode.is_done, seen))

    def on_episode_start(self, **kwargs):
        self._record("start", **kwargs)

    def on_episode_step(self, **kwargs):
        self._record("step", **kwargs)

    def on_episode_end(self, **kwargs):
        self._record("end", **kwargs)


def test_episode_callbacks_see_what_they_see_in_rllibs_loop():
    config = _config("CartPole-v1").callbacks(RecordingCallbacks)
    runners = [cls(config=config) for cls in (SingleAgentEnvRunner, FastEnvRunner)]
    runners[1].module.load_state_dict(runners[0].module.state_dict())
    for runner in runners:
        runner.calls = []
        torch.manual_seed(0)
        runner.sample(num_timesteps=200)
    assert runners[1].fast_path
    assert sum(c[0] == "end" for c in runners[0].calls) >= 2
    assert runners[1].calls == runners[0].calls


def test_fast_loop_samples_in_eval_mode():
    """As RLlib's forward_exploration: no dropout or batch-norm updates while sampling."""
    runner = FastEnvRunner(config=_config("CartPole-v1"))
    modes = []
    layer = next(m for m in runner.module.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    runner.module.train()  # e.g. a caller switched it back
    runner.sample(num_timesteps=20)
    assert runner.last_sample_fast and modes and not any(modes)


@pytest.mark.parametrize("settings, reason", [
    ({"model_config": {"fcnet_hiddens": [16], "use_lstm": True}}, "stateful module"),
    ({"_env_to_module_connector": lambda env, spaces=None, device=None: FlattenObservations()},
     "custom connectors ['FlattenObservations']"),
])
def test_fast_loop_steps_aside_where_it_does_not_reproduce_rllib(settings, reason):
    config = _config("CartPole-v1")
    for key, value in settings.items():
        if key == "model_config":
            config.rl_module(model_config=value)
        else:
            setattr(config, key, value)
    runner = FastEnvRunner(config=config)
    assert runner.fast_path_reason == reason
    assert sum(map(len, runner.sample(num_timesteps=40))) >= 40


def test_pbt_ready_trainable_samples_with_the_fast_loop_unless_told_otherwise():
    trainable = pbt_trainable("ray.rllib.algorithms.ppo.PPO")
    assert trainable.get_default_config().env_runner_cls is FastEnvRunner
    rllibs = pbt_trainable("ray.rllib.algorithms.ppo.PPO", batched_sampler=False)  # sampler=rllib
    assert rllibs.get_default_config().env_runner_cls is None
    config = trainable.get_default_config().update_from_dict(
        {"env_runner_cls": SingleAgentEnvRunner})
    assert config.env_runner_cls is SingleAgentEnvRunner

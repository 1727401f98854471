"""A plain Ray Tune script that starts the same 4 PPO trials as ``python -m rl_pbt``.

The start-up reference of ``scripts/benchmark.py``: no Hydra, no checks, no MLflow; it prints
the wall-clock time of the first trial result as JSON on its last line.
"""

from __future__ import annotations

import json
import sys
import time

import ray
from ray import tune
from ray.rllib.algorithms.ppo import PPOConfig


class FirstResult(tune.Callback):
    """Remember when the first result arrived."""

    first_result_at: float | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.first_result_at is None:
            self.first_result_at = time.time()


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=16)
        .training(lr=tune.loguniform(1e-4, 1e-3), train_batch_size_per_learner=2000,
                  minibatch_size=256, num_epochs=6)
        .rl_module(model_config={"fcnet_hiddens": [64, 64]})
    )
    first = FirstResult()
    tune.Tuner(
        "PPO",
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=4),
        run_config=tune.RunConfig(stop={"training_iteration": 1}, callbacks=[first], verbose=0),
    ).fit()
    print(json.dumps({"first_result_at": first.first_result_at}))


if __name__ == "__main__":
    main()

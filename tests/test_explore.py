"""The explore step: PBT's perturbations clamped into bounds, ints kept, invariants kept."""

from __future__ import annotations

import random

import pytest
from ray.tune.schedulers.pbt import _explore

from rl_pbt.algorithms import ppo_invariants
from rl_pbt.distributions import Grid, LogRandInt, LogUniform, RandInt, Uniform
from rl_pbt.explore import Explore

SEED_TABLE = {
    "lambda": Uniform(0.9, 1.0),
    "clip_param": Uniform(0.01, 0.5),
    "lr": Grid([1e-3, 5e-4, 1e-4, 5e-5, 1e-5]),
    "num_epochs": RandInt(1, 30),
    "minibatch_size": RandInt(128, 16384),
    "train_batch_size_per_learner": RandInt(2000, 160000),
}


@pytest.mark.parametrize("seed", range(5))
def test_repeated_perturbation_stays_in_bounds_and_valid(seed):
    """Walk 200 explore steps from an edge-of-range config, as a long PBT run would."""
    random.seed(seed)
    explore = Explore(SEED_TABLE, ppo_invariants)
    mutations = {k: d.for_pbt() for k, d in SEED_TABLE.items()}
    config = {"lambda": 1.0, "clip_param": 0.5, "lr": 1e-4, "num_epochs": 30,
              "minibatch_size": 16384, "train_batch_size_per_learner": 2000}
    for _ in range(200):
        config, _ = _explore(config, mutations, 0.25, (1.2, 0.8), explore)
        for key, dist in SEED_TABLE.items():
            assert dist.low <= config[key] <= dist.high, (key, config[key])
        for key in ("num_epochs", "minibatch_size", "train_batch_size_per_learner"):
            assert isinstance(config[key], int), (key, config[key])
        assert 1 <= config["minibatch_size"] <= config["train_batch_size_per_learner"]
        assert config["num_epochs"] >= 1
        assert config["lr"] in SEED_TABLE["lr"].values


def test_without_clamping_pbt_leaves_the_range():
    """Why the explore step exists: Ray's x1.2 / x0.8 walks out of the declared range."""
    random.seed(0)
    mutations = {"lambda": Uniform(0.9, 1.0)}
    config = {"lambda": 1.0}
    seen = []
    for _ in range(50):
        config, _ = _explore(config, mutations, 0.0, (1.2, 0.8), None)
        seen.append(config["lambda"])
    assert any(not 0.9 <= v <= 1.0 for v in seen)


def test_log_scale_values_stay_positive_and_bounded():
    random.seed(3)
    table = {"lr": LogUniform(1e-5, 1e-2), "minibatch_size": LogRandInt(64, 1024)}
    explore = Explore(table, ppo_invariants)
    config = {"lr": 1e-2, "minibatch_size": 64, "train_batch_size_per_learner": 100}
    for _ in range(100):
        config, _ = _explore(config, table, 0.25, (1.2, 0.8), explore)
        assert 1e-5 <= config["lr"] <= 1e-2
        assert 64 <= config["minibatch_size"] <= 100


def test_ppo_invariants_repair_minibatch_and_epochs():
    fixed = ppo_invariants({"minibatch_size": 5000, "train_batch_size_per_learner": 4000.4,
                            "num_epochs": 0})
    assert fixed == {"minibatch_size": 4000, "train_batch_size_per_learner": 4000,
                     "num_epochs": 1}

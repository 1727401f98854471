"""Synchronous PBT keeps every trial to the end when an exploit meets a save in flight.

Ray caches a STOP for a trial that synchronous PBT exploits while its pause-save is running, and
the next periodic checkpoint runs it (Ray #57906). With Ray's own ``PopulationBasedTraining`` the
setup below ends one trial at iteration 3 of 8 (3 of 3 runs here); rl_pbt's scheduler must not.
A cheap Trainable makes the race certain in seconds, without RLlib: the worse trial steps fast
and reports first at each perturbation point, and its pause-save there takes 4 s, so the better
trial reports (and PBT exploits the worse one) while that save is in flight, whatever the
actors' start-up stagger.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ray import tune

from rl_pbt import schedulers
from rl_pbt.schedulers import RecordingPBT

ITERATIONS = 8
pytestmark = pytest.mark.slow  # a real Tune run with 4 s saves


def slow_save_trainable() -> type:
    """The Trainable, made inside a function so Ray ships it by value (workers cannot import
    this test module)."""

    class SlowSave(tune.Trainable):
        """Adds ``rate`` per step; a slow save where PBT pauses it to wait for the other."""

        def setup(self, config: dict) -> None:
            self.total = 0.0

        def step(self) -> dict:
            time.sleep(0.05 if self.config["rate"] < 1 else 0.6)  # the worse trial is first
            self.total += self.config["rate"]
            return {"score": self.total}

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            time.sleep(4.0 if self.iteration % 2 == 0 else 0.1)  # slow at perturbation points
            (Path(checkpoint_dir) / "state.json").write_text(json.dumps({"total": self.total}))

        def load_checkpoint(self, checkpoint_dir: str) -> None:
            self.total = json.loads((Path(checkpoint_dir) / "state.json").read_text())["total"]

        def reset_config(self, new_config: dict) -> bool:
            return True

    return SlowSave


def test_exploit_during_a_save_does_not_end_the_trial(ray_session, tmp_path, monkeypatch):
    drop, dropped = schedulers._drop_stale_stop, []

    def counting(tune_controller, trial):
        dropped.append(drop(tune_controller, trial))
        return dropped[-1]

    monkeypatch.setattr(schedulers, "_drop_stale_stop", counting)
    scheduler = RecordingPBT(
        time_attr="training_iteration", perturbation_interval=2, synch=True,
        quantile_fraction=0.5, metric="score", mode="max",
        hyperparam_mutations={"rate": [0.5, 1.0, 2.0]})
    results = tune.Tuner(
        slow_save_trainable(),
        param_space={"rate": tune.grid_search([0.5, 2.0])},
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), stop={"training_iteration": ITERATIONS}, verbose=0,
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1)),
    ).fit()
    assert any(dropped), "no exploit met a save in flight: the race was not set up"
    assert sorted(r.metrics["training_iteration"] for r in results) == [ITERATIONS] * 2


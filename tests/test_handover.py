"""An exploited trial restores the checkpoint PBT handed it, however long it waits for its turn.

CI found a trial failing for good because Tune pruned the clone's checkpoint (``num_to_keep``)
while the exploited trial waited for a slot. The Tune run below makes that wait certain: one slot
for two trials, one checkpoint kept per trial, a save every iteration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pyarrow.fs
import pytest
from ray import tune
from ray.tune import Checkpoint

from rl_pbt.handover import hand_over_checkpoint
from rl_pbt.schedulers import RecordingPBT

ITERATIONS = 8


def counting_trainable() -> type:
    """A Trainable adding ``rate`` per step, made in a function so Ray ships it by value."""

    class Counting(tune.Trainable):
        def setup(self, config: dict) -> None:
            self.total = 0.0
            self.restored_total: float | None = None

        def step(self) -> dict:
            time.sleep(0.05)
            result = {"score": self.total + self.config["rate"],
                      "restored_total": self.restored_total}
            self.total += self.config["rate"]
            self.restored_total = None
            return result

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            (Path(checkpoint_dir) / "state.json").write_text(json.dumps({"total": self.total}))

        def load_checkpoint(self, checkpoint_dir: str) -> None:
            self.total = json.loads((Path(checkpoint_dir) / "state.json").read_text())["total"]
            self.restored_total = self.total

        def reset_config(self, new_config: dict) -> bool:
            return True

    return Counting


@pytest.mark.slow
def test_exploited_trial_restores_after_the_clone_saved_past_num_to_keep(ray_session, tmp_path):
    scheduler = RecordingPBT(
        time_attr="training_iteration", perturbation_interval=2, quantile_fraction=0.5,
        metric="score", mode="max", slots=1, hyperparam_mutations={"rate": [0.5, 1.0, 2.0]})
    results = tune.Tuner(
        tune.with_resources(counting_trainable(), {"cpu": 2}),  # one runs at a time
        param_space={"rate": tune.grid_search([2.0, 0.5])},
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), stop={"training_iteration": ITERATIONS}, verbose=0,
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, num_to_keep=1)),
    ).fit()
    assert scheduler.events, "no exploit: the hand-over was not exercised"
    assert not results.errors, results.errors
    assert sorted(r.metrics["training_iteration"] for r in results) == [ITERATIONS] * 2
    frames = {r.metrics["trial_id"]: r.metrics_dataframe for r in results}
    for event in scheduler.events:  # each restored the clone's state at the exploit
        source = frames[event.source_id]
        scores = set(source[source["training_iteration"] == event.source_iteration]["score"])
        restored = set(frames[event.trial_id]["restored_total"].dropna())
        assert scores & restored, (event, scores, restored)


def fake_trial(storage: Path, name: str, handed: Path) -> NS:
    """The parts of a Tune trial the hand-over reads: its storage and its latest checkpoint."""
    local = pyarrow.fs.LocalFileSystem()
    latest = NS(checkpoint=Checkpoint(str(handed), filesystem=local), metrics={"it": 2})
    return NS(storage=NS(storage_filesystem=local, trial_fs_path=str(storage / name)),
              run_metadata=NS(checkpoint_manager=NS(_latest_checkpoint_result=latest)))


def test_hand_over_copies_into_the_trial_and_keeps_the_last_two(tmp_path):
    source = tmp_path / "PPO_b" / "checkpoint_000001"
    (source / "learner").mkdir(parents=True)
    (tmp_path / "PPO_a").mkdir()
    copies = []
    for turn in range(3):
        (source / "learner" / "state.pkl").write_bytes(f"weights-{turn}".encode())
        trial = fake_trial(tmp_path, "PPO_a", source)
        copies.append(Path(hand_over_checkpoint(trial).path))
        latest = trial.run_metadata.checkpoint_manager._latest_checkpoint_result
        assert latest.checkpoint.path == str(copies[-1]) and latest.metrics == {"it": 2}
    assert [p.name for p in copies] == ["exploit_000000", "exploit_000001", "exploit_000002"]
    source.parent.joinpath("checkpoint_000001").rename(tmp_path / "pruned")  # Tune prunes it
    assert (copies[2] / "learner" / "state.pkl").read_bytes() == b"weights-2"
    assert (copies[1] / "learner" / "state.pkl").read_bytes() == b"weights-1"
    assert not copies[0].exists()


def test_a_pruned_pick_hands_over_the_clones_newest_checkpoint(tmp_path):
    newest = tmp_path / "PPO_b" / "checkpoint_000009"
    newest.mkdir(parents=True)
    (newest / "state.pkl").write_bytes(b"newest")
    (tmp_path / "PPO_a").mkdir()
    trial = fake_trial(tmp_path, "PPO_a", tmp_path / "PPO_b" / "checkpoint_000004")  # pruned
    local = pyarrow.fs.LocalFileSystem()
    clone = NS(latest_checkpoint_result=NS(checkpoint=Checkpoint(str(newest), filesystem=local),
                                           metrics={"training_iteration": 7}))
    handover = hand_over_checkpoint(trial, clone)
    assert handover.newer_iteration == 7
    assert (Path(handover.path) / "state.pkl").read_bytes() == b"newest"
    latest = trial.run_metadata.checkpoint_manager._latest_checkpoint_result
    assert latest.checkpoint.path == handover.path and latest.metrics["training_iteration"] == 7
    source = tmp_path / "PPO_b" / "checkpoint_000004"  # PBT's pick, still there: it is used
    source.mkdir()
    (source / "state.pkl").write_bytes(b"picked")
    assert hand_over_checkpoint(fake_trial(tmp_path, "PPO_a", source), clone).newer_iteration \
        is None

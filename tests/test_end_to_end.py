"""``python -m rl_pbt`` as a user runs it: a tiny default run and a 2x1 multirun, each in a
subprocess with its own Ray, tracked in the default SQLite store of the launch directory."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, run_cli

from rl_pbt.tracking import child_runs

pytestmark = pytest.mark.slow


def _client(cwd):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd}/mlflow.db")


def test_default_run_ends_with_an_actionable_summary(tmp_path):
    proc = run_cli([*TINY, "seed=3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Concurrency: 1 CPU per trial x 4 trials" in out
    # Tune's warning of frequent state snapshots, which PBT's saves cause (cheap here: run.py)
    assert "snapshotting has been triggered" not in out + proc.stderr
    for text in ("best trial", "final hyperparameters", "env steps", "checkpoint",
                 "parent run", f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db"):
        assert text in out, text
    [summary_file] = list((tmp_path / "outputs").glob("*/*/summary.json"))
    summary = json.loads(summary_file.read_text())
    assert summary["best"]["checkpoint"]
    assert f"python -m rl_pbt.evaluate {summary_file.parent} episodes=20" in out
    client = _client(tmp_path)
    parent = client.get_run(summary["tracking"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    assert len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    trial_dirs = [p.parent for p in summary_file.parent.glob("tune/*/params.json")]
    assert len(trial_dirs) == 4
    for trial_dir in trial_dirs:  # Tune's result files, without TensorBoard's by default
        assert (trial_dir / "result.json").stat().st_size > 0, trial_dir
        assert (trial_dir / "progress.csv").stat().st_size > 0, trial_dir
        assert not list(trial_dir.glob("events.out.tfevents*")), trial_dir


def test_multirun_over_a_2x1_grid(tmp_path):
    args = ["-m", "env=cartpole,acrobot", "mutations=narrow", *TINY, "population=2",
            "stopper.max_iterations=2", "tensorboard=true"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((tmp_path / "multirun").glob("*/*/*/summary.json"))
    assert len(summaries) == 2
    for summary in summaries:  # tensorboard=true: every trial writes its event file
        trial_dirs = [p.parent for p in summary.parent.glob("tune/*/params.json")]
        assert len(trial_dirs) == 2
        assert all(list(d.glob("events.out.tfevents*")) for d in trial_dirs), trial_dirs
    names = {json.loads(p.read_text())["name"] for p in summaries}
    assert names == {"PPO-CartPole-v1", "PPO-Acrobot-v1"}
    client = _client(tmp_path)
    experiment = client.get_experiment_by_name("rl_pbt")
    parents = client.search_runs([experiment.experiment_id], "tags.`rl_pbt.sweep` != ''")
    assert len(parents) == 2
    assert len({p.data.tags["rl_pbt.sweep"] for p in parents}) == 1
    assert {p.data.tags["rl_pbt.env"] for p in parents} == {"cartpole", "acrobot"}

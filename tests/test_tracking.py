"""MlflowTracker against the default SQLite store, driven with stand-in trials (no Ray)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import mlflow
import pytest
from conftest import compose_config
from mlflow.tracking import MlflowClient

import rl_pbt.tracking
from rl_pbt.errors import ConfigError
from rl_pbt.plan import Tracking
from rl_pbt.resolve import resolve
from rl_pbt.schedulers import ExploitEvent
from rl_pbt.tracking import MlflowTracker, check_reachable


@dataclass
class StandInTrial:
    """What the tracker reads from a Tune Trial."""

    trial_id: str
    config: dict = field(default_factory=dict)
    error_file: str | None = None

    def __str__(self) -> str:
        return f"PBTPPO_{self.trial_id}"


@pytest.fixture
def plan(tmp_path):
    return resolve(compose_config(["tracking.experiment_name=unit"]), tmp_path,
                   choices={"env": "cartpole"}, launch_dir=tmp_path)


def _result(iteration, ret):
    return {"training_iteration": iteration, "timestamp": 1_700_000_000 + iteration,
            "env_runners": {"episode_return_mean": ret, "num_env_steps_sampled_lifetime":
                            1000 * iteration}, "time_total_s": 2.0 * iteration}


def test_exploit_is_recorded_without_relogging_params(plan):
    tracker = MlflowTracker(plan)
    parent = tracker.open({"rl_pbt.sweep": "s1"})
    a = StandInTrial("a", {"lr": 1e-4, "clip_param": 0.2, "num_epochs": 3, "lambda": 0.95,
                           "gamma": 0.99})
    b = StandInTrial("b", {"lr": 5e-4, "clip_param": 0.3, "num_epochs": 5, "lambda": 0.9,
                           "gamma": 0.99})
    for trial in (a, b):
        tracker.on_trial_start(0, [a, b], trial)
        tracker.on_trial_result(0, [a, b], trial, _result(1, 10.0))
    old = {k: a.config[k] for k in plan.mutations}
    a.config = {**b.config, "lr": 6e-4, "clip_param": 0.24}
    tracker.on_exploit(ExploitEvent("a", "b", 1, 1, old, {k: a.config[k] for k in plan.mutations},
                                    0.0))
    tracker.on_trial_start(0, [a, b], a)  # Tune starts the trial again: no params re-logged
    tracker.on_trial_result(0, [a, b], a, _result(2, 30.0))
    tracker.on_trial_complete(0, [a, b], a)
    tracker.on_trial_error(0, [a, b], b)
    tracker.close({"best": {"trial_id": "a", "return": 30.0, "env_steps": 2000,
                            "hyperparameters": {"lr": 6e-4}, "checkpoint": "/x"}})

    client = MlflowClient(plan.tracking.tracking_uri)
    run_a = client.get_run(tracker.children["a"])
    assert run_a.data.tags["mlflow.parentRunId"] == parent
    assert run_a.data.params["start.lr"] == "0.0001"  # first start only
    assert run_a.data.params["gamma"] == "0.99"
    lr = [m.value for m in client.get_metric_history(run_a.info.run_id, "hp.lr")]
    assert lr == [1e-4, 6e-4]
    assert "cloned b (iteration 1) at iteration 1" in run_a.data.tags["rl_pbt.exploit.001"]
    assert "lr 0.0001 -> 0.0006" in run_a.data.tags["rl_pbt.exploit.001"]
    assert run_a.info.status == "FINISHED"
    assert client.get_run(tracker.children["b"]).info.status == "FAILED"
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics["best_return"] == 30.0
    assert parent_run.data.params["best.lr"] == "0.0006"
    assert parent_run.data.tags["rl_pbt.sweep"] == "s1"
    assert parent_run.data.tags["rl_pbt.env"] == "cartpole"


def test_trials_stopped_by_the_run_end_finished(plan):
    """A trial reached the target and the run stopped the others: Tune calls no completion for
    them, and a finished run must leave no child RUNNING."""
    tracker = MlflowTracker(plan)
    tracker.open({})
    a, b = StandInTrial("a", {"lr": 1e-4}), StandInTrial("b", {"lr": 5e-4})
    for trial in (a, b):
        tracker.on_trial_start(0, [a, b], trial)
        tracker.on_trial_result(0, [a, b], trial, _result(1, 10.0))
    tracker.on_trial_error(0, [a, b], b)
    tracker.close({"best": {"trial_id": "a", "return": 10.0}})
    client = MlflowClient(plan.tracking.tracking_uri)
    assert client.get_run(tracker.children["a"]).info.status == "FINISHED"
    assert client.get_run(tracker.children["a"]).data.tags["rl_pbt.exploit_count"] == "0"
    assert client.get_run(tracker.children["b"]).info.status == "FAILED"


def test_results_go_to_mlflow_in_one_batch_per_run_and_interval(plan):
    """Results within ``SEND_EVERY_S`` wait; then each run's go in one write, and all land."""
    tracker = MlflowTracker(plan)
    tracker.open({})
    a, b = StandInTrial("a", {"lr": 1e-4}), StandInTrial("b", {"lr": 5e-4})
    for trial in (a, b):
        tracker.on_trial_start(0, [a, b], trial)
    tracker.sent_at = time.monotonic()
    for iteration in (1, 2, 3):
        for trial in (a, b):
            tracker.on_trial_result(0, [a, b], trial, _result(iteration, float(iteration)))
    assert tracker.queued == []  # within the interval: nothing sent yet
    tracker.sent_at -= rl_pbt.tracking.SEND_EVERY_S
    tracker.on_trial_result(0, [a, b], a, _result(4, 4.0))
    assert len(tracker.queued) == 2 and tracker.pending == {}  # one write per run
    tracker.on_trial_result(0, [a, b], b, _result(4, 4.0))
    tracker.close({"best": {"trial_id": "a", "return": 4.0}})  # sends b's fourth
    client = MlflowClient(plan.tracking.tracking_uri)
    for trial in (a, b):
        history = client.get_metric_history(tracker.children[trial.trial_id], "training_iteration")
        assert sorted((m.step, m.value) for m in history) == [(i, i) for i in (1, 2, 3, 4)]


def test_queued_writes_stay_bounded_and_all_land(plan, monkeypatch):
    """Sent at every result, writes queue up; the older half is waited for past the bound."""
    monkeypatch.setattr(rl_pbt.tracking, "MAX_QUEUED", 8)
    monkeypatch.setattr(rl_pbt.tracking, "SEND_EVERY_S", 0.0)
    tracker = MlflowTracker(plan)
    tracker.open({})
    a = StandInTrial("a", {"lr": 1e-4})
    tracker.on_trial_start(0, [a], a)
    lengths = []
    for iteration in range(1, 31):
        tracker.on_trial_result(0, [a], a, _result(iteration, float(iteration)))
        lengths.append(len(tracker.queued))
    assert max(lengths) == 8 and lengths[-1] <= 8
    tracker.close({"best": {"trial_id": "a", "return": 30.0}})
    history = MlflowClient(plan.tracking.tracking_uri).get_metric_history(
        tracker.children["a"], "training_iteration")
    assert sorted(m.step for m in history) == list(range(1, 31))


def test_reopen_logs_what_the_records_hold_and_mlflow_missed(plan):
    """Killed between the run folder's record of iteration 3 and MLflow's: the resumed run
    logs iteration 3 at step 3, so MLflow's steps keep matching the records."""
    from rl_pbt.records import TRIALS_FILE

    tracker = MlflowTracker(plan)
    parent = tracker.open({})
    a = StandInTrial("a", {"lr": 1e-4})
    tracker.on_trial_start(0, [a], a)
    rows = []
    for iteration in (1, 2, 3):
        if iteration < 3:
            tracker.on_trial_result(0, [a], a, _result(iteration, 10.0 * iteration))
        rows.append({"trial_id": "a", "training_iteration": iteration, "return": 10.0 * iteration,
                     "env_steps": 1000 * iteration, "time_total_s": 2.0 * iteration,
                     "time_this_iter_s": 2.0, "timestamp": 1_700_000_000 + iteration,
                     "hyperparameters": {"lr": 1e-4}})
    (plan.output_dir / TRIALS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tracker.flush()  # what MLflow had written when the process was killed

    resumed = MlflowTracker(plan)
    resumed.reopen(parent)
    resumed.on_trial_result(0, [a], a, _result(4, 40.0))
    resumed.flush()
    client = MlflowClient(plan.tracking.tracking_uri)
    history = client.get_metric_history(tracker.children["a"], "training_iteration")
    assert sorted((m.step, m.value) for m in history) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    returns = client.get_metric_history(tracker.children["a"], "episode_return_mean")
    assert sorted((m.step, m.value) for m in returns)[2] == (3, 30.0)


def test_resume_into_a_store_without_the_runs_parent_is_one_error(plan, tmp_path):
    """A resume whose MLflow store lost the parent run (moved, replaced) raised MLflow's
    'Run with id=... not found' as a traceback; a store file that is gone is caught before
    MLflow would make a new, empty one (rl_pbt.resume.resumed_plan)."""
    from rl_pbt.resume import ResumePoint, resumed_plan

    missing = "0" * 32
    with pytest.raises(ConfigError, match=f"resume: MLflow run {missing}, this run's parent, "
                                          "is not in sqlite:///"):
        MlflowTracker(plan).reopen(missing)
    gone = tmp_path / "gone" / "mlflow.db"
    point = ResumePoint(tmp_path, {}, {"backend": "mlflow", "tracking_uri": f"sqlite:///{gone}",
                                       "experiment_name": "x"}, "", {})
    with pytest.raises(ConfigError, match=f"the run's MLflow store {gone} is gone"):
        resumed_plan(plan, point)
    assert not gone.parent.exists()


def test_parent_nests_under_an_active_run(plan, tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(plan.tracking.tracking_uri)
    try:
        job_experiment = MlflowClient(plan.tracking.tracking_uri).create_experiment(
            "managed_job", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=job_experiment) as job:
            tracker = MlflowTracker(plan)
            parent = tracker.open({})
            tracker.close(None)
    finally:
        mlflow.set_tracking_uri(previous)
    run = MlflowClient(plan.tracking.tracking_uri).get_run(parent)
    assert run.data.tags["mlflow.parentRunId"] == job.info.run_id
    assert run.info.experiment_id == job.info.experiment_id
    # the summary and run.json name the experiment the parent is in, not tracking's default
    assert (tracker.experiment_name, plan.tracking.experiment_name) == ("managed_job", "unit")


def test_unreachable_server_and_unwritable_folder_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot reach MLflow at http://127\.0\.0\.1:9"):
        check_reachable(Tracking("mlflow", "http://127.0.0.1:9", "x"), timeout=2)
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_reachable(Tracking("mlflow", f"sqlite:///{tmp_path}/no/such/dir/m.db", "x"))


def test_reachable_server_passes(mlflow_server):
    check_reachable(Tracking("mlflow", mlflow_server, "x"))


class OneResultTuner:
    """Stands in for Tune's Tuner in ``execute``: trial a reports one result to the tracker
    and the recorder, then fit ends with no result grid."""

    def __init__(self, callbacks):
        self.callbacks = callbacks

    def fit(self):
        from rl_pbt.records import RunRecorder

        trial = StandInTrial("a", {"lr": 1e-4})
        for callback in self.callbacks:
            if isinstance(callback, MlflowTracker):
                callback.on_trial_start(0, [trial], trial)
            if isinstance(callback, (MlflowTracker, RunRecorder)):
                callback.on_trial_result(0, [trial], trial, _result(1, 10.0))
        return []


def test_a_crash_mid_run_leaves_no_mlflow_run_running(plan, ray_session, monkeypatch):
    """The driver fails while trials train: the parent and the started child end KILLED, even
    when queued metrics fail to write as well."""
    from mlflow.exceptions import MlflowException

    from rl_pbt import run as running

    class FailedWrite:
        def wait(self):
            raise MlflowException("database is locked")

    class CrashingTuner(OneResultTuner):
        def fit(self):
            super().fit()
            next(c for c in self.callbacks if isinstance(c, MlflowTracker)).queued.append(
                FailedWrite())
            raise RuntimeError("the driver crashed")

    monkeypatch.setattr(running, "make_tuner", lambda plan, scheduler, cbs: CrashingTuner(cbs))
    with pytest.raises(RuntimeError, match="the driver crashed"):
        running.execute(plan)
    client = MlflowClient(plan.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 2
    assert {r.info.status for r in runs} == {"KILLED"}


def test_mlflow_refusing_the_last_records_warns_and_keeps_the_summary(plan, ray_session,
                                                                    monkeypatch, capsys):
    """The run trained and its folder holds everything: MLflow failing at the end is a warning,
    the runs end KILLED (none RUNNING) and the summary is written and printed."""
    from mlflow.exceptions import MlflowException

    from rl_pbt import run as running

    close = MlflowTracker.close

    def refusing_close(self, summary, status="FINISHED", artifacts=()):
        if status != "KILLED":
            raise MlflowException("database is locked")
        close(self, summary, status, artifacts)

    monkeypatch.setattr(running, "make_tuner", lambda plan, scheduler, cbs: OneResultTuner(cbs))
    monkeypatch.setattr(MlflowTracker, "close", refusing_close)
    summary = running.execute(plan)
    out, err = capsys.readouterr()
    assert "rl_pbt: warning: MLflow refused the run's last records (database is locked); its " \
           "runs are marked KILLED; the run folder has them all" in err
    assert "Traceback" not in out + err
    assert f"run folder   {plan.output_dir}" in out
    assert json.loads((plan.output_dir / "summary.json").read_text())["best"]["return"] == 10.0
    assert summary["best"]["trial_id"] == "a"
    client = MlflowClient(plan.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 2


def test_a_mutated_batch_size_is_recorded_from_rllibs_config_dict(plan, tmp_path):
    """RLlib keeps ``train_batch_size_per_learner`` as ``_train_batch_size_per_learner`` in the
    config dict a result carries (mutations=wide mutates it): recorded, not None."""
    from ray.rllib.algorithms.ppo import PPOConfig

    from rl_pbt.records import TRIALS_FILE, RunRecorder, read_jsonl

    keys = ["lr", "train_batch_size_per_learner"]
    config = PPOConfig().training(lr=2e-4, train_batch_size_per_learner=3000).to_dict()
    assert "train_batch_size_per_learner" not in config  # what made it go missing
    result = {**_result(1, 10.0), "config": config}
    trial = StandInTrial("a", {"lr": 1e-4, "train_batch_size_per_learner": 1000})
    recorder = RunRecorder(tmp_path, plan.stop.metric, keys)
    recorder.on_trial_result(0, [trial], trial, result)
    assert read_jsonl(tmp_path / TRIALS_FILE)[0]["hyperparameters"] == {
        "lr": 2e-4, "train_batch_size_per_learner": 3000}
    tracker = MlflowTracker(plan)
    tracker.mutated = keys
    tracker.open({})
    tracker.on_trial_start(0, [trial], trial)
    tracker.on_trial_result(0, [trial], trial, result)
    tracker.close({})
    history = MlflowClient(plan.tracking.tracking_uri).get_metric_history(
        tracker.children["a"], "hp.train_batch_size_per_learner")
    assert [m.value for m in history] == [3000]


def test_execute_ends_mlflow_runs_without_waiting_out_mlflows_queue_poll(monkeypatch):
    """MLflow's logging thread polls its queue for 1 s unless buffering is set, and ending a
    run joins it: ``execute`` sets 1 s of buffering for its span, unless the user set a value."""
    from rl_pbt import run as running

    seen = []
    monkeypatch.setattr(running, "_execute", lambda *args: seen.append(
        os.environ.get(running.MLFLOW_BUFFERING)) or {})
    monkeypatch.delenv(running.MLFLOW_BUFFERING, raising=False)
    running.execute(None)
    assert seen == ["1"] and running.MLFLOW_BUFFERING not in os.environ
    monkeypatch.setenv(running.MLFLOW_BUFFERING, "3")
    running.execute(None)
    assert seen[-1] == "3"


def test_batches_never_split_a_result():
    """MLflow may write two batches in either order: a result's metrics stay in one."""
    results = [[f"r{i}m{j}" for j in range(4)] for i in range(5)]
    batches = list(rl_pbt.tracking._result_batches(results, 10))
    assert [len(b) for b in batches] == [8, 8, 4]
    assert [m for b in batches for m in b] == [m for r in results for m in r]
    assert [len(b) for b in rl_pbt.tracking._result_batches([["x"] * 25], 10)] == [10, 10, 5]


def test_a_run_refused_beside_the_store_opening_leaves_no_new_store(ray_session, tmp_path):
    """The CPU check runs while MLflow creates its store: a refused run left an empty
    mlflow.db behind; an existing store is kept."""
    from rl_pbt import run as running

    plan = resolve(compose_config(["experiment=seed"]), tmp_path / "run",
                   choices={"env": "cartpole"}, launch_dir=tmp_path)
    with pytest.raises(ConfigError, match="a trial needs 5 CPUs"):
        running.execute(plan)
    assert not plan.tracking.sqlite_file.exists()
    MlflowClient(plan.tracking.tracking_uri).search_experiments()  # the store exists now
    with pytest.raises(ConfigError, match="a trial needs 5 CPUs"):
        running.execute(plan)
    assert plan.tracking.sqlite_file.exists()

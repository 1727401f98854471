"""A trial whose environment raises is retried from its last checkpoint; one that keeps failing
is reported as failed, in the summary and in MLflow, and the other trials finish untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, compose_config, run_cli

from rl_pbt.faults import FlakyEnv, trial_index
from rl_pbt.records import FAILURES_FILE, TRIALS_FILE, read_jsonl
from rl_pbt.resolve import resolve
from rl_pbt.run import execute
from rl_pbt.tracking import child_runs

ITERATIONS = 6


def _flaky_run(tmp_path: Path, fail_times: int, max_failures: int, tracking: list[str]):
    """Two trials without PBT; trial 0's env raises at its 250th step (iteration 3)."""
    state = tmp_path / "state"
    state.mkdir()
    tiny = [o for o in TINY if not o.startswith("scheduler.")]  # PBT's knobs; fifo has none
    cfg = compose_config([
        *tiny, "population=2", "scheduler=fifo", f"stopper.max_iterations={ITERATIONS}",
        "checkpoint.frequency=1", f"max_failures={max_failures}", "seed=11",
        "env=entry_point", "env.entry_point=rl_pbt.faults:FlakyEnv", "env.target_return=450",
        "+env.env_config.fail_at_step=250", f"+env.env_config.fail_times={fail_times}",
        f"+env.env_config.state_dir={state}", *tracking])
    out = tmp_path / "run"
    plan = resolve(cfg, out, launch_dir=tmp_path)
    return execute(plan), out


def _iterations(rows: list[dict], trial_id: str) -> list[int]:
    return [r["training_iteration"] for r in rows if r["trial_id"] == trial_id]


@pytest.mark.slow
def test_failing_trial_is_retried_from_its_checkpoint(ray_session, tmp_path):
    summary, out = _flaky_run(tmp_path, fail_times=1, max_failures=2, tracking=["tracking=none"])
    failures = read_jsonl(out / FAILURES_FILE)
    assert [(f["retried"], f["failures"]) for f in failures] == [(True, 1)]
    assert "FlakyEnv: injected failure 1 of 1" in failures[0]["error"]
    failed = failures[0]["trial_id"]
    rows = read_jsonl(out / TRIALS_FILE)
    for trial in summary["trials"]:
        assert trial["error"] is None
        # Each iteration recorded once: the retry's repeats of recorded iterations are skipped.
        assert _iterations(rows, trial["trial_id"]) == list(range(1, ITERATIONS + 1))
        assert trial["retries"] == (1 if trial["trial_id"] == failed else 0)
    # The retry restored the checkpoint of the iteration before the failure.
    after = [r for r in rows if r["trial_id"] == failed][failures[0]["training_iteration"]]
    assert after["probe"]["restored"] is True


@pytest.mark.slow
def test_trial_that_keeps_failing_is_reported_and_the_other_finishes(
        ray_session, mlflow_server, tmp_path):
    summary, out = _flaky_run(tmp_path, fail_times=10, max_failures=1, tracking=[
        f"tracking.tracking_uri={mlflow_server}", "tracking.experiment_name=test_faults"])
    by_id = {t["trial_id"]: t for t in summary["trials"]}
    failed = [t for t in by_id.values() if t["error"]]
    assert len(failed) == 1 and "FlakyEnv: injected failure 2 of 10" in failed[0]["error"]
    healthy = [t for t in by_id.values() if not t["error"]]
    assert [t["iterations"] for t in healthy] == [ITERATIONS]
    assert [f["retried"] for f in read_jsonl(out / FAILURES_FILE)] == [True, False]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    parent = summary["tracking"]["parent_run_id"]
    children = child_runs(client, summary["tracking"]["experiment_id"], parent)
    status = {c.data.tags["rl_pbt.trial_id"]: c.info.status for c in children}
    assert status == {failed[0]["trial_id"]: "FAILED", healthy[0]["trial_id"]: "FINISHED"}
    error_tag = next(c.data.tags.get("rl_pbt.error") for c in children
                 if c.info.status == "FAILED")
    assert "FlakyEnv: injected failure 2 of 10" in error_tag


@pytest.mark.slow
def test_a_run_whose_every_trial_failed_fails_the_command(tmp_path):
    """The summary still shows each trial's error, MLflow's parent run ends FAILED, and the
    command ends with one error line and exit code 1 (it was 0: nothing was trained)."""
    tiny = [o for o in TINY if not o.startswith("scheduler.")]
    proc = run_cli([
        *tiny, "population=2", "scheduler=fifo", "max_failures=0", "seed=11",
        "env=entry_point", "env.entry_point=rl_pbt.faults:FlakyEnv", "env.target_return=450",
        "+env.env_config.fail_at_step=50", "+env.env_config.fail_times=5",
        "+env.env_config.fail_trials=[0,1]", f"+env.env_config.state_dir={tmp_path}"],
        cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.count("FAILED: RuntimeError: FlakyEnv: injected failure 1 of 5") == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rl_pbt: error: every trial failed (RuntimeError: FlakyEnv: "), last

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [parent] = client.search_runs(["1"], "tags.mlflow.runName LIKE 'PPO%'")
    assert parent.info.status == "FAILED"


def test_flaky_env_fails_only_in_its_trials_and_only_so_often(tmp_path, monkeypatch):
    trial_dir = tmp_path / "PBTPPO_CartPole-v1_66f91_00001_1_lr=0.001"
    trial_dir.mkdir()
    monkeypatch.chdir(trial_dir)
    assert trial_index(trial_dir) == 1
    healthy = FlakyEnv(fail_at_step=3, fail_trials=[0], state_dir=str(tmp_path))
    flaky = FlakyEnv(fail_at_step=3, fail_trials=[1], fail_times=1, state_dir=str(tmp_path))
    for env in (healthy, flaky):
        env.reset(seed=0)
    for _ in range(2):
        healthy.step(0)
        flaky.step(0)
    healthy.step(0)
    with pytest.raises(RuntimeError, match="injected failure 1 of 1 at step 3"):
        flaky.step(0)
    again = FlakyEnv(fail_at_step=3, fail_trials=[1], fail_times=1, state_dir=str(tmp_path))
    again.reset(seed=0)
    for _ in range(4):  # the one failure is spent: a retried trial trains on
        again.step(0)
    assert trial_index(tmp_path) is None


def test_the_error_line_follows_causes_not_handling_context():
    """RLlib re-raises an env's error 'from' it (the cause is what went wrong); an error raised
    while handling another (FrozenLake's Discrete observations: an AttributeError, then the
    ValueError that says why) is the later one."""
    from rl_pbt.records import root_error

    frames = ["Traceback (most recent call last):", '  File "x.py", line 1, in f', "    g()"]
    caused = [*frames, "ValueError: the env broke", "",
              "The above exception was the direct cause of the following exception:", "",
              *frames, "RuntimeError"]
    assert root_error(caused) == "ValueError: the env broke"
    handled = [*frames, "AttributeError: 'NoneType' object has no attribute 'x'", "",
               "During handling of the above exception, another exception occurred:", "",
               *frames, "    raise ValueError(",
               "ValueError: No default encoder config for obs space=Discrete(16)"]
    assert root_error(handled) == "ValueError: No default encoder config for obs space=Discrete(16)"
    assert root_error(["Failure # 1", "no exception here"]) == "unknown error"

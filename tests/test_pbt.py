"""A tiny PBT experiment, in-process, tracked on a real MLflow server: exploits happen and
really change the agent, and MLflow holds parent, children, schedules and exploits."""

from __future__ import annotations

import os
import re

import pytest
from conftest import TINY, compose_config

from rl_pbt.records import EXPLOITS_FILE, TRIALS_FILE, read_jsonl
from rl_pbt.resolve import resolve
from rl_pbt.run import execute
from rl_pbt.tracking import child_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pbt_run(ray_session, mlflow_server, tmp_path_factory):
    """Run the tiny experiment once for every test in this module."""
    out = tmp_path_factory.mktemp("pbt_run")
    # synch: every perturbation exploits (asynchronous PBT can make none in 8 iterations).
    cfg = compose_config([*TINY, "seed=7", "scheduler.synch=true",
                          f"tracking.tracking_uri={mlflow_server}",
                          "tracking.experiment_name=test_pbt"])
    plan = resolve(cfg, out, choices={"env": "cartpole", "mutations": "narrow"}, launch_dir=out)
    environ = dict(os.environ)
    summary = execute(plan, {"rl_pbt.test": "pbt"})
    assert {k: v for k, v in os.environ.items() if k.startswith("TUNE_")} == {
        k: v for k, v in environ.items() if k.startswith("TUNE_")}, "Tune's switches leaked"
    return plan, summary, out


def _rows_of(rows, trial_id):
    return [r for r in rows if r["trial_id"] == trial_id]


def _first_result_after(rows, event):
    """The exploited trial's first result trained after the exploit, or None. The result that
    triggered it is recorded just after the exploit (``RunRecorder.on_exploit``): skipped."""
    after = sorted((r for r in _rows_of(rows, event["trial_id"])
                    if r["recorded_at"] > event["wall_time"]), key=lambda r: r["recorded_at"])
    if after and after[0]["training_iteration"] == event["iteration"] \
            and not after[0]["probe"]["restored"]:
        after = after[1:]
    return after[0] if after else None


def test_exploits_happen(pbt_run):
    _, summary, out = pbt_run
    assert summary["exploits"] >= 1
    assert len(read_jsonl(out / EXPLOITS_FILE)) == summary["exploits"]
    assert (out / "tune" / "pbt_global.txt").exists()


def test_every_iteration_times_its_sampling(pbt_run):
    """``probe.sample_s`` and ``sampled_steps``: the in-process env runner's sampling time and
    steps (the benchmark's sampling throughput), also after an exploit rebuilt the runner, with
    its module left in eval mode and rl_pbt's batched loop sampling."""
    _, _, out = pbt_run
    rows = read_jsonl(out / TRIALS_FILE)
    assert any(r["probe"]["restored"] for r in rows)
    for row in rows:  # TINY: a batch of 400 steps from 4 envs (a double count would be 800)
        assert 0 < row["probe"]["sample_s"] < row["time_this_iter_s"]
        assert 400 <= row["probe"]["sampled_steps"] < 440
        assert row["probe"]["sampled_in_eval_mode"]  # no train/eval switch at each step
        assert row["probe"]["fast_sampler"]
        assert row["probe"]["lean_update"]  # rl_pbt's minibatch loop and loss (test_learners)


def test_exploit_trains_with_new_values_from_the_clones_weights(pbt_run):
    """Read inside the trial: optimizer lr and loss clip_param after an exploit are the new
    config's, and the weights at the start of the next iteration are the clone's."""
    _, _, out = pbt_run
    rows = read_jsonl(out / TRIALS_FILE)
    events = read_jsonl(out / EXPLOITS_FILE)
    checked = changed = 0
    for event in events:
        first = _first_result_after(rows, event)
        if first is None:
            continue  # the trial was stopped before it trained again
        probe, iteration = first["probe"], first["training_iteration"]
        assert probe["restored"], ("trained on after the exploit without the clone", event)
        assert probe["lr_first_update"] == pytest.approx(event["new"]["lr"], rel=1e-6)
        # A trial that cloned the same trial before can get the same value again.
        changed += event["new"]["lr"] != pytest.approx(event["old"]["lr"], rel=1e-9)
        assert probe["clip_param_used"] == pytest.approx(event["new"]["clip_param"], rel=1e-6)
        # The clone's checkpoint holds its weights at the end of the iteration PBT cloned.
        assert iteration - 1 == event["source_iteration"], (event, probe["restored_from"])
        source = [r for r in _rows_of(rows, event["source_id"])
                  if r["training_iteration"] == event["source_iteration"]
                  and r["recorded_at"] < event["wall_time"]]
        assert probe["digest_start"] == source[-1]["probe"]["digest_end"]
        checked += 1
    assert checked >= 1 and changed >= 1


def test_mlflow_has_parent_children_schedule_and_exploits(pbt_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    plan, summary, out = pbt_run
    rows = read_jsonl(out / TRIALS_FILE)
    client = MlflowClient(mlflow_server)
    parent_id = summary["tracking"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rl_pbt.env"] == "cartpole"
    assert parent.data.tags["rl_pbt.test"] == "pbt"
    assert parent.data.metrics["best_return"] == pytest.approx(summary["best"]["return"])
    assert parent.data.tags["best.trial_id"] == summary["best"]["trial_id"]
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
    children = child_runs(client, parent.info.experiment_id, parent_id)
    assert len(children) == plan.population
    exploited = 0
    for child in children:
        history = client.get_metric_history(child.info.run_id, "hp.lr")
        returns = client.get_metric_history(child.info.run_id, "episode_return_mean")
        results = _rows_of(rows, child.data.tags["rl_pbt.trial_id"])
        assert len(history) == len(results)  # one schedule point per result
        assert [m.value for m in history] == [r["hyperparameters"]["lr"] for r in results]
        assert returns
        exploit_tags = [k for k in child.data.tags if k.startswith("rl_pbt.exploit.")]
        if exploit_tags:
            exploited += 1
            assert "cloned" in child.data.tags[exploit_tags[0]]
            assert len({m.value for m in history}) >= 2  # the schedule changed
            assert any(a.path == "exploits" for a in client.list_artifacts(child.info.run_id))
    assert exploited >= 1



def test_an_exploit_keeps_the_process(pbt_run):
    """No new process per exploit (RLlib's Algorithm has no ``reset_config``; rl_pbt's trainable
    takes the new config in place): every trial trains in one of the processes the run started
    for its slots, and the first result after each exploit comes from a process that had
    trained before."""
    _, summary, out = pbt_run
    rows = read_jsonl(out / TRIALS_FILE)
    started_at: dict[int, float] = {}
    for row in sorted(rows, key=lambda r: r["recorded_at"]):
        started_at.setdefault(row["probe"]["pid"], row["recorded_at"])
    slots = int(re.search(r"(\d+) trials? trains? at once", summary["concurrency"])[1])
    assert len(started_at) == slots, started_at
    reused = 0
    for event in read_jsonl(out / EXPLOITS_FILE):
        first = _first_result_after(rows, event)
        if first is not None:
            assert started_at[first["probe"]["pid"]] < event["wall_time"]
            reused += 1
    assert reused >= 1

"""Kill a tuning run with SIGKILL and resume it: the same Tune experiment and
MLflow runs go on, PBT keeps exploring, and every iteration is recorded exactly once. Ctrl-C
stops cleanly, says how to resume, and the run resumes to the end."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose_config, run_cli

from rl_pbt.errors import ConfigError
from rl_pbt.records import (
    EXPLOITS_FILE,
    TRIALS_FILE,
    drop_cut_last_line,
    read_json,
    read_jsonl,
)
from rl_pbt.resolve import resolve

ITERATIONS = 16
#: Two trials that perturb in step every 2 iterations (each round exploits), saved every 2.
ARGS = [*TINY, "population=2", f"stopper.max_iterations={ITERATIONS}", "scheduler.synch=true",
        "checkpoint.frequency=2", "seed=5"]


def _start(run_dir: Path, log: Path, args: list[str]) -> subprocess.Popen:
    """``python -m rl_pbt`` in its own session (so a SIGKILL takes Ray's processes too)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "rl_pbt", *args], cwd=run_dir.parent, env=env,
        stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)


def _wait_for_rows(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early with exit code {proc.returncode}"
        if len(read_jsonl(run_dir / TRIALS_FILE)) >= count and list(
                (run_dir / "tune").glob("*/checkpoint_*")):
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} results after {timeout} s")


def _mlflow_runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "rl_pbt.trial_id" not in r.data.tags]
    children = [r for r in runs if "rl_pbt.trial_id" in r.data.tags]
    return client, parents, children


def _first_run(tmp_path: Path, args: list[str] = ARGS) -> tuple[Path, Path, subprocess.Popen]:
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    proc = _start(run_dir, tmp_path / "first.log", [
        *args, f"hydra.run.dir={run_dir}", f"tracking.tracking_uri=sqlite:///{db}"])
    _wait_for_rows(run_dir, 7, proc)
    return run_dir, db, proc


def test_ctrl_c_before_training_leaves_nothing_and_no_traceback(tmp_path):
    """A Ctrl-C in the first seconds (imports, checks, Ray's start) was a KeyboardInterrupt
    traceback and a run folder holding only Hydra's files."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "rl_pbt", *TINY], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "rl_pbt: interrupted; before training, nothing was written")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_run_resumes_to_the_end(tmp_path):
    run_dir, db, proc = _first_run(tmp_path)
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends the driver
    assert proc.wait(timeout=180) == 130
    stopped_at = time.time()
    last_line = (tmp_path / "first.log").read_text().strip().splitlines()[-1]
    assert last_line == (f"rl_pbt: interrupted; the state is saved. Continue with: "
                         f"python -m rl_pbt resume={run_dir}")
    assert not (run_dir / "summary.json").exists()
    _, parents, children = _mlflow_runs(db)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert {c.info.status for c in children} <= {"KILLED", "FINISHED"}
    _resume_to_the_end(tmp_path, run_dir, db, stopped_at)


#: PB2 on the same run: it failed 1 of 3 times (a trial restored the clone's later checkpoint)
#: until the exploit copied the handed-over checkpoint (rl_pbt/handover.py); 6 of 6 since.
PB2 = ["scheduler=pb2", "scheduler.perturbation_interval=2", "scheduler.quantile_fraction=0.5",
       "scheduler.synch=true"]


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [[], PB2], ids=["pbt", "pb2"])
def test_killed_run_resumes_to_the_end(tmp_path, scheduler):
    args = [*ARGS, *scheduler]
    run_dir, db, proc = _first_run(tmp_path, args)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = time.time()

    _resume_to_the_end(tmp_path, run_dir, db, killed_at, args)


def _resume_to_the_end(tmp_path: Path, run_dir: Path, db: Path, stopped_at: float,
                       args: list[str] = ARGS) -> None:
    """Resume the stopped run from another folder; check the records, PBT and MLflow after."""
    before = read_jsonl(run_dir / TRIALS_FILE)
    rows_before = len(before)
    elsewhere = tmp_path / "elsewhere"  # the saved store is found from any directory
    elsewhere.mkdir()
    done = run_cli([f"resume={run_dir}"], cwd=elsewhere)
    (tmp_path / "resume.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = read_json(run_dir / "summary.json")
    assert summary["resumed"] and " s since the resume, " in done.stdout
    resumes = read_json(run_dir / "run.json")["resumes"]
    assert [r["ray"]["origin"] for r in resumes] == ["started"]
    assert resumes[0]["last_iteration"] == {  # what was recorded when the run stopped
        t: max(r["training_iteration"] for r in before if r["trial_id"] == t)
        for t in {r["trial_id"] for r in before}}

    # Every trial trained to the end, and its records continue without a gap or a repeat: the
    # next iteration, or the one after the clone's checkpoint right after an exploit.
    rows = read_jsonl(run_dir / TRIALS_FILE)
    exploits = read_jsonl(run_dir / EXPLOITS_FILE)
    for trial in summary["trials"]:
        assert trial["error"] is None
        assert _iterations_follow(trial["trial_id"], rows, exploits) == ITERATIONS
    assert any(r["probe"]["restored"] for r in rows[rows_before:])

    # PBT kept exploring after the resume, inside the configured ranges (Ray's known restore
    # bug left resampled values at 0 or 1).
    plan = resolve(compose_config(args), tmp_path / "check")
    later = [e for e in read_jsonl(run_dir / EXPLOITS_FILE) if e["wall_time"] > stopped_at]
    assert later, "no exploit after the resume"
    for event in later:
        for key, value in event["new"].items():
            dist = plan.mutations[key]
            assert dist.low <= value <= dist.high, (key, value)

    # One MLflow parent (the same one) and one child per trial with steps 1..N, no duplicates.
    client, parents, children = _mlflow_runs(db)
    assert [p.info.run_id for p in parents] == [summary["tracking"]["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["rl_pbt.trial_id"] for c in children) == sorted(
        t["trial_id"] for t in summary["trials"])
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "training_iteration")
        recorded = [r["training_iteration"] for r in rows
                    if r["trial_id"] == child.data.tags["rl_pbt.trial_id"]]
        assert [int(m.value) for m in sorted(history, key=lambda m: m.step)] == recorded
        assert sorted(m.step for m in history) == list(range(1, len(recorded) + 1))


def _iterations_follow(trial_id: str, rows: list[dict], exploits: list[dict]) -> int:
    """Check a trial's recorded iterations step by one between its exploits; return the last.

    After an exploit the trial goes on from the clone's checkpoint, whatever its iteration.
    """
    mine = [r for r in rows if r["trial_id"] == trial_id]
    cloned = [e["wall_time"] for e in exploits if e["trial_id"] == trial_id]
    for before, after in itertools.pairwise(mine):
        if not any(before["recorded_at"] < t < after["recorded_at"] for t in cloned):
            assert after["training_iteration"] == before["training_iteration"] + 1, (
                trial_id, before, after)
    return mine[-1]["training_iteration"]


def test_resume_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    proc = run_cli([f"resume={tmp_path}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"rl_pbt: error: resume: {tmp_path} is not an rl_pbt run "
                                   "folder (no run.json)")
    assert not (tmp_path / "outputs").exists()


def test_resume_takes_no_other_overrides(tmp_path):
    proc = run_cli([f"resume={tmp_path}", "population=3"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("rl_pbt: error: resume: a resumed run keeps its saved "
                                   "config; drop population=3")


def test_resume_point_is_each_trials_latest_iteration_after_any_rewind(tmp_path):
    """An exploit rewinds a trial to the clone's checkpoint: what it trains after that is new,
    so the resume point is the latest recorded iteration, not the highest."""
    from rl_pbt.records import write_json
    from rl_pbt.resume import load_resume

    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "tuner.pkl").write_bytes(b"")
    write_json({"config": {"seed": 1, "resume": None}, "seed": 1}, tmp_path / "run.json")
    clock = itertools.count(1.0)
    rows = [("a", i) for i in range(1, 11)] + [("b", i) for i in range(1, 7)] + [("c", 3)]
    lines = [{"trial_id": t, "training_iteration": i, "recorded_at": next(clock)}
             for t, i in rows]
    exploits = [{"trial_id": "a", "source_iteration": 8, "wall_time": next(clock)}]
    lines.append({"trial_id": "a", "training_iteration": 9, "recorded_at": next(clock)})
    exploits.append({"trial_id": "b", "source_iteration": 4, "wall_time": next(clock)})
    for name, records in ((TRIALS_FILE, lines), (EXPLOITS_FILE, exploits)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    _, point = load_resume(tmp_path)
    # a: 10 before the exploit, 9 after it; b: cloned iteration 4 after its last row (6).
    assert point.last_iteration == {"a": 9, "b": 4, "c": 3}


def test_damaged_records_are_one_error_and_a_cut_last_line_is_dropped(tmp_path):
    """A kill in the middle of an append leaves a last line without its newline: it is left
    out when read, and cut off before a resumed run appends; other damage names the file."""
    rows = tmp_path / "trials.jsonl"
    rows.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b')
    assert read_jsonl(rows) == [{"a": 1}, {"a": 2}]
    drop_cut_last_line(rows)
    assert rows.read_text() == '{"a": 1}\n{"a": 2}\n'
    drop_cut_last_line(rows)  # whole lines stay as they are
    assert rows.read_text() == '{"a": 1}\n{"a": 2}\n'
    rows.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ConfigError, match=r"trials\.jsonl: line 2 is damaged, not JSON"):
        read_jsonl(rows)
    rows.write_text('{"a": 1}\n[]\n')
    with pytest.raises(ConfigError, match=r"line 2 is damaged, a JSON list where rl_pbt wrote"):
        read_jsonl(rows)
    info = tmp_path / "run.json"
    for text, message in (('{"config": {', "run.json: damaged, not JSON"),
                          ("[]", "run.json: damaged, a JSON list where rl_pbt wrote an object")):
        info.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            read_json(info)


def test_resume_without_the_trials_checkpoints_is_refused(tmp_path):
    """Tune retried each trial from a checkpoint that was gone until all failed, and the
    summary it then wrote made the folder unresumable for good."""
    from rl_pbt.resume import load_resume

    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "tuner.pkl").write_bytes(b"")
    (tmp_path / "run.json").write_text(json.dumps(
        {"config": {"checkpoint": {"frequency": 4}}, "seed": 1}))
    trial = tmp_path / "tune" / "PBTPPO_CartPole-v1_ab123_00000_0_lr=0.001"
    trial.mkdir()
    (tmp_path / TRIALS_FILE).write_text("".join(
        json.dumps({"trial_id": "ab123_00000", "training_iteration": i, "return": 10.0 * i,
                    "time_total_s": float(i)}) + "\n" for i in range(1, 9)))
    with pytest.raises(ConfigError, match="the checkpoints of trial ab123_00000 are gone"):
        load_resume(tmp_path)
    (trial / "checkpoint_000001").mkdir()
    assert load_resume(tmp_path)[1].last_iteration == {"ab123_00000": 8}

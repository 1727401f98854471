"""Continue a run that was killed or interrupted: ``python -m rl_pbt resume=RUN_DIR``.

The run folder holds all it takes: ``run.json`` (the resolved config, seed and MLflow ids),
``tune/`` (Tune's experiment state and the trials' checkpoints) and ``trials.jsonl``. A resumed
run uses the same config, restores every unfinished trial from its last checkpoint and writes
into the same records and the same MLflow parent and child runs.

Restored trials repeat the iterations between their last checkpoint and the kill. Those
iterations are already recorded (in ``trials.jsonl`` and MLflow, which cannot delete a metric
point), so :class:`Repeats` tells the recorders to skip them: every iteration is recorded once.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from ray.tune import Callback
from ray.tune.experiment import Trial

from rl_pbt.analysis.lineage import RunRecords
from rl_pbt.cli import RUN_INFO
from rl_pbt.errors import ConfigError
from rl_pbt.plan import Plan, Tracking
from rl_pbt.records import (
    EXPLOITS_FILE,
    FAILURES_FILE,
    TRIALS_FILE,
    drop_cut_last_line,
    read_json,
    write_json,
)


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run picks up: its folder, recorded iterations and MLflow runs."""

    run_dir: Path
    last_iteration: dict[str, int]
    tracking: dict[str, Any] | None
    command: str
    choices: dict[str, str]


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"python -m rl_pbt resume={run_dir.resolve()}"


def load_resume(run_dir: Path) -> tuple[Any, ResumePoint]:
    """The saved config of ``run_dir`` (a DictConfig) and where the run stopped.

    Raises ConfigError for a folder that is not a resumable rl_pbt run.
    """
    run_dir = run_dir.expanduser().resolve()
    info = read_json(run_dir / RUN_INFO) if run_dir.is_dir() else None
    if not info or "config" not in info:
        raise ConfigError(f"resume: {run_dir} is not an rl_pbt run folder (no {RUN_INFO})")
    if not (run_dir / "tune" / "tuner.pkl").is_file():
        raise ConfigError(f"resume: {run_dir} has no Tune experiment to continue "
                          "(tune/tuner.pkl is missing)")
    if (run_dir / "summary.json").is_file():
        raise ConfigError(f"resume: the run in {run_dir} finished (summary.json); "
                          "start a new run instead")
    for name in (TRIALS_FILE, EXPLOITS_FILE, FAILURES_FILE):
        drop_cut_last_line(run_dir / name)
    cfg = OmegaConf.create(info["config"])
    cfg.seed = info["seed"]
    cfg.resume = None
    records = RunRecords.load(run_dir)
    _check_checkpoints_kept(run_dir, records, (info["config"].get("checkpoint") or {}))
    return cfg, ResumePoint(run_dir, last_recorded(records),
                            info.get("tracking"), info.get("command", ""),
                            info.get("choices", {}))


def _check_checkpoints_kept(run_dir: Path, records: RunRecords,
                            checkpoint: dict[str, Any]) -> None:
    """Refuse a resume whose trials trained past a periodic checkpoint but have none left:
    Tune retried each from a checkpoint that is gone until it failed for good, and the run
    ended 'every trial failed' with a summary (so it could not be resumed again)."""
    every = checkpoint.get("frequency") or 0
    if not every:
        return  # only PBT's saves: a trial may rightly have none
    gone = []
    for trial_id in records.trial_ids():
        trained = max(int(r["training_iteration"] or 0) for r in records.rows_of(trial_id))
        folders = list((run_dir / "tune").glob(f"*_{trial_id}_*"))
        kept = any(next(f.glob(pattern), None) for f in folders
                   for pattern in ("checkpoint_*", "exploit_*"))
        if folders and trained >= every and not kept:
            gone.append(trial_id)
    if gone:
        raise ConfigError(f"resume: the checkpoints of trial {', '.join(gone)} are gone from "
                          f"{run_dir / 'tune'}; the run cannot go on from where it stopped: "
                          "start a new run")


def last_recorded(records: RunRecords) -> dict[str, int]:
    """Each trial's last recorded iteration of the history it goes on with after a restore.

    That is its latest result, not its highest iteration: an exploit rewinds a trial to the
    clone's checkpoint, and the iterations it trains after that are new. An exploit recorded
    after a trial's latest result (the kill came before the next one) rewinds it too, to the
    clone's checkpoint iteration.
    """
    finals = records.final_rows()
    last = {trial_id: int(row["training_iteration"]) for trial_id, row in finals.items()}
    for event in sorted(records.exploits, key=lambda e: e["wall_time"]):
        row = finals.get(event["trial_id"])
        if row is not None and event["wall_time"] > row["recorded_at"]:
            last[event["trial_id"]] = int(event["source_iteration"])
    return last


def resumed_plan(plan: Plan, point: ResumePoint) -> Plan:
    """The plan as it was first run: same command, choices and tracking store.

    A relative SQLite path was anchored at the first run's launch directory; ``run.json``
    kept the absolute URI, so resuming from anywhere writes to the same store.
    """
    tracking = point.tracking
    if tracking:
        plan = replace(plan, tracking=Tracking(tracking["backend"], tracking["tracking_uri"],
                                               tracking["experiment_name"]))
        from rl_pbt.tracking import check_run_store

        check_run_store(plan.tracking, "put it back to continue the run's MLflow runs")
    return replace(plan, command=point.command or plan.command,
                   choices=point.choices or plan.choices)


def record_resume(point: ResumePoint, ray_cluster: dict[str, Any] | None) -> None:
    """Add this resume to ``run.json``: when, from which iterations, and on which Ray cluster
    (the first part's nodes stay under ``ray``; a resume may run on other machines)."""
    path = point.run_dir / RUN_INFO
    info = read_json(path)
    info.setdefault("resumes", []).append({
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "last_iteration": point.last_iteration,
        "ray": ray_cluster,
    })
    write_json(info, path)


class Repeats(Callback):
    """Decides, once per result, whether that iteration was recorded already.

    A trial restored from a checkpoint (on resume, or on a retry after a failure) trains again
    the iterations after that checkpoint; they are repeats until it passes the last recorded
    iteration. An exploit ends that: the trial's history continues from the clone's.
    Listed before the recorders, which ask :meth:`is_repeat` for the same result.
    """

    def __init__(self, last_iteration: dict[str, int] | None = None) -> None:
        self.last = dict(last_iteration or {})
        self.rewound = set(self.last)
        self.exploited: set[str] = set()
        self.decided: dict[str, bool] = {}

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        step = int(result.get("training_iteration", 0))
        tid = trial.trial_id
        repeat = tid in self.rewound and step <= self.last.get(tid, 0)
        if not repeat:
            self.rewound.discard(tid)
            self.last[tid] = step
        self.decided[tid] = repeat
        if tid in self.exploited:  # the exploit came with this result; the next is the clone's
            self.exploited.discard(tid)
            self.rewound.discard(tid)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        self.rewound.add(trial.trial_id)

    def on_exploit(self, event: Any) -> None:
        """Tune runs the scheduler before the callbacks: the exploit's result is still to come."""
        self.exploited.add(event.trial_id)

    def is_repeat(self, trial: Trial) -> bool:
        """Whether the result being processed for ``trial`` repeats a recorded iteration."""
        return self.decided.get(trial.trial_id, False)


class CtrlC(Callback):
    """Notices the Ctrl-C that Tune turns into a clean stop, so the run can say how to resume.

    Tune installs its SIGINT handler before it sets up callbacks, stops the loop on the first
    Ctrl-C, saves the experiment and returns from ``fit`` as if the run had ended; trials it
    stopped look finished. Wrapping Tune's handler here records that it fired.
    """

    def __init__(self) -> None:
        self.caught = False

    def setup(self, **info: Any) -> None:
        tune_handler = signal.getsignal(signal.SIGINT)
        if not callable(tune_handler) or threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            self.caught = True
            tune_handler(signum, frame)

        signal.signal(signal.SIGINT, handler)


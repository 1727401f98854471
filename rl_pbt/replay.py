"""``python -m rl_pbt.replay RUN_DIR [seeds=N]``: train fresh agents on the winning schedule.

PBT's winner may owe its return to the schedule or to luck (its seed, the trials it happened to
clone). Replaying the schedule (the same hyperparameters, changed at the same iterations) on N
fresh seeds and comparing mean +/- std of their final return with the winner's is the honest
check. The runs are logged to MLflow under the original run's parent.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rl_pbt.cli import fail, parse_path_and_options
from rl_pbt.errors import ConfigError
from rl_pbt.records import read_json, write_json


def parse_options(args: list[str]) -> tuple[Path, int]:
    """``RUN_DIR [seeds=N]``."""
    path, options = parse_path_and_options(
        args, {"seeds": int}, {"seeds": 3}, "python -m rl_pbt.replay RUN_DIR [seeds=N]",
        __doc__)
    if options["seeds"] < 1:
        raise ConfigError(f"seeds: must be an integer >= 1, got {options['seeds']}")
    return path, options["seeds"]


def load_schedule(run_dir: Path) -> dict[str, Any]:
    """``best_schedule.json`` of the run, written by the report (made now if missing)."""
    from rl_pbt.analysis.report import load_info, write_report

    load_info(run_dir)
    run_summary(run_dir)  # before the report is written into a run that cannot be replayed
    path = run_dir / "best_schedule.json"
    if not path.is_file():
        write_report(run_dir)
    return read_json(path)


def replay_plan(run_dir: Path, schedule: dict[str, Any], seeds: int) -> Any:
    """The original run's plan, with the schedule's first values, N seeds, the replay scheduler."""
    from omegaconf import OmegaConf

    from rl_pbt.analysis.report import load_info
    from rl_pbt.plan import SchedulerSpec, StopRule, Tracking
    from rl_pbt.resolve import resolve

    info = load_info(run_dir)
    out = run_dir / "replay" / time.strftime("%Y-%m-%d_%H-%M-%S")
    plan = resolve(OmegaConf.create(info["config"]), out, info.get("choices"))
    points = schedule["schedule"]
    tracking = run_summary(run_dir).get("tracking") or {}
    return replace(
        plan,
        name=f"replay-{plan.name}",
        population=seeds,
        param_space={**plan.param_space, **points[0]["hyperparameters"]},
        scheduler=SchedulerSpec("replay", {"changes": [(p["iteration"], p["hyperparameters"])
                                                       for p in points[1:]]}),
        stop=StopRule(plan.stop.metric, plan.stop.mode, _final_iteration(run_dir, schedule),
                      None, None, None),
        tracking=Tracking("mlflow", tracking["tracking_uri"], tracking["experiment_name"])
        if tracking else Tracking("none", None, None),
        command=f"python -m rl_pbt.replay {run_dir} seeds={seeds}",
    )


def run_summary(run_dir: Path) -> dict[str, Any]:
    """``summary.json``: a run that was killed before it finished has none."""
    summary = read_json(run_dir / "summary.json")
    if summary is None:
        raise ConfigError(f"{run_dir}: no summary.json (the run did not finish); nothing to replay")
    return summary


def _final_iteration(run_dir: Path, schedule: dict[str, Any]) -> int:
    lineage = schedule.get("lineage") or []
    if not lineage:
        raise ConfigError(f"{run_dir}: best_schedule.json has no lineage")
    return int(lineage[-1]["last_iteration"])


def replay(run_dir: Path, seeds: int) -> dict[str, Any]:
    """Train the seeds on the schedule; write and return mean +/- std next to the original."""
    from rl_pbt.run import execute
    from rl_pbt.tracking import check_run_store

    schedule = load_schedule(run_dir)
    plan = replay_plan(run_dir, schedule, seeds)
    if plan.tracking.enabled:  # the run's own store: replay has no tracking option to change
        check_run_store(plan.tracking, "replay nests under the run's MLflow runs there")
    parent = (run_summary(run_dir).get("tracking") or {}).get("parent_run_id")
    previous = os.environ.get("MLFLOW_RUN_ID")
    if parent:
        os.environ["MLFLOW_RUN_ID"] = parent  # nest the replay under the original run
    try:
        result = execute(plan, {"rl_pbt.replay_of": str(run_dir)})
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = previous
    returns = [t["return"] for t in result["trials"] if t["return"] is not None]
    out = {
        "run_dir": str(run_dir), "seeds": seeds, "iterations": plan.stop.max_iterations,
        "original_best_return": schedule["return"],
        "replay_returns": returns,
        "replay_return_mean": statistics.fmean(returns) if returns else None,
        "replay_return_std": statistics.pstdev(returns) if returns else None,
        "replay_dir": str(plan.output_dir),
    }
    write_json(out, plan.output_dir / "replay.json")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        run_dir, seeds = parse_options(sys.argv[1:] if argv is None else argv)
        out = replay(run_dir, seeds)
    except ConfigError as err:
        fail(err)
    mean, std = out["replay_return_mean"], out["replay_return_std"]
    replayed = "no episode finished" if mean is None else f"{mean:.1f} +/- {std:.1f}"
    print(f"replay of the winning schedule, {seeds} fresh seeds, {out['iterations']} iterations: "
          f"return {replayed}; the original best trial: {out['original_best_return']:.1f}")
    return out


if __name__ == "__main__":
    main()

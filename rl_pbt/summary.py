"""The end of a run: what PBT found, in a form a person can act on and a program can read."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rl_pbt.analysis.lineage import RunRecords, best_of
from rl_pbt.plan import Plan
from rl_pbt.records import EARLY_STOPS_FILE, FAILURES_FILE, read_jsonl, write_json
from rl_pbt.stopping import target_reached
from rl_pbt.values import finite, first_line, short

_TRIAL_DIR = re.compile(r"_(?P<id>[0-9a-f]{5}_\d{5})_")


def trial_id_of(path: str | Path) -> str | None:
    """The trial id in a Tune trial folder's name (``PBTPPO_CartPole-v1_66f91_00001_1_...``)."""
    match = _TRIAL_DIR.search(Path(path).name)
    return match["id"] if match else None


def latest_checkpoint(tune_dir: Path, trial_id: str) -> str | None:
    """The newest checkpoint in the trial's folder."""
    found = sorted(tune_dir.glob(f"*_{trial_id}_*/checkpoint_*"), key=lambda p: p.name)
    return str(found[-1]) if found else None


def trial_rows(plan: Plan, results: Any, exploits: Mapping[str, int]) -> list[dict[str, Any]]:
    """Each trial's final state, from rl_pbt's own records.

    Tune's ``ResultGrid`` is not used for this: seen here, when ``stop_all`` ended a run while a
    paused trial waited for a reused actor, its Result carried another trial's metrics and path.
    Only errors are taken from it, where rl_pbt's failure records have none.
    """
    failures = read_jsonl(plan.output_dir / FAILURES_FILE)
    stopped_early = {s["trial_id"]: s["iteration"]
                     for s in read_jsonl(plan.output_dir / EARLY_STOPS_FILE)}
    retries = Counter(f["trial_id"] for f in failures if f["retried"])
    errors = {trial_id_of(r.path): first_line(r.error) for r in results if r.error}
    errors.update({f["trial_id"]: f["error"] for f in failures if not f["retried"]})
    records = RunRecords.load(plan.output_dir)
    finals = records.final_rows()
    rows = []
    # A trial Tune made but never ran (a wall-time budget spent before its turn) has only
    # Tune's result: it is listed too, so the population adds up.
    made = {trial_id_of(r.path) for r in results if getattr(r, "path", None)}
    for trial_id in sorted(set(finals) | {t for t in (*errors, *made) if t}):
        last = finals.get(trial_id, {})
        scored = records.last_scored(trial_id) or {}
        exploit = records.last_exploit(trial_id) if not scored else None
        # A resume may have trained a trial on after the stop ASHA made before the kill.
        early = stopped_early.get(trial_id)
        rows.append({
            "trial_id": trial_id,
            "return": finite(scored.get("return")),
            "return_iteration": scored.get("training_iteration"),
            "env_steps": finite(last.get("env_steps")),
            "iterations": last.get("training_iteration"),
            "hyperparameters": last.get("hyperparameters", {}),
            "checkpoint": latest_checkpoint(plan.output_dir / "tune", trial_id),
            "exploits": exploits.get(trial_id, 0),
            "retries": retries.get(trial_id, 0),
            "error": errors.get(trial_id),
            "stopped_early_at": early if early == last.get("training_iteration") else None,
            "unscored_since": exploit and {"source_id": exploit["source_id"],
                                           "iteration": exploit["iteration"]},
        })
    return rows


def build_summary(
    plan: Plan,
    results: Any,
    exploits: Mapping[str, int],
    wall_time_s: float,
    concurrency: str,
    tracking: Mapping[str, Any] | None,
    resumed: bool = False,
) -> dict[str, Any]:
    """Everything the printed summary and ``summary.json`` hold; a resumed run's wall time is
    that of this invocation (a killed one's end is not known)."""
    rows = trial_rows(plan, results, exploits)
    return {
        "name": plan.name,
        "metric": plan.stop.metric,
        "mode": plan.stop.mode,
        "target_return": plan.stop.target_return,
        "best": best_of(rows, plan.stop.mode),
        "trials": rows,
        "exploits": sum(exploits.values()),
        "wall_time_s": round(wall_time_s, 1),
        "resumed": resumed,
        "concurrency": concurrency,
        "output_dir": str(plan.output_dir),
        "tracking": dict(tracking) if tracking else None,
        "seed": plan.seed,
        "stopped_by": stopped_by(plan, rows, wall_time_s),
    }


def stopped_by(plan: Plan, rows: list[dict[str, Any]], wall_time_s: float) -> str:
    """What ended the run, from its rule and its trials' last records (the stopper's own state
    stays in Tune): a target, the wall-time budget, the caps, or the scheduler."""
    rule = plan.stop
    if _first_error_if_all_failed(rows):
        return "every trial failed"
    if any(target_reached(row["return"], rule.target_return, rule.mode) for row in rows):
        return (f"a trial reached the target {rule.target_return:g}" +
                ("" if rule.stop_all_at_target else "; each trial stopped at its own"))
    ran = [row for row in rows if row["iterations"] is not None and not row.get("error")]
    if rule.max_iterations and ran and all(row["iterations"] >= rule.max_iterations
                                           for row in ran):
        return f"every trial reached its iteration cap ({rule.max_iterations})"
    if rule.max_env_steps and ran and all((row["env_steps"] or 0) >= rule.max_env_steps
                                          for row in ran):
        return f"every trial spent its env-step budget ({rule.max_env_steps:g})"
    # Checked after the caps: the command's wall time includes the start that the budget,
    # counted from Tune's start, does not.
    if rule.max_seconds is not None and wall_time_s >= rule.max_seconds:
        return f"the wall-time budget of {rule.max_seconds:g} s ran out"
    early = sum(row.get("stopped_early_at") is not None for row in rows)
    if early:
        return (f"ASHA stopping {early} of {len(rows)} trials early; "
                "the others ran to their caps")
    if plan.scheduler.name == "asha":
        return (f"ASHA's max_t ({plan.scheduler.options.get('max_t')}) or each trial's own "
                "stop rule")
    return "each trial's own stop rule (iteration cap, target or env-step budget)"


def every_trial_failed(summary: Mapping[str, Any]) -> str | None:
    """The first trial's error when every trial of the run ended in an error, else None: a
    failed command, however orderly its end (the summary still names the best checkpoint of
    any training before the errors)."""
    return _first_error_if_all_failed(summary.get("trials") or [])


def _first_error_if_all_failed(rows: list[Mapping[str, Any]]) -> str | None:
    if rows and all(row.get("error") for row in rows):
        return str(rows[0]["error"])
    return None


def write_summary(summary: Mapping[str, Any], output_dir: Path) -> Path:
    """Write ``summary.json`` into the run folder."""
    return write_json(summary, output_dir / "summary.json")


def run_info(plan: Plan, ray_cluster: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What analysis needs to know of a run besides its records (``run.json``).

    ``ray_cluster`` is :func:`rl_pbt.cluster.describe`: whether Ray was started here or joined,
    and the cluster's nodes, which every result's ``probe.node_id`` refers to.
    """
    return {
        "name": plan.name,
        "env_id": plan.env.id,
        "metric": plan.stop.metric,
        "mode": plan.stop.mode,
        "target_return": plan.stop.target_return,
        "population": plan.population,
        "seed": plan.seed,
        "command": plan.command,
        "choices": plan.choices,
        "mutations": {k: d.describe() for k, d in plan.mutations.items()},
        "config": yaml.safe_load(plan.config_yaml) if plan.config_yaml else {},
        "ray": dict(ray_cluster) if ray_cluster else None,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The block printed at the end of a run."""
    best = summary.get("best")
    lines = [f"== rl_pbt: {summary['name']} ==",
             f"wall time {summary['wall_time_s']:.0f} s"
             f"{' since the resume' if summary.get('resumed') else ''}, "
             f"{summary['exploits']} exploits, "
             f"{len(summary['trials'])} trials"]
    if summary.get("stopped_by"):
        lines.append(f"stopped by   {summary['stopped_by']}")
    if best is None and not any(row["iterations"] for row in summary["trials"]):
        lines.append("No trial finished an iteration before the run stopped.")
    elif best is None:
        lines.append(f"No trial reported {summary['metric']} (no episode finished).")
    else:
        target = summary.get("target_return")
        hit = target_reached(best["return"], target, summary["mode"])
        reached = "" if target is None else (
            f" (target {target:g}: {'reached' if hit else 'not reached'})")
        hyper = ", ".join(f"{k}={short(v)}" for k, v in best["hyperparameters"].items())
        failed = any(row["trial_id"] == best["trial_id"] and row.get("error")
                     for row in summary["trials"])
        lines += [
            f"best trial   {best['trial_id']}: return {best['return']:.1f}{reached}"
            f"{', then it failed' if failed else ''}",
            f"env steps    {best['env_steps']:.0f} in {best['iterations']} iterations"
            if best["env_steps"] is not None else "env steps    unknown",
            f"final hyperparameters  {hyper}",
            f"checkpoint   {best['checkpoint'] or 'none left in the trial folder'}",
        ]
    for row in summary["trials"]:
        score = "n/a" if row["return"] is None else f"{row['return']:.1f}"
        since = row.get("unscored_since")
        if row["return"] is None and since:
            score += (f" (took {since['source_id']}'s weights at iteration {since['iteration']},"
                      " no episode finished since)")
        if row["return"] is not None and row.get("return_iteration") != row["iterations"]:
            score += f" (at iteration {row['return_iteration']})"
        status = f"  FAILED: {row['error']}" if row["error"] else ""
        if row.get("stopped_early_at") is not None and not row["error"]:
            status = f", stopped early by ASHA at iteration {row['stopped_early_at']}"
        if row.get("retries"):
            status = f", {row['retries']} retried failures" + status
        if row["iterations"] is None and not row["error"]:
            lines.append(f"  trial {row['trial_id']}: finished no iteration before the run "
                         "stopped")
            continue
        lines.append(f"  trial {row['trial_id']}: return {score}, {row['iterations']} it, "
                     f"{row['exploits']} exploits{status}")
    tracking = summary.get("tracking")
    if tracking:
        lines += [f"MLflow       experiment {tracking['experiment_name']!r} "
                  f"(id {tracking['experiment_id']}), parent run {tracking['parent_run_id']}",
                  f"open the UI  {tracking['ui_command']}"]
    lines.append(f"run folder   {summary['output_dir']}")
    return "\n".join(lines)

"""The end of a run: what PBT found, in a form a person can act on and a program can read."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rl_pbt.plan import Plan
from rl_pbt.stopping import ENV_STEPS, result_value, target_reached


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def trial_row(result: Any, plan: Plan, exploits: Mapping[str, int]) -> dict[str, Any]:
    """One trial's final state from a Tune ``Result``."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name
    return {
        "trial_id": trial_id,
        "return": _number(result_value(metrics, plan.stop.metric)),
        "env_steps": _number(result_value(metrics, ENV_STEPS)),
        "iterations": metrics.get("training_iteration"),
        "hyperparameters": {k: result.config.get(k) for k in plan.mutations},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "exploits": exploits.get(trial_id, 0),
        "error": str(result.error).splitlines()[0] if result.error else None,
    }


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The trial with the best final score; None when no trial finished an episode."""
    scored = [r for r in rows if r["return"] is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r["return"])


def build_summary(
    plan: Plan,
    results: Any,
    exploits: Mapping[str, int],
    wall_time_s: float,
    concurrency: str,
    tracking: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Everything the printed summary and ``summary.json`` hold."""
    rows = [trial_row(result, plan, exploits) for result in results]
    return {
        "name": plan.name,
        "metric": plan.stop.metric,
        "mode": plan.stop.mode,
        "target_return": plan.stop.target_return,
        "best": best_row(rows, plan.stop.mode),
        "trials": rows,
        "exploits": sum(exploits.values()),
        "wall_time_s": round(wall_time_s, 1),
        "concurrency": concurrency,
        "output_dir": str(plan.output_dir),
        "tracking": dict(tracking) if tracking else None,
        "seed": plan.seed,
    }


def write_json(data: Any, path: Path) -> Path:
    """Write JSON atomically, so a reader never sees half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def write_summary(summary: Mapping[str, Any], output_dir: Path) -> Path:
    """Write ``summary.json`` into the run folder."""
    return write_json(summary, output_dir / "summary.json")


def run_info(plan: Plan) -> dict[str, Any]:
    """What analysis needs to know of a run besides its records (``run.json``)."""
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
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The block printed at the end of a run."""
    best = summary.get("best")
    lines = [f"== rl_pbt: {summary['name']} ==",
             f"wall time {summary['wall_time_s']:.0f} s, {summary['exploits']} exploits, "
             f"{len(summary['trials'])} trials"]
    if best is None:
        lines.append(f"No trial reported {summary['metric']} (no episode finished).")
    else:
        target = summary.get("target_return")
        hit = target_reached(best["return"], target, summary["mode"])
        reached = "" if target is None else (
            f" (target {target:g}: {'reached' if hit else 'not reached'})")
        hyper = ", ".join(f"{k}={_short(v)}" for k, v in best["hyperparameters"].items())
        lines += [
            f"best trial   {best['trial_id']}: return {best['return']:.1f}{reached}",
            f"env steps    {best['env_steps']:.0f} in {best['iterations']} iterations"
            if best["env_steps"] is not None else "env steps    unknown",
            f"final hyperparameters  {hyper}",
            f"checkpoint   {best['checkpoint']}",
        ]
    for row in summary["trials"]:
        score = "n/a" if row["return"] is None else f"{row['return']:.1f}"
        status = f"  FAILED: {row['error']}" if row["error"] else ""
        lines.append(f"  trial {row['trial_id']}: return {score}, {row['iterations']} it, "
                     f"{row['exploits']} exploits{status}")
    tracking = summary.get("tracking")
    if tracking:
        lines += [f"MLflow       experiment {tracking['experiment_name']!r} "
                  f"(id {tracking['experiment_id']}), parent run {tracking['parent_run_id']}",
                  f"open the UI  {tracking['ui_command']}"]
    lines.append(f"run folder   {summary['output_dir']}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

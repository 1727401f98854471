"""Compare the schedulers of one sweep, as MLflow recorded them.

    python -m rl_pbt -m scheduler=pbt,pb2,random          # same env, same stopper: equal budget
    python scripts/compare_schedulers.py [--tracking-uri sqlite:///mlflow.db] [--sweep DIR]
                                         [--out DIR]

One row per parent run of the sweep (tag ``rl_pbt.sweep``; default: the sweep of the newest
parent run that has one): scheduler, env, best return, time to target, env steps of the best
trial, wall time, status. Prints a Markdown table and writes ``compare_schedulers.md`` and
``.csv`` into the sweep folder (or ``--out``; the current directory when the sweep folder is not
on this machine).

Where each number comes from (nothing is estimated):

- best return, env steps: the parent's metrics ``best_return`` and ``best_env_steps``.
- wall time: ``wall_time_s`` of the parent's ``summary.json``, the number the run's own summary
  printed; for a run without one, or a resumed one (whose summary counts from the resume), the
  parent run's end minus its start (MLflow's clock: the
  parent is created once Ray is up and ended after the report is written).
- time to target: the parent does not log it, so it is read from the child runs: the first
  per-iteration ``episode_return_mean`` at or beyond the target (``target_return`` and ``mode``
  of the parent's ``summary.json``), its timestamp minus the parent's start. Those timestamps
  are Tune's result timestamps, whole seconds: the time is exact to about 1 s.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rl_pbt.stopping import target_reached
from rl_pbt.tracking import JOB_TAG, RESULT_METRICS, SWEEP_TAG, child_runs

OUTPUT_NAME = "compare_schedulers"
COLUMNS = ("job", "scheduler", "env", "best return", "time to target, s",
           "env steps (best trial)", "wall time, s", "status")


def experiment_ids(client: Any) -> list[str]:
    """Every experiment of the store: a sweep's runs may sit in any of them."""
    return [e.experiment_id for e in client.search_experiments()]


def latest_sweep(client: Any, experiments: list[str]) -> str | None:
    """The sweep folder of the newest parent run that belongs to a sweep."""
    runs = client.search_runs(experiments, f"tags.`{SWEEP_TAG}` != ''",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.tags[SWEEP_TAG] if runs else None


def sweep_parents(client: Any, experiments: list[str], sweep: str) -> list[Any]:
    """The sweep's parent runs, in job order."""
    runs = client.search_runs(experiments, f"tags.`{SWEEP_TAG}` = '{sweep}'", max_results=5000)
    return sorted(runs, key=lambda r: _job_number(r.data.tags.get(JOB_TAG)))


def _job_number(job: str | None) -> float:
    try:
        return float(job) if job is not None else float("inf")
    except ValueError:
        return float("inf")


def run_summary(client: Any, run_id: str) -> dict[str, Any] | None:
    """The parent's ``summary.json`` (written when the run ended normally), else None."""
    if not any(a.path == "summary.json" for a in client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "summary.json", tmp))
                          .read_text())


def time_to_target(client: Any, parent: Any, summary: Mapping[str, Any] | None) -> str:
    """Seconds from the parent's start to the first child result at the target, as text.

    Returns:
        ``"123.0"``, ``"not reached"``, ``"no target"``, or ``"unknown"`` when the run holds
        no summary, no child runs, or its metric is not one the children log.
    """
    if summary is None:
        return "unknown"
    target, mode = summary.get("target_return"), summary.get("mode", "max")
    if target is None:
        return "no target"
    metric = RESULT_METRICS.get(summary.get("metric", ""))
    children = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    if metric is None or not children:
        return "unknown"
    stamps = [m.timestamp for child in children
              for m in client.get_metric_history(child.info.run_id, metric)
              if m.timestamp > 0 and target_reached(m.value, target, mode)]
    if not stamps:
        return "not reached"
    return f"{(min(stamps) - parent.info.start_time) / 1000:.1f}"


def row_for(client: Any, parent: Any) -> dict[str, Any]:
    """One table row for one parent run."""
    tags, metrics, info = parent.data.tags, parent.data.metrics, parent.info
    summary = run_summary(client, info.run_id)
    # A resumed run's summary counts from the resume; MLflow's parent spans the whole run.
    wall = None if (summary or {}).get("resumed") else (summary or {}).get("wall_time_s")
    if wall is None and info.end_time:
        wall = (info.end_time - info.start_time) / 1000
    return {
        "job": tags.get(JOB_TAG, ""),
        "scheduler": tags.get("rl_pbt.scheduler", "?"),
        "env": tags.get("rl_pbt.env", tags.get("mlflow.runName", "?")),
        "best return": _rounded(metrics.get("best_return"), 1),
        "time to target, s": time_to_target(client, parent, summary),
        "env steps (best trial)": _rounded(metrics.get("best_env_steps"), 0),
        "wall time, s": _rounded(wall, 1),
        "status": info.status,
    }


def _rounded(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if digits else str(round(value))


def markdown(rows: Iterable[Mapping[str, Any]], sweep: str) -> str:
    """The table, with the sweep it is about."""
    lines = [f"Sweep `{sweep}`", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict[str, Any]], table: str, out_dir: Path) -> list[Path]:
    """Write the Markdown table and the CSV; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{OUTPUT_NAME}.md", out_dir / f"{OUTPUT_NAME}.csv"
    md_path.write_text(table)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return [md_path, csv_path]


def compare(tracking_uri: str, sweep: str | None = None, out: Path | None = None,
            ) -> tuple[str, list[dict[str, Any]], list[Path]]:
    """Find the sweep, tabulate its parent runs, write the files.

    Raises:
        SystemExit: no sweep in the store, or none of the given name.
    """
    from mlflow.tracking import MlflowClient

    from rl_pbt.errors import ConfigError
    from rl_pbt.plan import Tracking
    from rl_pbt.tracking import check_run_store

    try:  # a SQLite store that is not there would be made, empty; a dead server retried 250 s
        check_run_store(Tracking("mlflow", tracking_uri, None),
                        "give the store the sweep was tracked in (--tracking-uri)")
    except ConfigError as err:
        raise SystemExit(f"compare_schedulers: {err}") from None
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = experiment_ids(client)
    sweep = sweep or latest_sweep(client, experiments)
    if sweep is None:
        raise SystemExit(f"compare_schedulers: no run in {tracking_uri} has the tag {SWEEP_TAG}; "
                         "run a sweep first: python -m rl_pbt -m scheduler=pbt,pb2,random")
    parents = sweep_parents(client, experiments, sweep)
    if not parents:
        raise SystemExit(f"compare_schedulers: no parent run has {SWEEP_TAG} = {sweep!r}")
    rows = [row_for(client, parent) for parent in parents]
    table = markdown(rows, sweep)
    out_dir = out or (Path(sweep) if Path(sweep).is_dir() else Path.cwd())
    return table, rows, write_outputs(rows, table, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow store (default: sqlite:///mlflow.db here)")
    parser.add_argument("--sweep", help="the sweep folder (default: the newest sweep)")
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep folder)")
    args = parser.parse_args(argv)
    table, _, paths = compare(args.tracking_uri, args.sweep and str(Path(args.sweep).resolve()),
                              args.out)
    print(table)
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

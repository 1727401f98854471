"""Who carried the winning agent's weights, when, and with which hyperparameters.

In PBT a trial's weights are not its own: at each exploit it takes a better trial's checkpoint
and perturbs that trial's hyperparameters. The agent at the end of the best trial was therefore
trained in stretches by several trials. Walking the exploits backwards from the end of a trial
recovers those stretches; the winning schedule is the hyperparameters of each stretch, by
iteration and env step.

Input is the run folder's ``trials.jsonl`` and ``exploits.jsonl`` (see ``rl_pbt.records``):
every result and every exploit with the driver's clock, so the order of events is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_pbt.records import EXPLOITS_FILE, TRIALS_FILE, read_jsonl
from rl_pbt.values import finite


@dataclass(frozen=True)
class Segment:
    """A stretch of training of the final agent, done by one trial with fixed hyperparameters.

    Attributes:
        trial_id: the trial that trained in this stretch.
        first_iteration: first training iteration of the stretch (1-based).
        last_iteration: last training iteration of the stretch.
        start_env_steps: lifetime env steps of the agent before the stretch began.
        end_env_steps: lifetime env steps at its end.
        hyperparameters: the mutated hyperparameters in force.
    """

    trial_id: str
    first_iteration: int
    last_iteration: int
    start_env_steps: float
    end_env_steps: float
    hyperparameters: dict[str, Any]


@dataclass(frozen=True)
class RunRecords:
    """The rows of ``trials.jsonl`` and ``exploits.jsonl``."""

    rows: list[dict[str, Any]]
    exploits: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: Path) -> RunRecords:
        return cls(read_jsonl(run_dir / TRIALS_FILE), read_jsonl(run_dir / EXPLOITS_FILE))

    def trial_ids(self) -> list[str]:
        return sorted({r["trial_id"] for r in self.rows})

    def rows_of(self, trial_id: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["trial_id"] == trial_id]

    def final_rows(self) -> dict[str, dict[str, Any]]:
        """Each trial's last result, in the order results arrived."""
        last: dict[str, dict[str, Any]] = {}
        for row in sorted(self.rows, key=_time):
            last[row["trial_id"]] = row
        return last

    def last_scored(self, trial_id: str) -> dict[str, Any] | None:
        """The trial's latest row with a finite return, if its agent has not been replaced since.

        An iteration in which no episode finished reports no return (a 500-step CartPole episode
        spans several iterations), so the last row alone would show a trained trial as unscored.
        A return from before the trial's latest exploit belonged to the agent it discarded.
        """
        scored = [r for r in self.rows_of(trial_id) if finite(r.get("return")) is not None]
        if not scored:
            return None
        row = max(scored, key=_time)
        exploit = self.last_exploit(trial_id)
        if exploit is not None and exploit["wall_time"] > _time(row):
            return None
        return row

    def last_exploit(self, trial_id: str) -> dict[str, Any] | None:
        """The trial's latest exploit (the last time it took another trial's weights)."""
        exploited = [e for e in self.exploits if e["trial_id"] == trial_id]
        return max(exploited, key=lambda e: e["wall_time"]) if exploited else None


    def scored_rows(self) -> list[dict[str, Any]]:
        """Each trial's :meth:`last_scored` row, for trials that have one."""
        rows = (self.last_scored(t) for t in self.trial_ids())
        return [r for r in rows if r is not None]


def best_of(rows: Sequence[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The row with the best finite ``return``; None when no row has one."""
    scored = [r for r in rows if finite(r.get("return")) is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r["return"])


def _time(row: dict[str, Any]) -> float:
    return float(row.get("recorded_at", row.get("timestamp", 0.0)))


def lineage(records: RunRecords, trial_id: str) -> list[Segment]:
    """The stretches that trained ``trial_id``'s final agent, oldest first."""
    segments: list[Segment] = []
    own = records.rows_of(trial_id)
    if not own:
        raise KeyError(f"no results for trial {trial_id!r}")
    current, before = trial_id, _time(own[-1]) + 1e-6
    upto = int(own[-1]["training_iteration"])
    while upto >= 1:
        exploit = _last_exploit(records.exploits, current, before)
        after = exploit["wall_time"] if exploit else -math.inf
        rows = [r for r in records.rows_of(current)
                if after < _time(r) < before and r["training_iteration"] <= upto]
        first = min((int(r["training_iteration"]) for r in rows), default=upto + 1)
        if rows:
            segments.append(_segment(current, rows, first, upto))
        if exploit is None:
            break
        current, before, upto = exploit["source_id"], exploit["wall_time"], first - 1
    return segments[::-1]


def _last_exploit(
    exploits: Sequence[dict[str, Any]], trial_id: str, before: float
) -> dict[str, Any] | None:
    mine = [e for e in exploits if e["trial_id"] == trial_id and e["wall_time"] < before]
    return max(mine, key=lambda e: e["wall_time"]) if mine else None


def _segment(trial_id: str, rows: list[dict[str, Any]], first: int, last: int) -> Segment:
    by_iteration = {int(r["training_iteration"]): r for r in rows}
    start_row, end_row = by_iteration[first], by_iteration[max(by_iteration)]
    per_iteration = _steps_per_iteration(start_row)
    return Segment(
        trial_id=trial_id,
        first_iteration=first,
        last_iteration=last,
        start_env_steps=(start_row.get("env_steps") or 0.0) - per_iteration,
        end_env_steps=end_row.get("env_steps") or 0.0,
        hyperparameters=dict(start_row.get("hyperparameters") or {}),
    )


def _steps_per_iteration(row: dict[str, Any]) -> float:
    """Env steps of one iteration: lifetime steps over iterations done (a fair estimate)."""
    steps, iteration = row.get("env_steps") or 0.0, int(row["training_iteration"])
    return steps / iteration if iteration else 0.0


def winning_schedule(segments: Sequence[Segment]) -> list[dict[str, Any]]:
    """Changepoints of the schedule: where the hyperparameters (or the trial) change."""
    points: list[dict[str, Any]] = []
    for seg in segments:
        if points and points[-1]["hyperparameters"] == seg.hyperparameters:
            continue
        points.append({"iteration": seg.first_iteration - 1,
                       "env_steps": round(seg.start_env_steps),
                       "trial_id": seg.trial_id,
                       "hyperparameters": seg.hyperparameters})
    return points

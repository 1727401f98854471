"""Every result and every exploit as JSON lines in the run folder, written as they happen.

Tune's own ``result.json`` is staged on the driver and synced to the run folder; when PBT pauses
and resumes a trial, Tune copies the synced (older) file back over the staged one and the rows in
between are lost (seen here: a trial's file kept iterations 5-6 of 6). These records do not
depend on that sync: analysis, tests and people read ``trials.jsonl`` and ``exploits.jsonl``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from rl_pbt.schedulers import ExploitEvent
from rl_pbt.stopping import ENV_STEPS, result_value
from rl_pbt.trainable import PROBE
from rl_pbt.values import finite

TRIALS_FILE = "trials.jsonl"
EXPLOITS_FILE = "exploits.jsonl"


def trained_config(result: dict[str, Any], trial: Trial) -> dict[str, Any]:
    """The config a result was trained with.

    Tune runs the scheduler before the callbacks, so by the time a callback sees the result of an
    exploit's iteration ``trial.config`` already holds the perturbed values; the result carries
    the config the trainable actually used.
    """
    return result.get("config") or trial.config


class RunRecorder(Callback):
    """Append one line per trial result and per exploit under the run folder."""

    def __init__(self, output_dir: Path, metric: str, mutated: list[str]) -> None:
        self.output_dir = output_dir
        self.metric = metric
        self.mutated = mutated
        self.pending: list[ExploitEvent] = []

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with (self.output_dir / name).open("a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        self._append(TRIALS_FILE, {
            "trial_id": trial.trial_id,
            "training_iteration": result.get("training_iteration"),
            # NaN (no episode finished this iteration) is written as null: valid JSON.
            "return": finite(result_value(result, self.metric)),
            "env_steps": finite(result_value(result, ENV_STEPS)),
            "time_total_s": result.get("time_total_s"),
            "time_this_iter_s": result.get("time_this_iter_s"),
            "timestamp": result.get("timestamp"),
            # The driver's clock, the same as ExploitEvent.wall_time: orders results and
            # exploits exactly (Tune's timestamp is whole seconds, from the trial's process).
            "recorded_at": time.time(),
            "hyperparameters": {k: trained_config(result, trial).get(k) for k in self.mutated},
            "probe": result.get(PROBE),
        })
        self._flush()

    def on_exploit(self, event: ExploitEvent) -> None:
        """Hold the event until the result that triggered it is written.

        Tune runs the scheduler (where the exploit happens) before the callbacks, so the
        triggering result, trained with the old weights and values, would otherwise be
        recorded after the exploit and read as the first result of the clone.
        """
        self.pending.append(event)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._flush()

    def _flush(self) -> None:
        for event in self.pending:
            self._append(EXPLOITS_FILE, asdict(replace(event, wall_time=time.time())))
        self.pending.clear()


def write_json(data: Any, path: Path) -> Path:
    """Write JSON atomically, so a reader never sees half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def read_json(path: Path) -> Any:
    """A JSON file of the run folder, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by :class:`RunRecorder` (missing file: no rows)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

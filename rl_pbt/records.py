"""Every result and every exploit as JSON lines in the run folder, written as they happen.

Tune's own ``result.json`` is staged on the driver and synced to the run folder; when PBT pauses
and resumes a trial, Tune copies the synced (older) file back over the staged one and the rows in
between are lost (seen here: a trial's file kept iterations 5-6 of 6). These records do not
depend on that sync: analysis, tests and people read ``trials.jsonl`` and ``exploits.jsonl``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from rl_pbt.errors import ConfigError
from rl_pbt.schedulers import EarlyStop, ExploitEvent
from rl_pbt.stopping import ENV_STEPS, result_value
from rl_pbt.trainable import PROBE
from rl_pbt.values import finite, first_line

TRIALS_FILE = "trials.jsonl"
EXPLOITS_FILE = "exploits.jsonl"
FAILURES_FILE = "failures.jsonl"
EARLY_STOPS_FILE = "early_stops.jsonl"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def trained_config(result: dict[str, Any], trial: Trial) -> dict[str, Any]:
    """The config a result was trained with.

    Tune runs the scheduler before the callbacks, so by the time a callback sees the result of an
    exploit's iteration ``trial.config`` already holds the perturbed values; the result carries
    the config the trainable actually used.
    """
    return result.get("config") or trial.config


def trained_values(result: dict[str, Any], trial: Trial, keys: list[str]) -> dict[str, Any]:
    """The values of ``keys`` a result was trained with. RLlib's config dict holds a setting it
    exposes as a property under its private name (``train_batch_size_per_learner`` is
    ``_train_batch_size_per_learner`` in ``AlgorithmConfig.to_dict()``): looked up there too,
    or a mutated batch size would be recorded as missing."""
    config = trained_config(result, trial)
    return {key: config[key] if key in config else config.get(f"_{key}") for key in keys}


class RunRecorder(Callback):
    """Append one line per trial result and per exploit under the run folder."""

    def __init__(self, output_dir: Path, metric: str, mutated: list[str],
                 repeats: Any = None) -> None:
        self.output_dir = output_dir
        self.metric = metric
        self.mutated = mutated
        self.repeats = repeats  # rl_pbt.resume.Repeats: iterations recorded before a restore
        self.pending: list[ExploitEvent] = []

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with (self.output_dir / name).open("a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        if self.repeats is not None and self.repeats.is_repeat(trial):
            self._flush()
            return
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
            "hyperparameters": trained_values(result, trial, self.mutated),
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

    def on_early_stop(self, stop: EarlyStop) -> None:
        """A trial the scheduler (ASHA) stopped before its caps."""
        self._append(EARLY_STOPS_FILE, {"trial_id": stop.trial_id, "iteration": stop.iteration,
                                        "return": finite(stop.score),
                                        "recorded_at": time.time()})

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        """A failed trial that Tune retries from its last checkpoint."""
        self._failure(trial, retried=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        """A trial that failed more often than ``max_failures``: it stops for good."""
        self._failure(trial, retried=False)

    def _failure(self, trial: Trial, retried: bool) -> None:
        self._append(FAILURES_FILE, {
            "trial_id": trial.trial_id,
            "training_iteration": (trial.last_result or {}).get("training_iteration"),
            "retried": retried,
            "failures": trial.num_failures,
            "error": trial_error(trial),
            "recorded_at": time.time(),
        })

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._flush()

    def _flush(self) -> None:
        for event in self.pending:
            self._append(EXPLOITS_FILE, asdict(replace(event, wall_time=time.time())))
        self.pending.clear()


def trial_error(trial: Trial) -> str:
    """The exception that failed the trial, in one line from its error file, without Ray's
    traceback.

    Tune appends one ``Failure # N`` section per failure; the last one is this failure.
    """
    path = Path(trial.error_file) if trial.error_file else None
    if path is None or not path.is_file():
        return "unknown error"
    lines = path.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Failure #")]
    return root_error(lines[starts[-1]:] if starts else lines)


#: Python's line between two exceptions of a chain: ``raise ... from cause`` (the earlier one
#: is what went wrong; RLlib re-raises an env's error as a bare RuntimeError so) or an error
#: while handling another (the later one is what was raised; the earlier is only context).
_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def root_error(lines: list[str]) -> str:
    """The exception line of a traceback's chain that names what went wrong: the last one
    raised, followed back through its explicit causes (not through the exceptions it was
    raised while handling)."""
    chain: list[tuple[str | None, str]] = []  # (exception line, the link to the next)
    current: str | None = None
    for line in lines:
        if _EXCEPTION_LINE.match(line) and (current is None or ": " in line
                                            or ": " not in current):
            current = line
        elif line.strip() in (_CAUSE, _CONTEXT):
            chain.append((current, line.strip()))
            current = None
    chain.append((current, ""))
    index = len(chain) - 1
    while index > 0 and chain[index - 1][1] == _CAUSE and chain[index - 1][0]:
        index -= 1
    return chain[index][0] or next((c for c, _ in reversed(chain) if c), "unknown error")


def write_json(data: Any, path: Path) -> Path:
    """Write JSON atomically, so a reader never sees half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object of the run folder (``run.json``, ``summary.json``...), or None when the
    file does not exist. rl_pbt writes them whole (:func:`write_json`), so one that does not
    read is damaged from outside: a ConfigError naming it, not a traceback."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: damaged, not JSON ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: damaged, a JSON {type(data).__name__} where rl_pbt wrote "
                          "an object")
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by :class:`RunRecorder` (missing file: no rows).

    A last line without its newline is a write a kill cut short: it is left out. A damaged
    line elsewhere is a ConfigError naming the file and line.
    """
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ConfigError(f"{path}: line {number} is damaged, not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: line {number} is damaged, a JSON "
                              f"{type(row).__name__} where rl_pbt wrote an object")
        rows.append(row)
    return rows


def drop_cut_last_line(path: Path) -> None:
    """Cut a JSON-lines file after its last whole line, so that a resumed run's appends do not
    continue a line a kill cut short (:func:`read_jsonl` leaves that line out)."""
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])

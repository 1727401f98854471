"""MLflow tracking that survives PBT: a parent run per experiment, a child run per trial.

Ray's ``MLflowLoggerCallback`` logs every config key as a param at every trial start, and a PBT
exploit restarts a trial with new values, so MLflow refuses ("Changing param values is not
allowed") and the whole tuning run dies. Here params are written once, at a trial's first start;
mutated hyperparameters are metrics (one chart per trial schedule) and every exploit is recorded
as a tag, a metric and a JSON artifact on the trial's child run.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from rl_pbt.errors import ConfigError
from rl_pbt.plan import Plan, Tracking
from rl_pbt.records import TRIALS_FILE, read_jsonl, trained_values, trial_error
from rl_pbt.schedulers import EarlyStop, ExploitEvent
from rl_pbt.stopping import ENV_STEPS, result_value
from rl_pbt.values import finite, first_line

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
#: Tags of a parent run made in a Hydra sweep (``-m``): the sweep folder and the job number.
SWEEP_TAG = "rl_pbt.sweep"
JOB_TAG = "rl_pbt.sweep_job"
#: Result keys logged as metrics at every iteration, under these names.
RESULT_METRICS = {
    "env_runners/episode_return_mean": "episode_return_mean",
    "env_runners/episode_len_mean": "episode_len_mean",
    ENV_STEPS: "env_steps",
    "training_iteration": "training_iteration",
    "time_total_s": "time_total_s",
    "time_this_iter_s": "time_this_iter_s",
}
#: The same metrics from a row of the run folder's ``trials.jsonl`` (``rl_pbt.records``).
RECORD_METRICS = {
    "training_iteration": "training_iteration",
    "return": "episode_return_mean",
    "env_steps": "env_steps",
    "time_total_s": "time_total_s",
    "time_this_iter_s": "time_this_iter_s",
}
#: Metric writes queued before the older half is waited for.
MAX_QUEUED = 256
#: Seconds between metric writes: results in between go to MLflow in one batch per run.
SEND_EVERY_S = 3.0
#: MLflow's limit of metrics per ``log_batch``.
MAX_BATCH = 1000


def check_reachable(tracking: Tracking, timeout: float = 5.0,
                    hint: str = "start the server, fix the URI, or use tracking=none") -> None:
    """Fail fast, before training, when the tracking store cannot be used; ``hint`` says what
    to do about a server that does not answer."""
    uri = tracking.tracking_uri or ""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
                if reply.status != 200:
                    raise ConfigError(f"tracking.tracking_uri: {uri} answered {reply.status}")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(
                f"tracking.tracking_uri: cannot reach MLflow at {uri} ({reason}); {hint}"
            ) from None
    elif tracking.sqlite_file is not None:
        folder = tracking.sqlite_file.parent
        if not folder.is_dir() or not _can_create_in(folder):
            raise ConfigError(f"tracking.tracking_uri: {folder} is not a writable folder")


def check_run_store(tracking: Tracking, hint: str) -> None:
    """The store a finished or resumed run was tracked in must still hold it: a SQLite file
    that is gone would be made anew, empty, by opening it (and its runs not found)."""
    store = tracking.sqlite_file
    if store is not None and not store.is_file():
        raise ConfigError(f"tracking.tracking_uri: the run's MLflow store {store} is gone "
                          f"(moved or deleted); {hint}")
    check_reachable(tracking, hint=hint)


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder``, tried (root passes ``os.access`` for /proc,
    where SQLite then retried for 110 s before MLflow failed)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a config to ``a.b -> str`` pairs, as MLflow params (strings, 6000 chars max)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


class MlflowTracker(Callback):
    """Tune callback that writes the experiment into MLflow as parent and child runs."""

    def __init__(self, plan: Plan, repeats: Any = None) -> None:
        from mlflow.tracking import MlflowClient

        self.plan = plan
        self.repeats = repeats  # rl_pbt.resume.Repeats: iterations logged before a restore
        self.client = MlflowClient(tracking_uri=plan.tracking.tracking_uri)
        self.mutated = list(plan.mutations)
        self.parent_id = ""
        self.experiment_id = ""
        self.experiment_name = plan.tracking.experiment_name or ""  # the one the parent is in
        self.children: dict[str, str] = {}
        self.steps: dict[str, int] = {}
        self.exploits: dict[str, int] = {}
        self.running: set[str] = set()
        self.queued: list[Any] = []  # MLflow's RunOperations of the metrics not yet written
        self.pending: dict[str, list[list[Any]]] = {}  # results' metrics not yet sent, by run
        self.sent_at = time.monotonic()

    # -- the parent run -------------------------------------------------------------------
    def open(self, extra_tags: Mapping[str, str]) -> str:
        """Create the parent run, nested under an active run when there is one (in that run's
        experiment: an AzureML job's, or a ``MLFLOW_RUN_ID`` given by hand)."""
        active = _active_run_id()
        if active:
            self.experiment_id = self.client.get_run(active).info.experiment_id
        else:
            self.experiment_id = self._experiment_id(self.plan.tracking.experiment_name or "")
        tags = {f"rl_pbt.{group}": option for group, option in self.plan.choices.items()}
        tags.update(extra_tags)
        tags["mlflow.runName"] = self.plan.name
        if active:
            tags[PARENT_TAG] = active
        run = self.client.create_run(self.experiment_id, tags=tags)
        self.parent_id = run.info.run_id
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        self.client.log_text(self.parent_id, self.plan.config_yaml, "config.yaml")
        params = {"population": self.plan.population, "seed": self.plan.seed,
                  "command": self.plan.command}
        for key, value in params.items():
            self.client.log_param(self.parent_id, key, str(value)[:6000])
        return self.parent_id

    def reopen(self, parent_id: str) -> str:
        """Continue a resumed run's parent and child runs where they stopped.

        Children are found by their parent tag; each goes on at the step after its last one,
        so a resumed trial's metrics continue the same charts.
        """
        from mlflow.exceptions import MlflowException

        try:
            parent = self.client.get_run(parent_id)
        except MlflowException:
            raise ConfigError(f"resume: MLflow run {parent_id}, this run's parent, is not in "
                              f"{self.plan.tracking.tracking_uri}; put back the store the run "
                              "was tracked in") from None
        self.parent_id, self.experiment_id = parent_id, parent.info.experiment_id
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        self.client.update_run(parent_id, status="RUNNING")
        records = read_jsonl(self.plan.output_dir / TRIALS_FILE)
        for child in child_runs(self.client, self.experiment_id, parent_id):
            trial_id = child.data.tags.get("rl_pbt.trial_id")
            if not trial_id:
                continue
            run_id = child.info.run_id
            self.children[trial_id] = run_id
            history = self.client.get_metric_history(run_id, "training_iteration")
            self.steps[trial_id] = max((m.step for m in history), default=0)
            self.exploits[trial_id] = sum(
                1 for tag in child.data.tags if tag.startswith("rl_pbt.exploit."))
            self._log_unlogged_rows(trial_id, run_id,
                                    [r for r in records if r["trial_id"] == trial_id])
        return parent_id

    def _log_unlogged_rows(self, trial_id: str, run_id: str, rows: list[dict[str, Any]]) -> None:
        """Log the results the run folder recorded (``rows``) but MLflow did not get before the
        kill.

        The run folder's record of a result is written just before MLflow's; a kill between the
        two (seen in the kill-and-resume test) left the child one step short, and every later
        step one iteration off the records.
        """
        for row in rows[self.steps[trial_id]:]:
            self.steps[trial_id] += 1
            values = {name: row.get(key) for key, name in RECORD_METRICS.items()}
            values.update({f"hp.{k}": v for k, v in (row.get("hyperparameters") or {}).items()})
            self._log_step(run_id, self.steps[trial_id], row.get("timestamp"), values)

    def _experiment_id(self, name: str) -> str:
        """Get or create the experiment; a SQLite store keeps its artifacts beside the file.

        MLflow's default artifact root for a SQLite store is ``./mlruns`` of whatever directory
        the process runs in, which scatters artifacts; next to the database they stay with it.
        """
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        database = self.plan.tracking.sqlite_file
        location = (database.parent / "mlartifacts").as_uri() if database else None
        return self.client.create_experiment(name, artifact_location=location)

    def close(
        self, summary: Mapping[str, Any] | None, status: str = "FINISHED",
        artifacts: Iterable[Path] = (),
    ) -> None:
        """Write the best trial's summary and the report files to the parent and end it."""
        self.flush()
        for path in artifacts:
            self.client.log_artifact(self.parent_id, str(path), "report")
        if summary:
            self.client.log_dict(self.parent_id, dict(summary), "summary.json")
            best = summary.get("best") or {}
            for key, value in (best.get("hyperparameters") or {}).items():
                self.client.log_param(self.parent_id, f"best.{key}", str(value))
            metrics = {"best_return": best.get("return"), "best_env_steps": best.get("env_steps")}
            for key, value in metrics.items():
                if finite(value) is not None:
                    self.client.log_metric(self.parent_id, key, float(value))
            for key in ("trial_id", "checkpoint"):
                if best.get(key):
                    self.client.set_tag(self.parent_id, f"best.{key}", str(best[key]))
        if status != "KILLED":  # a kill has ended its running children already
            self._end_stopped_trials()
        self.client.set_terminated(self.parent_id, status)

    # -- one child run per trial ----------------------------------------------------------
    def _child(self, trial: Trial) -> str:
        run_id = self.children.get(trial.trial_id)
        if run_id:
            return run_id
        tags = {PARENT_TAG: self.parent_id, "mlflow.runName": str(trial),
                "rl_pbt.trial_id": trial.trial_id}
        run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        self.children[trial.trial_id] = run_id
        self.running.add(run_id)
        self.steps[trial.trial_id] = 0
        self.exploits[trial.trial_id] = 0
        fixed = {k: v for k, v in trial.config.items() if k not in self.mutated}
        params = flat_params(fixed)
        params.update({f"start.{k}": str(trial.config.get(k)) for k in self.mutated})
        _log_params(self.client, run_id, params)
        return run_id

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        self._child(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        run_id = self._child(trial)
        if self.repeats is not None and self.repeats.is_repeat(trial):
            return
        if run_id not in self.running:  # a resumed run's child, or a retried trial's
            self.client.update_run(run_id, status="RUNNING")
            self.running.add(run_id)
        self.steps[trial.trial_id] += 1
        values = {name: result_value(result, key) for key, name in RESULT_METRICS.items()}
        trained = trained_values(result, trial, self.mutated)
        values.update({f"hp.{key}": value for key, value in trained.items()})
        self._log_step(run_id, self.steps[trial.trial_id], result.get("timestamp"), values)

    def _log_step(self, run_id: str, step: int, timestamp: float | None,
                  values: Mapping[str, Any]) -> None:
        """One result's finite numbers as metrics at ``step`` (Tune's timestamp, seconds).

        Logged asynchronously: Tune sends a trial its next iteration only after every callback
        has handled its result, and a synchronous batch into SQLite took 9 ms of the driver's
        13 ms per result here. MLflow's queue writes them in a thread; :meth:`flush` waits for
        it before a run's status changes. They are sent every ``SEND_EVERY_S`` seconds, one
        batch per run: each write costs the driver's CPU (taken from the trials) mostly per
        call, 7.4 ms per result one by one against 2.9 ms four at a time into SQLite here. A
        kill loses what is pending or queued; a resumed run logs it from the records
        (:meth:`_log_unlogged_rows`).
        """
        from mlflow.entities import Metric

        stamp = int((timestamp or 0) * 1000)
        numbers = {name: finite(v) for name, v in values.items()}
        self.pending.setdefault(run_id, []).append(
            [Metric(name, v, stamp, step) for name, v in numbers.items() if v is not None])
        if time.monotonic() - self.sent_at >= SEND_EVERY_S:
            self._send_pending()

    def _send_pending(self, synchronous: bool = False) -> None:
        """Send the pending metrics, one batch per run (whole results, up to 1000 metrics a
        batch): queued with MLflow, or written at once (``flush``: MLflow's logging thread,
        with buffering set, would first sleep out its interval)."""
        pending, self.pending, self.sent_at = self.pending, {}, time.monotonic()
        for run_id, results in pending.items():
            for batch in _result_batches(results, MAX_BATCH):
                written = self.client.log_batch(run_id, metrics=batch, synchronous=synchronous)
                if not synchronous:
                    self.queued.append(written)
        if len(self.queued) > MAX_QUEUED:
            # The older half, written long ago unless MLflow fell behind (which this slows the
            # driver to): a long run's queue stays bounded and a failing write is raised within
            # MAX_QUEUED batches, not only at a trial's end.
            self._wait_for_oldest(MAX_QUEUED // 2)

    def _wait_for_oldest(self, count: int) -> None:
        """Wait until the ``count`` oldest queued writes are done; they leave the queue first,
        so an error raised here is not raised again."""
        oldest, self.queued = self.queued[:count], self.queued[count:]
        for operations in oldest:
            operations.wait()

    def flush(self) -> None:
        """Wait until the queued metrics are written, then write the pending ones (MLflow
        rejects them on an ended run; the older first, so a resume's last-step rule holds)."""
        self._wait_for_oldest(len(self.queued))
        self._send_pending(synchronous=True)

    def on_exploit(self, event: ExploitEvent) -> None:
        """Record an exploit on the trial that received the clone (never as params)."""
        if event.trial_id not in self.children:
            return
        run_id = self.children[event.trial_id]
        self.exploits[event.trial_id] += 1
        count = self.exploits[event.trial_id]
        changes = ", ".join(f"{k} {event.old.get(k)!r} -> {event.new.get(k)!r}" for k in event.new)
        line = (f"cloned {event.source_id} (iteration {event.source_iteration}) at iteration "
                f"{event.iteration}: {changes}")
        self.client.set_tag(run_id, f"rl_pbt.exploit.{count:03d}", line[:5000])
        self.client.log_metric(run_id, "pbt.exploits", count, step=self.steps[event.trial_id])
        self.client.log_dict(run_id, event.__dict__, f"exploits/{count:03d}.json")

    def on_early_stop(self, stop: EarlyStop) -> None:
        """Tag the trial's run: ASHA ended it before its caps (its status is FINISHED)."""
        if stop.trial_id not in self.children:
            return
        try:  # called inside Tune's scheduler step: a failed tag must not end the run
            self.client.set_tag(self.children[stop.trial_id], "rl_pbt.stopped_early",
                                f"by ASHA at iteration {stop.iteration}")
        except Exception as err:
            log.warning("MLflow: the early stop of %s was not tagged: %s", stop.trial_id,
                        first_line(err))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        """A trial that failed more often than ``max_failures``: FAILED, with its error."""
        self.client.set_tag(self._child(trial), "rl_pbt.error", trial_error(trial))
        self._end(trial, "FAILED")

    def _end(self, trial: Trial, status: str) -> None:
        self._end_run(trial.trial_id, self._child(trial), status)

    def _end_run(self, trial_id: str, run_id: str, status: str) -> None:
        self.flush()
        self.client.set_tag(run_id, "rl_pbt.exploit_count", str(self.exploits.get(trial_id, 0)))
        self.client.set_terminated(run_id, status)
        self.running.discard(run_id)

    def _end_stopped_trials(self) -> None:
        """FINISHED for the trials the run's end stopped: when one trial reaches the target
        return, Tune stops the others without a completion callback, and their runs stayed
        RUNNING in MLflow after a finished run."""
        for trial_id, run_id in self.children.items():
            if run_id in self.running:
                self._end_run(trial_id, run_id, "FINISHED")

    def killed(self) -> None:
        """Mark the parent and the running children KILLED (Ctrl-C, or a crash of the run).

        Nothing stays RUNNING in the MLflow UI; a resumed run sets them running again. Queued
        metrics that fail to write do not stop that (a resumed run logs them from the records).
        """
        try:
            self.flush()
        except Exception as err:  # the runs' status matters more here
            log.warning("MLflow: queued metrics not written: %s", first_line(err))
        for run_id in list(self.running):
            self.client.set_terminated(run_id, "KILLED")
        self.running.clear()
        self.close(None, "KILLED")


def child_runs(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    """The runs nested under ``parent_id`` (trials, and evaluations or replays of the run)."""
    return client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=5000)


def _log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of 100 (MLflow's limit per call)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for batch in _chunks(items, 100):
        client.log_batch(run_id, params=batch)


def _result_batches(results: list[list[Any]], size: int) -> Iterable[list[Any]]:
    """Results' metrics in batches of at most ``size``, a result never split across two
    (MLflow may write two batches in either order), unless it alone is larger."""
    batch: list[Any] = []
    for metrics in results:
        if batch and len(batch) + len(metrics) > size:
            yield batch
            batch = []
        if len(metrics) > size:
            yield from _chunks(metrics, size)
            continue
        batch.extend(metrics)
    if batch:
        yield batch


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _active_run_id() -> str | None:
    """The run this process is already inside: ``mlflow.start_run`` or ``MLFLOW_RUN_ID``."""
    import mlflow

    active = mlflow.active_run()
    return active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")


def ui_command(tracking: Tracking) -> str:
    """The command that opens the MLflow UI on this store."""
    uri = tracking.tracking_uri or ""
    if uri.startswith("http"):
        return f"open {uri} in a browser"
    if uri.startswith("azureml://"):
        return "open the job in Azure ML studio (Jobs -> the job's Metrics and child runs)"
    return f"mlflow ui --backend-store-uri {uri}"

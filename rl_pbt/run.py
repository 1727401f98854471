"""Plan -> Tuner -> fit -> summary. ``run(cfg)`` is what the CLI, sweeps, tests and scripts call."""

from __future__ import annotations

import logging
import random
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from omegaconf import DictConfig

from rl_pbt import cluster, envs
from rl_pbt import resume as resuming
from rl_pbt.algorithms import import_object
from rl_pbt.cli import RUN_INFO, check_new_run_dir, discard_empty_output_dir
from rl_pbt.cluster import environ_default
from rl_pbt.errors import ConfigError, Interrupted
from rl_pbt.noise import handled_warnings, quiet_known_noise
from rl_pbt.plan import Plan, Tracking
from rl_pbt.progress import ProgressPrinter
from rl_pbt.records import EXPLOITS_FILE, RunRecorder, read_jsonl, write_json
from rl_pbt.resolve import resolve
from rl_pbt.resume import CtrlC, Repeats, ResumePoint
from rl_pbt.schedulers import Scheduler, build_scheduler
from rl_pbt.stopping import PlanStopper
from rl_pbt.summary import (
    build_summary,
    every_trial_failed,
    format_summary,
    run_info,
    write_summary,
)
from rl_pbt.tracking import JOB_TAG, SWEEP_TAG, MlflowTracker, check_reachable, ui_command
from rl_pbt.trainable import pbt_trainable
from rl_pbt.values import first_line

if TYPE_CHECKING:
    from rl_pbt.analysis.report import Report

log = logging.getLogger(__name__)

#: MLflow's async logging thread waits on its queue up to 1 s at a time unless buffering is
#: set, and ending a run (``set_terminated``) joins that thread: ending 4 runs took 0.69 s here,
#: 0.02 s with 1 s of buffering (its wait ends as soon as it is stopped). A user's value wins.
MLFLOW_BUFFERING = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"


def run(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, Any]:
    """Resolve the config, tune the population, and return the summary.

    Args:
        cfg: the composed config.
        output_dir: where everything is written; default: Hydra's output folder.
    """
    info = hydra_info(output_dir)
    if cfg.get("resume") == "":
        raise ConfigError("resume: no folder given; resume=RUN_DIR continues the run in RUN_DIR")
    if cfg.get("resume"):
        return resume(Path(str(cfg.resume)), info)
    check_new_run_dir(info["output_dir"])
    plan = replace(resolve(cfg, info["output_dir"], info["choices"]), command=info["command"])
    return execute(plan, info["tags"])


def resume(run_dir: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its saved config (no other overrides accepted)."""
    extra = [o for o in info["overrides"] if not o.startswith(("resume=", "hydra."))]
    if extra:
        raise ConfigError(f"resume: a resumed run keeps its saved config; drop {' '.join(extra)}")
    cfg, point = resuming.load_resume(run_dir)
    plan = resuming.resumed_plan(resolve(cfg, point.run_dir), point)
    discard_empty_output_dir()  # this invocation writes into run_dir, not Hydra's new folder
    return execute(plan, info["tags"], point)


def hydra_info(output_dir: Path | None) -> dict[str, Any]:
    """Output folder, group choices, sweep tags and command line from Hydra, when it runs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    info: dict[str, Any] = {"output_dir": output_dir, "choices": {}, "tags": {},
                            "command": " ".join(["python -m rl_pbt", *sys.argv[1:]]),
                            "overrides": []}
    if not HydraConfig.initialized():
        if output_dir is None:
            raise ValueError("output_dir is required outside a Hydra run")
        return info
    hc = HydraConfig.get()
    info["output_dir"] = Path(output_dir or hc.runtime.output_dir)
    info["choices"] = {k: str(v) for k, v in hc.runtime.choices.items()
                       if not k.startswith("hydra") and v is not None}
    overrides = list(hc.overrides.task)
    info["overrides"] = overrides
    info["command"] = " ".join(["python -m rl_pbt", *_config_dir_args(sys.argv[1:]),
                                *overrides])
    if hc.mode == RunMode.MULTIRUN:
        info["tags"] = {SWEEP_TAG: str(Path(hc.sweep.dir).resolve()), JOB_TAG: str(hc.job.num)}
    return info


def _config_dir_args(argv: list[str]) -> list[str]:
    """``--config-dir DIR`` (or ``-cd DIR``, ``--config-dir=DIR``) with DIR made absolute: a run
    composed with an extra config folder (``experiment=best``) is reproduced only with it, from
    whatever folder the command is run again."""
    out = []
    for index, arg in enumerate(argv):
        flag, equals, folder = arg.partition("=")
        if flag in ("--config-dir", "-cd") and equals:
            out.append(f"{flag}={shlex.quote(str(Path(folder).resolve()))}")
        elif arg in ("--config-dir", "-cd") and index + 1 < len(argv):
            out += [arg, shlex.quote(str(Path(argv[index + 1]).resolve()))]
    return out


def execute(
    plan: Plan, tags: Mapping[str, str] | None = None, resumed: ResumePoint | None = None,
) -> dict[str, Any]:
    """Run a resolved plan end to end; every check that can fail does so before training.

    With ``resumed``, the Tune experiment, records and MLflow runs of that folder go on.
    Raises :class:`Interrupted` after a Ctrl-C that Tune handled (the state is saved).
    """
    with environ_default(MLFLOW_BUFFERING, "1"):
        return _execute(plan, tags, resumed)


def _execute(
    plan: Plan, tags: Mapping[str, str] | None, resumed: ResumePoint | None,
) -> dict[str, Any]:
    started = time.monotonic()
    repeats = Repeats(resumed.last_iteration if resumed else None)
    quiet_known_noise()
    trial = cluster.trial_resources(plan)  # RLlib's own checks, before any file or process
    if plan.tracking.enabled:
        check_reachable(plan.tracking)
    checked: Future[bool] = Future()
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-open") as pool:
        # Importing MLflow (1 s) while Ray starts and its CPUs are checked; then its store.
        opening = pool.submit(_open_tracker, plan, repeats, checked) \
            if plan.tracking.enabled else None
        passed = False
        try:
            ray_used = cluster.describe(cluster.start_ray(plan))
            fit = cluster.concurrency(plan, trial)
            passed = True
        finally:  # whatever ends the checks (a Ctrl-C too), the thread must not wait on
            checked.set_result(passed)
        tracker = _opened(opening, plan.tracking) if opening else None
    print(fit.report(), flush=True)
    envs.register(plan.env)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    random.seed(plan.seed)  # PBT draws its quantile picks and perturbations from `random`
    scheduler = build_scheduler(plan, fit.concurrent)
    recorder = RunRecorder(plan.output_dir, plan.stop.metric, list(plan.mutations), repeats)
    progress = ProgressPrinter(plan.stop.metric, plan.stop.mode)
    scheduler.listeners += [repeats.on_exploit, recorder.on_exploit, progress.on_exploit]
    scheduler.stop_listeners += [recorder.on_early_stop, progress.on_early_stop]
    tracking = _open_tracking(tracker, plan, scheduler, tags or {}, resumed)
    if resumed is None:  # with the tracking ids a resumed run needs to continue the same runs
        record = {"tracking": _tracking_record(plan, tracking)} if tracking else {}
        write_json({**run_info(plan, ray_used), **record}, plan.output_dir / RUN_INFO)
    ctrl_c = CtrlC()
    callbacks = [ctrl_c, repeats, recorder, progress, *([tracker] if tracker else [])]
    try:
        if resumed:
            tuner = restore_tuner(plan, scheduler, callbacks)
            resuming.record_resume(resumed, ray_used)
        else:
            tuner = make_tuner(plan, scheduler, callbacks)
        with tune_settings():
            results = tuner.fit()
        if ctrl_c.caught:
            _mark_killed(tracker)
            raise Interrupted(f"interrupted; the state is saved. Continue with: "
                              f"{resuming.resume_command(plan.output_dir)}")
        # From the records, not scheduler.events: a resumed run counts the first part too.
        exploits = Counter(e["trial_id"] for e in read_jsonl(plan.output_dir / EXPLOITS_FILE))
        summary = build_summary(plan, results, exploits, time.monotonic() - started,
                                fit.report(), tracking, resumed=resumed is not None)
        write_summary(summary, plan.output_dir)
        releasing = _release_ray(ray_used["origin"], tags or {})
        report = _write_report(plan)
        if releasing:
            releasing.join()
    except Interrupted:
        raise
    except BaseException:
        _mark_killed(tracker)  # never leave the parent or a child run RUNNING
        raise
    failed = every_trial_failed(summary)
    if tracker:
        status = "FAILED" if failed else "FINISHED"
        try:
            tracker.close(summary, status, artifacts=report.paths() if report else [])
        except Exception as err:  # the run trained and its folder holds everything
            _mark_killed(tracker)  # no MLflow run left RUNNING
            print(f"rl_pbt: warning: MLflow refused the run's last records "
                  f"({first_line(err)}); its runs are marked KILLED; the run folder has them all",
                  file=sys.stderr, flush=True)
    print(format_summary(summary), flush=True)
    if report:
        print(f"report       {report.markdown}", flush=True)
    if (summary.get("best") or {}).get("checkpoint") and not failed:
        print(f"evaluate     python -m rl_pbt.evaluate {shlex.quote(str(plan.output_dir))} "
              "episodes=20", flush=True)
    return summary


@contextmanager
def tune_settings() -> Iterator[None]:
    """Tune's environment switches for this run's ``fit`` only (a test session or a program
    that calls :func:`execute` runs other Tune experiments with Tune's defaults).

    RLlib reports the episode return only once an episode has finished; Tune would fail the
    trial for the missing metric (Acrobot's first 500-step episodes, for one). Tune's own
    result files are the ones :func:`result_files` picks. PBT saves every trial at each
    perturbation, so with ``checkpoint.num_to_keep`` Tune snapshots the experiment state (what
    a resume reads) every few seconds, and warns of a bottleneck when two come within 5 s:
    measured 45 ms per snapshot into the run folder (9 in a 30 s default run, 0.4 s of the
    driver's time), so that warning is off, as is PBT's warning on ``num_to_keep <= 2``
    (:data:`rl_pbt.noise.HANDLED_WARNINGS`).
    """
    with environ_default("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1"), \
            environ_default("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"), \
            environ_default("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"), \
            handled_warnings():
        yield


def _open_tracker(plan: Plan, repeats: Repeats, checked: Future[bool]) -> MlflowTracker | None:
    """Import MLflow at once, open its store (which creates a new one) only once Ray's address
    and the CPUs a trial needs have passed their checks: a refused run leaves no store behind
    (a probe found an empty 954 KB mlflow.db after 'a trial needs 5 CPUs')."""
    import mlflow.tracking  # noqa: F401  (the import is the part worth starting early)

    return MlflowTracker(plan, repeats) if checked.result() else None


def _opened(opening: Future, tracking: Tracking) -> MlflowTracker:
    """The tracker being opened; MLflow's failure to open the store (a database it cannot
    read, a plugin URI it does not know) is one line, before any file of the run exists."""
    try:
        return opening.result()
    except Exception as err:
        raise ConfigError(f"tracking.tracking_uri: MLflow cannot open {tracking.tracking_uri}: "
                          f"{first_line(err)}") from None


def _release_ray(origin: str, tags: Mapping[str, str]) -> threading.Thread | None:
    """Stop the Ray this run started, beside the report, once training is over.

    Ray's shutdown (1.2-1.8 s here) waits for its processes to end; the report (1.1-1.4 s)
    does not need them. A Ray that was joined or reused, or that the next job of a sweep will
    use, is left running.
    """
    if origin != "started" or SWEEP_TAG in tags:
        return None
    thread = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    thread.start()
    return thread


def _mark_killed(tracker: MlflowTracker | None) -> None:
    """Mark the MLflow runs KILLED; if MLflow fails too, warn and let the first error speak."""
    if tracker is None:
        return
    try:
        tracker.killed()
    except Exception as err:  # the error being raised matters more
        log.warning("the MLflow runs were not marked KILLED: %s", first_line(err))


def _tracking_record(plan: Plan, tracking: Mapping[str, Any]) -> dict[str, Any]:
    """The store and runs of this experiment, as ``run.json`` keeps them for a resume."""
    return {"backend": plan.tracking.backend, "tracking_uri": plan.tracking.tracking_uri,
            "experiment_name": tracking["experiment_name"],
            "experiment_id": tracking["experiment_id"],
            "parent_run_id": tracking["parent_run_id"]}


def _write_report(plan: Plan) -> Report | None:
    """Plots and report of the run; a run where no episode finished has nothing to plot.

    Imported here: matplotlib is ~0.6 s of start-up that the first result need not wait for.
    """
    from rl_pbt.analysis.report import write_report

    try:
        return write_report(plan.output_dir)
    except ConfigError as err:
        log.warning("no report: %s", err)
        return None


def _open_tracking(
    tracker: MlflowTracker | None, plan: Plan, scheduler: Scheduler, tags: Mapping[str, str],
    resumed: ResumePoint | None,
) -> dict[str, Any] | None:
    if tracker is None:
        return None
    saved = resumed.tracking if resumed else None
    parent = tracker.reopen(saved["parent_run_id"]) if saved else tracker.open(tags)
    scheduler.listeners.append(tracker.on_exploit)
    scheduler.stop_listeners.append(tracker.on_early_stop)
    return {
        "tracking_uri": plan.tracking.tracking_uri,
        "experiment_name": tracker.experiment_name,
        "experiment_id": tracker.experiment_id,
        "parent_run_id": parent,
        "ui_command": ui_command(plan.tracking),
    }


def trainable_class(plan: Plan) -> type:
    """RLlib's own algorithm class (``trainable=stock``) or its PBT-ready subclass (sampling
    with rl_pbt's batched loop unless ``sampler=rllib``, learning with its lean update unless
    ``learner=rllib``)."""
    if plan.trainable == "stock":
        return import_object(plan.algorithm.algorithm_class)
    return pbt_trainable(plan.algorithm.algorithm_class, plan.sampler == "batched",
                         plan.learner == "lean")


def result_files(plan: Plan) -> list[Any]:
    """Tune's per-trial result files: ``result.json`` and ``progress.csv`` always, TensorBoard
    events with ``tensorboard=true``. Tune adds all three unless told not to (see
    :func:`tune_settings`); the events cost the driver 13 ms per result here."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback(),
            *([TBXLoggerCallback()] if plan.tensorboard else [])]


def stop_rule(plan: Plan, scheduler: Scheduler,
              callbacks: list[Any]) -> tuple[PlanStopper, list[Any]]:
    """The run's stopper, tied to the scheduler (no trial starts while the run winds down), and
    the Tune callbacks with the stopper's view of running trials and the result files."""
    stopper = PlanStopper(plan.stop)
    scheduler.may_start = stopper.may_start
    return stopper, [*callbacks, stopper.running, *result_files(plan)]


def restore_tuner(
    plan: Plan, scheduler: Scheduler, callbacks: list[Any]) -> Any:
    """The run folder's Tune experiment, with this process's scheduler, callbacks and stopper.

    Ray pickles the scheduler and callbacks into ``tuner.pkl`` when the run starts and brings
    those back on restore: objects bound to the killed process's recorder and MLflow client,
    and PBT state that Ray does not restore (a fresh PBT rebuilt from the plan keeps exploring
    with the configured distributions). Ray has no public setter, hence the private fields.
    """
    from ray import tune

    tuner = tune.Tuner.restore(str(plan.output_dir.resolve() / "tune"),
                               trainable=trainable_class(plan),
                               resume_unfinished=True, resume_errored=True)
    internal = tuner._local_tuner
    internal._tune_config.scheduler = scheduler
    internal._run_config.stop, internal._run_config.callbacks = stop_rule(
        plan, scheduler, callbacks)
    return tuner


def make_tuner(plan: Plan, scheduler: Scheduler, callbacks: list[Any]) -> Any:
    """The Tuner: PBT-ready trainable, reused actors, checkpoints and results in the run folder."""
    from ray import tune

    from rl_pbt.search import PopulationSearch

    param_space = {**plan.param_space, "seed": tune.randint(0, 2**31 - 1)}
    stock = plan.trainable == "stock"
    stopper, callbacks = stop_rule(plan, scheduler, callbacks)
    return tune.Tuner(
        trainable_class(plan),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=plan.population,
            scheduler=scheduler,
            # No cap on live trials: PBT needs the whole population alive; trials that do not
            # fit wait for CPUs and PBT rotates them in at each perturbation.
            # Open while trials live, so Tune keeps a paused trial's process for the next one.
            search_alg=PopulationSearch(random_state=plan.seed),
            reuse_actors=stock is False,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(plan.output_dir.resolve()),
            stop=stopper,
            callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=plan.num_to_keep, checkpoint_at_end=True,
                checkpoint_frequency=plan.checkpoint_frequency,
            ),
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            verbose=0,  # ProgressPrinter reports instead of Tune's full tables
        ),
    )

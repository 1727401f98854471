"""``python -m rl_pbt``: compose the config with Hydra and call :func:`rl_pbt.run.run`."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig

from rl_pbt import local_ray
from rl_pbt.cli import (
    CONF_DIR,
    check_group_options,
    check_modes,
    check_override_keys,
    check_run_dir_argument,
    check_sweep_jobs,
    discard_empty_output_dir,
    fail,
)
from rl_pbt.errors import ConfigError, Interrupted


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Tune one population; return the best score (what a Hydra sweeper would optimise)."""
    try:
        with interrupt_after_imports():
            if not cfg.get("resume"):
                local_ray.start_early(cfg.get("resources") or {})
            from rl_pbt.run import run  # 2-3 s of imports: a Ctrl-C may land here
            from rl_pbt.summary import every_trial_failed

        if _first_job_of_a_multirun():
            check_sweep_jobs(sys.argv[1:])  # every job's config, while Ray starts
        summary = run(cfg)
    except ConfigError as err:
        discard_empty_output_dir()
        fail(err, local_ray.exit_process)
    except Interrupted as err:
        print(f"rl_pbt: {err}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # a Ctrl-C outside Tune's run (checks, start-up, report)
        interrupted(cfg.get("resume"))
    error = every_trial_failed(summary)
    if error:  # the summary above shows each trial's error; the command fails
        print(f"rl_pbt: error: every trial failed ({error}); their records are in "
              f"{summary['output_dir']}", file=sys.stderr, flush=True)
        _failed_runs.append(summary["output_dir"])
    best = summary.get("best")
    return best["return"] if best else None


@contextmanager
def interrupt_after_imports() -> Iterator[None]:
    """Hold a Ctrl-C until the imports inside are done, then raise it.

    Python raises KeyboardInterrupt at whatever bytecode runs: once (CI, 2026-12-07) inside the
    import machinery's module-lock callback, which ignored it ("Exception ignored in:
    _get_module_lock.<locals>.cb") with the import lock still held, and the process hung on its
    next import. A Ctrl-C in these seconds is acted on when they end instead.
    """
    caught: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:  # unless an import set its own
            signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def interrupted(resume_dir: str | None = None) -> NoReturn:
    """A Ctrl-C outside Tune's own handling: say what it left, exit 130 without a traceback."""
    kept = Path(resume_dir) if resume_dir else discard_empty_output_dir()
    if kept is None:
        state = "before training, nothing was written"
    elif (kept / "summary.json").is_file():
        state = f"the run had finished; its summary is in {kept}"
    elif (kept / "tune" / "tuner.pkl").is_file():
        state = f"continue with: python -m rl_pbt resume={kept.resolve()}"
    else:
        state = f"{kept} holds part of a run that cannot be resumed"
    print(f"rl_pbt: interrupted; {state}", file=sys.stderr, flush=True)
    local_ray.exit_process(130)


def _first_job_of_a_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    config = HydraConfig.get()
    return config.mode == RunMode.MULTIRUN and config.job.num == 0


#: Runs of this command (one, or a multirun's jobs) in which every trial failed: exit code 1.
_failed_runs: list[str] = []


def exit_without_teardown() -> NoReturn:
    """Run the exit handlers (Ray's shutdown, log flushes), then end the process at once.

    After them the interpreter's own teardown took 1.3 s here (freeing torch's, Ray's and
    MLflow's modules in native code), with no thread left to join and no file of rl_pbt's left
    open: time a finished run need not wait for.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if _failed_runs else 0)


if __name__ == "__main__":
    check_modes(sys.argv[1:])
    check_group_options(sys.argv[1:])
    check_override_keys(sys.argv[1:])
    check_run_dir_argument(sys.argv[1:])
    try:
        main()
    except KeyboardInterrupt:  # in Hydra's set-up, before the run's own handling
        interrupted()
    exit_without_teardown()

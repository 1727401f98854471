"""A compact progress report while the population trains, in place of Tune's big tables.

One line per exploit (who cloned whom, what changed), per trial ASHA stops early, and, at most
every ``every_s`` seconds, one line with the best trial so far and each trial's latest return.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from rl_pbt.records import trial_error
from rl_pbt.schedulers import EarlyStop, ExploitEvent
from rl_pbt.stopping import result_value
from rl_pbt.values import finite, short


class ProgressPrinter(Callback):
    """Print exploits as they happen and a throttled one-line status of the population."""

    def __init__(self, metric: str, mode: str, every_s: float = 15.0) -> None:
        self.metric = metric
        self.pick = max if mode == "max" else min
        self.every_s = every_s
        self.started = time.monotonic()
        self.last_print = self.started
        self.latest: dict[str, tuple[int, float]] = {}

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        score = result_value(result, self.metric)
        if finite(score) is not None:
            self.latest[trial.trial_id] = (int(result.get("training_iteration", 0)), score)
        now = time.monotonic()
        if now - self.last_print >= self.every_s and self.latest:
            self.last_print = now
            print(self.status_line(now), flush=True)

    def status_line(self, now: float) -> str:
        best_id, (best_it, best) = self.pick(self.latest.items(), key=lambda kv: kv[1][1])
        others = "  ".join(f"{tid[-5:]}:{score:.1f}@{it}"
                           for tid, (it, score) in sorted(self.latest.items()))
        return (f"[{now - self.started:5.0f} s] best {best:.1f} (trial {best_id}, iteration "
                f"{best_it})  |  {others}")

    def on_exploit(self, event: ExploitEvent) -> None:
        changes = ", ".join(f"{k} {short(event.old.get(k))}->{short(v)}"
                            for k, v in event.new.items() if event.old.get(k) != v)
        print(f"[pbt] {event.trial_id} cloned {event.source_id} (iteration "
              f"{event.source_iteration}) at iteration {event.iteration}: {changes}", flush=True)

    def on_early_stop(self, stop: EarlyStop) -> None:
        score = "no return yet" if finite(stop.score) is None else f"return {stop.score:.1f}"
        print(f"[asha] {stop.trial_id} stopped early at iteration {stop.iteration} ({score}: "
              "not among the best at its rung)", flush=True)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        start = "its last checkpoint" if trial.checkpoint is not None else "the start (no " \
            "checkpoint yet)"
        _print_failure(trial, f"retrying from {start} (failure {trial.num_failures})")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        _print_failure(trial, "no retries left, the others go on")


def _print_failure(trial: Trial, outcome: str) -> None:
    print(f"[fail] {trial.trial_id} failed after iteration {_iteration(trial)} "
          f"({trial_error(trial)}); {outcome}", flush=True)


def _iteration(trial: Trial) -> int:
    return int((trial.last_result or {}).get("training_iteration", 0))


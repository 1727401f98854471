"""Trial schedulers built from the plan, and the exploit events they report.

Ray's ``PopulationBasedTraining`` logs exploits to text files only; tracking needs them as they
happen (which trial cloned which, at which iteration, old -> new values), so the subclass here
tells its listeners at every exploit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining

from rl_pbt.explore import Explore
from rl_pbt.plan import Plan


@dataclass(frozen=True)
class ExploitEvent:
    """One exploit: ``trial`` took ``source``'s checkpoint and a perturbed config."""

    trial_id: str
    source_id: str
    iteration: int
    source_iteration: int
    old: dict[str, Any]
    new: dict[str, Any]
    wall_time: float


class RecordingPBT(PopulationBasedTraining):
    """``PopulationBasedTraining`` that reports every exploit to its listeners."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.listeners: list[Callable[[ExploitEvent], None]] = []
        self.events: list[ExploitEvent] = []

    def _exploit(self, tune_controller: Any, trial: Trial, trial_to_clone: Trial) -> None:
        keys = list(self._hyperparam_mutations)
        old = {k: trial.config.get(k) for k in keys}
        # The scheduler's own state holds the result being processed (trial.last_result is one
        # behind) and, for the clone, the result its checkpoint was taken at.
        iteration = (self._trial_state[trial].last_result or {}).get("training_iteration", 0)
        source_iteration = (self._trial_state[trial_to_clone].last_result or {}).get(
            "training_iteration", 0)
        super()._exploit(tune_controller, trial, trial_to_clone)
        event = ExploitEvent(
            trial_id=trial.trial_id,
            source_id=trial_to_clone.trial_id,
            iteration=int(iteration),
            source_iteration=int(source_iteration),
            old=old,
            new={k: trial.config.get(k) for k in keys},
            wall_time=time.time(),
        )
        self.events.append(event)
        for listener in self.listeners:
            listener(event)


class PlainFIFO(FIFOScheduler):
    """Every trial trains with its own fixed config (no exploits): a baseline, or one agent."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[ExploitEvent], None]] = []
        self.events: list[ExploitEvent] = []


class ScheduleReplay(PlainFIFO):
    """Every trial follows one schedule: at iteration k its hyperparameters change to H_k.

    Ray's ``PopulationBasedTrainingReplay`` does this for a single trial; replaying on several
    seeds needs it per trial. The change is made as Ray's replay makes it: save, pause, set the
    new config; the trial resumes from that checkpoint with the new values.
    """

    def __init__(self, changes: list[tuple[int, dict[str, Any]]]) -> None:
        super().__init__()
        self.changes = sorted(changes, key=lambda change: change[0])
        self.next_change: dict[str, int] = {}

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        index = self.next_change.setdefault(trial.trial_id, 0)
        if index >= len(self.changes) or result.get("training_iteration", 0) < self.changes[
                index][0]:
            return super().on_trial_result(tune_controller, trial, result)
        saved = tune_controller._schedule_trial_save(trial, result=result).resolve()
        trial.run_metadata.checkpoint_manager._latest_checkpoint_result = saved
        tune_controller.pause_trial(trial, should_checkpoint=False)
        trial.set_config({**trial.config, **self.changes[index][1]})
        self.next_change[trial.trial_id] = index + 1
        return self.NOOP


Scheduler = RecordingPBT | PlainFIFO


def build_scheduler(plan: Plan) -> Scheduler:
    """Make the plan's scheduler: PBT with the safe explore step, or plain FIFO."""
    if plan.scheduler.name == "fifo":
        return PlainFIFO()
    if plan.scheduler.name == "replay":
        return ScheduleReplay(plan.scheduler.options["changes"])
    options = dict(plan.scheduler.options)
    return RecordingPBT(
        metric=plan.stop.metric,
        mode=plan.stop.mode,
        hyperparam_mutations={k: d.for_pbt() for k, d in plan.mutations.items()},
        custom_explore_fn=Explore(plan.mutations, plan.algorithm.invariants),
        # Until a trial finishes its first episode it has no return: PBT then waits for it.
        require_attrs=False,
        **options,
    )

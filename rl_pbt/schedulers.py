"""Trial schedulers built from the plan, and the exploit events they report.

Ray's ``PopulationBasedTraining`` and ``PB2`` log exploits to text files only; tracking needs them
as they happen (which trial cloned which, at which iteration, old -> new values), so the
subclasses here tell their listeners at every exploit. Schedulers that never exploit (FIFO,
random search, ASHA) carry the same, always empty, listener list, so ``run`` treats all alike.
ASHA tells its stop listeners of each trial it stops early, which Tune records only as ended.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import (
    AsyncHyperBandScheduler,
    FIFOScheduler,
    PopulationBasedTraining,
    TrialScheduler,
)

from rl_pbt.distributions import Distribution
from rl_pbt.explore import Explore
from rl_pbt.handover import hand_over_checkpoint
from rl_pbt.plan import Plan
from rl_pbt.values import finite


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


@dataclass(frozen=True)
class EarlyStop:
    """A trial the scheduler stopped before its caps (ASHA: not in the top 1/reduction_factor of
    the trials that reached its rung)."""

    trial_id: str
    iteration: int
    score: float | None


class ExploitListeners:
    """Mixin for any scheduler: the listeners that hear of exploits (and of early stops) and
    the exploits so far."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.listeners: list[Callable[[ExploitEvent], None]] = []
        self.stop_listeners: list[Callable[[EarlyStop], None]] = []
        self.events: list[ExploitEvent] = []
        #: False once the run winds down (``PlanStopper``): no waiting trial starts then.
        self.may_start: Callable[[], bool] = lambda: True

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """The scheduler's choice, or None while the run winds down: a trial started then would
        take the CPU its last iteration needs from a trial being waited for, and be killed."""
        if not self.may_start():
            return None
        return super().choose_trial_to_run(tune_controller)  # type: ignore[misc]

    def report(self, event: ExploitEvent) -> None:
        """Keep the event and tell every listener."""
        self.events.append(event)
        for listener in self.listeners:
            listener(event)


#: Perturbation intervals a trial may keep its turn for while a hand-over cannot be made safely.
MAX_KEPT_TURNS = 3


class RecordingExploits(ExploitListeners):
    """Mixin for ``PopulationBasedTraining`` and its subclasses: report every ``_exploit``."""

    _hyperparam_mutations: dict[str, Any]
    _trial_state: dict[Trial, Any]

    def __init__(self, *, slots: int | None = None, **kwargs: Any) -> None:
        """``slots``: trials the cluster runs at once (:func:`rl_pbt.cluster.concurrency`)."""
        super().__init__(**kwargs)
        self.slots = slots
        self._handing_over: set[Trial] = set()  # told to PAUSE for another's turn, still running
        self._kept_turns: dict[Trial, int] = {}  # PAUSEs turned into CONTINUE in a row
        self._reserved: list[tuple[Any, int]] = []  # actor cache places held for a new round
        self._scored_this_turn: set[Trial] = set()  # reported the metric since it last resumed

    def _exploit(self, tune_controller: Any, trial: Trial, trial_to_clone: Trial) -> None:
        keys = list(self._hyperparam_mutations)
        old = {k: trial.config.get(k) for k in keys}
        # The scheduler's own state holds the result being processed (trial.last_result is one
        # behind) and, for the clone, the result its checkpoint was taken at.
        iteration = (self._trial_state[trial].last_result or {}).get("training_iteration", 0)
        source_iteration = source_checkpoint_iteration(
            trial_to_clone, self._trial_state[trial_to_clone].last_result)
        saving, running = trial.is_saving, trial.status == Trial.RUNNING
        if running and getattr(self, "_synch", False):
            self._keep_actors_for_next_round(tune_controller, trial)
        super()._exploit(tune_controller, trial, trial_to_clone)  # type: ignore[misc]
        self._scored_this_turn.discard(trial)  # it restarts from the clone's checkpoint
        self._kept_turns.pop(trial, None)
        if saving:
            _drop_stale_stop(tune_controller, trial)
        if running and trial.status == Trial.PAUSED and not getattr(self, "_synch", False):
            self._call_off_hand_overs(tune_controller)
        handover = hand_over_checkpoint(trial, trial_to_clone)
        if handover.newer_iteration is not None:  # PBT's pick was pruned (rl_pbt.handover)
            source_iteration = handover.newer_iteration
        self.report(ExploitEvent(
            trial_id=trial.trial_id,
            source_id=trial_to_clone.trial_id,
            iteration=int(iteration),
            source_iteration=int(source_iteration),
            old=old,
            new={k: trial.config.get(k) for k in keys},
            wall_time=time.time(),
        ))

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        """Ray's PBT decision, with three mends: synchronous PBT keeps the next perturbation
        ahead of every trial, the trial that completes a synchronous round opens the next one,
        and asynchronous PBT hands over one turn at a time (:meth:`_one_turn_at_a_time`).

        The round opener: Ray pauses every trial at the sync point, also the last one, whose
        result completes the round. Tune then keeps one paused actor (the first that has no
        trial staged for it) and stops the other, so the next round starts one trial in the
        kept process and boots a new one for the second slot (5-7 s on 2 cores); a trial that
        ends its turn before that process is up hands its actor to the staged trial, and the
        starting process is killed: round after round, one slot idle. The last trial keeps
        running instead (unless its exploit paused it): the round's perturbation is done, and
        it trains toward the next sync point like every other trial will.

        After a perturbation round Ray sets the next one to ``max(next + interval, latest
        time)``. A resumed run starts a fresh scheduler (next = one interval) with trials far
        beyond it, so the next round lands on the trials' own time: none is behind it, none is
        chosen to run, and the run hangs (Ray PR #48616, not merged). Move it one interval on.
        """
        synch = getattr(self, "_synch", False)
        before = getattr(self, "_next_perturbation_sync", None)
        if finite(result.get(self._metric)) is not None:
            self._scored_this_turn.add(trial)
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        if synch and self._next_perturbation_sync != before:
            latest = max(state.last_train_time for state in self._trial_state.values())
            if self._next_perturbation_sync <= latest:
                self._next_perturbation_sync = latest + self._perturbation_interval
            if decision == TrialScheduler.PAUSE and trial.status == Trial.RUNNING:
                decision = TrialScheduler.CONTINUE  # the round opener (above)
        if not synch and decision == TrialScheduler.PAUSE:
            decision = self._one_turn_at_a_time(tune_controller, trial)
        return decision

    def _keep_actors_for_next_round(self, tune_controller: Any, trial: Trial) -> None:
        """Let Tune keep the exploited round closer's actor beside the one it already keeps.

        Synchronous PBT exploits the trial whose result completes a round while it runs, and
        pauses it at once. Tune keeps a paused trial's actor only for a staged trial, or when it
        keeps none yet; the first trial to wait for the round already holds that place, so
        the exploited trial's process is stopped. The next round then boots a new process for
        its second slot (5-7 s on 2 cores), which the first trial's hand-over kills when its
        turn ends sooner: round after round, one slot idle (seen in 2 of 6 synch runs). Places
        for the kept actors are held until both are reused (:meth:`choose_trial_to_run`).
        """
        cache = _actor_cache(tune_controller)
        places = cache.num_cached_objects + 1
        cache.increase_max(trial.placement_group_factory, places)
        self._reserved.append((trial.placement_group_factory, places))

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """Ray's choice; places held for a new round are given back once no actor is kept, no
        trial is waiting to run, or the next one needs other resources than the kept actors
        hold (it could not take them, and they would keep its resources)."""
        choice = self._spare_booting_actor(
            tune_controller, super().choose_trial_to_run(tune_controller))  # type: ignore[misc]
        if self._reserved:
            cache = _actor_cache(tune_controller)
            if (choice is None or not cache.num_cached_objects or any(
                    choice.placement_group_factory != key for key, _ in self._reserved)):
                for key, places in self._reserved:
                    cache.decrease_max(key, places)
                self._reserved.clear()
        return choice

    def _spare_booting_actor(self, tune_controller: Any, choice: Trial | None) -> Trial | None:
        """Another trial due to run when Ray's choice would take a kept actor while a process
        of its own is still booting: Tune gives it the kept actor and kills the booting one.

        Synchronous PBT pauses each trial at the round's end to let the others catch up. With
        rounds shorter than a process's start (4 s on 2 cores; a test's rounds take 0.1 s), the
        first trial's actor went to the trial whose own process was booting, then to the next,
        and so on: the whole run trained in one process, the second slot's starts killed one by
        one (3 runs in 6 here, with a busy core during the start). Trials whose process is up,
        or that wait for resources, take the kept actor first; Ray's order stands among them.
        """
        if choice is None or not _booting(tune_controller, choice) or \
                not _actor_cache(tune_controller).has_cached_object(choice.placement_group_factory):
            return choice
        synch = getattr(self, "_synch", False)
        others = [t for t in tune_controller.get_trials()
                  if t is not choice and t.status in (Trial.PENDING, Trial.PAUSED)
                  and t.placement_group_factory == choice.placement_group_factory
                  and (not synch or self._trial_state[t].last_train_time
                       < self._next_perturbation_sync)
                  and not _booting(tune_controller, t)]
        if not others:
            return choice
        return min(others, key=lambda t: self._trial_state[t].last_train_time)

    def _one_turn_at_a_time(self, tune_controller: Any, trial: Trial) -> str:
        """Hand over one trial's turn at a time when the population takes turns (async PBT).

        At its perturbation interval a running trial pauses so that a waiting one can run, and
        Tune gives the paused trial's actor to the trial it staged to run next, killing any actor
        that trial had starting. Two ways that goes wrong, both seen here: two trials pause
        together while Tune has staged one successor, and Tune discards the second actor (its
        search is over); or a trial pauses while the other slot's actor is still starting, and
        the reuse kills that actor. Either way one slot is left to boot processes (7 s each on
        2 cores with RLlib) that the next reuse kills: the run's training share fell from 0.9
        to 0.74. So a trial keeps its turn (pauses at its next interval) unless every slot runs
        a trial, no other hand-over is in flight and a successor is staged. The first two pass
        within a step or two; a slot that stays empty (a cluster that lost a node) is waited
        for three intervals in a row at most, so the trials waiting for a turn cannot starve.

        A trial that has finished no episode since it resumed keeps its turn too, for up to
        three intervals: a pause drops its episodes in progress, so with turns shorter than an
        episode (Pendulum's 200 steps, 187 per env in a turn of a probe's run) it was never
        scored again, and PBT never ranked or exploited it.
        """
        trials = tune_controller.get_trials()
        self._handing_over = {t for t in self._handing_over
                              if t.status == Trial.RUNNING and t is not trial}
        if self._handing_over or not any(t.status == Trial.PENDING for t in trials):
            return TrialScheduler.CONTINUE  # both pass within a step or two
        running = sum(t.status == Trial.RUNNING for t in trials)
        kept = self._kept_turns.get(trial, 0)
        empty_slot = self.slots is not None and running < self.slots
        if (empty_slot or trial not in self._scored_this_turn) and kept < MAX_KEPT_TURNS:
            self._kept_turns[trial] = kept + 1
            return TrialScheduler.CONTINUE
        self._kept_turns[trial] = 0
        self._handing_over.add(trial)
        self._scored_this_turn.discard(trial)
        return TrialScheduler.PAUSE

    def _call_off_hand_overs(self, tune_controller: Any) -> None:
        """Keep the turns that an exploit leaves without a successor.

        Ray's PBT pauses an exploited trial at once, and Tune gives its actor to the trial staged
        to run next. A hand-over already in flight (a trial told to pause, its PAUSE waiting for
        its save: the upper-quantile trial that met its interval together with the exploited
        one) then finds nothing staged when the save is done: Tune stops that actor and boots a
        process for the next waiting trial (5-6 s on 2 cores, one slot idle; seen here in one
        default run of six). Those hand-overs are called off: the trial trains on and hands
        over at its next interval, as when no successor was staged.
        """
        cached = _cached_decisions(tune_controller)
        resetting = _controller(tune_controller)._resetting_trials  # took a kept actor already
        staged = sum(t.status == Trial.PENDING and t not in resetting
                     for t in tune_controller.get_trials())
        in_flight = sorted((t for t in self._handing_over if t.status == Trial.RUNNING
                            and cached.get(t.trial_id) == TrialScheduler.PAUSE),
                           key=lambda t: t.trial_id)
        for kept in in_flight[max(staged - 1, 0):]:  # the exploited trial's actor takes one
            cached[kept.trial_id] = TrialScheduler.CONTINUE
            self._handing_over.discard(kept)


def source_checkpoint_iteration(clone: Trial, last_result: Mapping[str, Any] | None) -> int:
    """The iteration of the checkpoint an exploit copies from ``clone``.

    PBT copies a paused clone's newest checkpoint (``trial.checkpoint``), and otherwise the
    one it saves at the clone's current result (``last_result``). After a resume the two differ:
    the fresh scheduler has seen fewer results than the restored clone has checkpoints.
    """
    iteration = (last_result or {}).get("training_iteration", 0)
    if clone.status == Trial.PAUSED and not clone.is_saving:
        latest = clone.latest_checkpoint_result
        if latest is not None and latest.checkpoint is not None:
            iteration = latest.metrics.get("training_iteration", iteration)
    return int(iteration)


def _drop_stale_stop(tune_controller: Any, trial: Trial) -> bool:
    """Forget the STOP that Ray caches when synchronous PBT exploits a trial that is saving.

    In synchronous mode a trial waits for the others with a pause-save in flight; when the last
    one arrives, PBT pauses it again without a checkpoint. Ray's stop path sees the save, caches
    a STOP for "after the save", then discards that save. The trial goes on PAUSED with the STOP
    still cached, and the next periodic checkpoint after its exploit runs the STOP: the trial
    ends TERMINATED mid-run (Ray issue #57906, PR #61448 not merged; reproduced here with a
    two-trial synch run and ``checkpoint.frequency`` 1). The trial is already paused, and the
    save that decision waited for will never come, so the decision is dropped (True).
    """
    cached = _cached_decisions(tune_controller)
    if trial.status == Trial.PAUSED and cached.get(trial.trial_id) == TrialScheduler.STOP:
        del cached[trial.trial_id]
        return True
    return False


def _cached_decisions(tune_controller: Any) -> dict[str, str]:
    """Tune's decisions that wait for a trial's save to resolve, by trial id (private to Tune:
    an AttributeError here if Ray renames it)."""
    return _controller(tune_controller)._cached_trial_decisions


def _controller(tune_controller: Any) -> Any:
    """Tune's controller behind the wrapper that schedulers are handed (when there is one)."""
    return getattr(tune_controller, "_tune_controller", tune_controller)


def _booting(tune_controller: Any, trial: Trial) -> bool:
    """Whether the trial's own actor has its resources and its process is starting (private to
    Tune, as above)."""
    controller = _controller(tune_controller)
    actor = controller._trial_to_actor.get(trial)
    return (actor is not None and actor not in controller._started_actors
            and controller._actor_manager.is_actor_started(actor))


def _actor_cache(tune_controller: Any) -> Any:
    """Tune's cache of paused trials' actors (private to Tune, as above)."""
    return _controller(tune_controller)._actor_cache


class RecordingPBT(RecordingExploits, PopulationBasedTraining):
    """``PopulationBasedTraining`` that reports every exploit to its listeners."""


class RecordingASHA(ExploitListeners, AsyncHyperBandScheduler):
    """ASHA: trials keep their first draw; the worse ones stop early at each rung, and the
    stop listeners hear which (Tune ends them as it ends a trial at its cap)."""

    _time_attr: str
    _max_t: float
    _metric: str

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result.get(self._time_attr, self._max_t) < self._max_t:
            stop = EarlyStop(trial.trial_id, int(result.get("training_iteration", 0)),
                             result.get(self._metric))
            for listener in self.stop_listeners:
                listener(stop)
        return action


def pb2_bounds(mutations: Mapping[str, Distribution]) -> dict[str, list[float]]:
    """``PB2(hyperparam_bounds=...)`` from the mutation distributions.

    PB2 casts its continuous pick back with the type of the cloned value, so an integer key is
    truncated: with bounds ``[low, high]`` only an exact ``high`` would ever give ``high``. One
    more unit on top gives every integer an equal share of the range; the explore step clamps
    ``high + 1`` back to ``high``.
    """
    return {key: [dist.low, dist.high + 1 if dist.integer else dist.high]
            for key, dist in mutations.items()}


def restore_dropped(original: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Put back the keys PB2's flatten/unflatten round trip loses (empty dicts, as env_config).

    Args:
        original: the cloned trial's config.
        new: the config PB2 made from its flattened copy.
    """
    for key, value in original.items():
        if key not in new:
            new[key] = copy.deepcopy(value)
        elif isinstance(value, Mapping) and isinstance(new[key], dict):
            restore_dropped(value, new[key])
    return new


def record_copied_start(data: Any, trial: Trial, clone: Trial) -> Any:
    """Add the row PB2 leaves out when it copies the clone's values instead of picking new ones.

    PB2 learns from the return gained over an interval with unchanged values, so a clone with
    fewer than two results under its values cannot be explored from: PB2 copies its values.
    When its Gaussian process picks, it records the exploited trial's starting point (the
    clone's time and return, the new values); when it copies, it records nothing, so the copied
    trial's next interval is no data point either, and a later exploit of that trial copies
    again. Seen here (synch PB2, 4 trials, perturbation every 2 iterations): the trials copied
    at iteration 2 were the clones at 4 in 4 of 4 runs, and every exploit up to 6 copied. The
    row below is the one PB2 writes when it picks, with the copied values.
    """
    import pandas as pd

    source = data[data["Trial"] == str(clone)]
    if source.empty:
        return data
    start = source.iloc[[-1]].copy()
    start["Trial"] = str(trial)
    return pd.concat([data, start]).reset_index(drop=True)


@cache
def recording_pb2() -> type:
    """The PB2 class, defined on first use: importing PB2 imports scikit-learn (1-2 s), which
    runs with another scheduler should not wait for."""
    from ray.tune.schedulers.pb2 import PB2

    class RecordingPB2(RecordingExploits, PB2):
        """``PB2`` that reports every exploit and keeps every config key of the clone."""

        def _get_new_config(self, trial: Trial, trial_to_clone: Trial) -> tuple[dict, dict]:
            rows = len(self.data)
            new_config, operations = super()._get_new_config(trial, trial_to_clone)
            if len(self.data) == rows:  # PB2 copied the clone's values
                self.data = record_copied_start(self.data, trial, trial_to_clone)
            return restore_dropped(trial_to_clone.config, new_config), operations

    # Importable as rl_pbt.schedulers.RecordingPB2 (see __getattr__), so pickle finds it.
    RecordingPB2.__module__, RecordingPB2.__qualname__ = __name__, "RecordingPB2"
    return RecordingPB2


def __getattr__(name: str) -> Any:
    """``rl_pbt.schedulers.RecordingPB2`` is :func:`recording_pb2`'s class."""
    if name == "RecordingPB2":
        return recording_pb2()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PlainFIFO(ExploitListeners, FIFOScheduler):
    """Every trial trains with its own fixed config (no exploits): a baseline, one agent, or
    random search (each trial's config drawn once from the mutations)."""


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


#: What ``run`` needs of any scheduler built here: exploit listeners and events.
Scheduler = ExploitListeners


def build_scheduler(plan: Plan, slots: int | None = None) -> Scheduler:
    """Make the plan's scheduler: PBT or PB2 with the safe explore step, ASHA, or plain FIFO.

    ``slots``: trials that run at once, which PBT needs to hand over turns safely.
    """
    name, options = plan.scheduler.name, dict(plan.scheduler.options)
    if name in ("fifo", "random"):
        return PlainFIFO()
    if name == "replay":
        return ScheduleReplay(options["changes"])
    if name == "asha":
        return RecordingASHA(metric=plan.stop.metric, mode=plan.stop.mode, **options)
    common = {
        "metric": plan.stop.metric,
        "mode": plan.stop.mode,
        "custom_explore_fn": Explore(plan.mutations, plan.algorithm.invariants),
        # Until a trial finishes its first episode it has no return: PBT then waits for it.
        "require_attrs": False,
        "slots": slots,
        **options,
    }
    if name == "pb2":
        return recording_pb2()(hyperparam_bounds=pb2_bounds(plan.mutations), **common)
    return RecordingPBT(
        hyperparam_mutations={k: d.for_pbt() for k, d in plan.mutations.items()}, **common)

"""Asynchronous PBT with more trials than slots hands over one turn at a time.

When two running trials reach their perturbation interval together, Tune has staged only one
waiting trial; it discards the second paused trial's actor and boots a new process for the next
waiting trial (7 s on this machine with RLlib), which the next reuse kills. rl_pbt's PBT keeps
the second trial running until the first hand-over is done, so both slots keep training. The
same holds when one of the two is exploited: PBT pauses it at once, its actor goes to the staged
trial, and the other's hand-over (waiting for its save) is called off.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.utils.object_cache import _ObjectCache

from rl_pbt.schedulers import RecordingPBT

ITERATIONS = 8
TICK = 0.4  # seconds per step


def pbt(cls: type = RecordingPBT) -> PopulationBasedTraining:
    options = {"slots": 2} if cls is RecordingPBT else {}
    return cls(time_attr="training_iteration", perturbation_interval=1, quantile_fraction=0.0,
               metric="score", mode="max", hyperparam_mutations={"rate": [1.0, 2.0]}, **options)


class FakeTrial:
    def __init__(self, status: str, trial_id: str = "") -> None:
        self.status = status
        self.trial_id = trial_id


def controller(*trials: FakeTrial, cached: dict | None = None,
               resetting: tuple = ()) -> SimpleNamespace:
    return SimpleNamespace(get_trials=lambda: list(trials), _cached_trial_decisions=cached,
                           _resetting_trials=set(resetting))


def test_second_trial_keeps_its_turn_until_the_first_hand_over_is_done():
    a, b = FakeTrial(Trial.RUNNING), FakeTrial(Trial.RUNNING)
    c, d = FakeTrial(Trial.PENDING), FakeTrial(Trial.PAUSED)
    scheduler, tune_controller = pbt(), controller(a, b, c, d)
    scheduler._scored_this_turn.update({a, b})
    assert scheduler._one_turn_at_a_time(tune_controller, a) == TrialScheduler.PAUSE
    assert scheduler._one_turn_at_a_time(tune_controller, b) == TrialScheduler.CONTINUE
    a.status, c.status, d.status = Trial.PAUSED, Trial.RUNNING, Trial.PENDING  # c took a's actor
    assert scheduler._one_turn_at_a_time(tune_controller, b) == TrialScheduler.PAUSE


def test_no_hand_over_while_a_slot_is_starting_or_nothing_is_staged():
    a, starting = FakeTrial(Trial.RUNNING), FakeTrial(Trial.PENDING)
    assert pbt()._one_turn_at_a_time(controller(a, starting), a) == TrialScheduler.CONTINUE
    a, b, paused = FakeTrial(Trial.RUNNING), FakeTrial(Trial.RUNNING), FakeTrial(Trial.PAUSED)
    assert pbt()._one_turn_at_a_time(controller(a, b, paused), a) == TrialScheduler.CONTINUE


@pytest.mark.parametrize("staged, resetting", [(1, 0), (2, 0), (2, 1)])
def test_an_exploit_calls_off_the_hand_over_it_leaves_without_a_successor(staged, resetting):
    """``resetting``: waiting trials already resetting into a kept actor (they need none)."""
    saving = FakeTrial(Trial.RUNNING, "saving")  # upper quantile: its PAUSE waits for its save
    waiting = [FakeTrial(Trial.PENDING, f"waiting{i}") for i in range(staged)]
    exploited = FakeTrial(Trial.RUNNING, "exploited")
    cached: dict[str, str] = {}
    scheduler = pbt()
    scheduler._scored_this_turn.add(saving)
    tune_controller = controller(saving, exploited, *waiting, cached=cached,
                                 resetting=tuple(waiting[:resetting]))
    assert scheduler._one_turn_at_a_time(tune_controller, saving) == TrialScheduler.PAUSE
    cached["saving"] = TrialScheduler.PAUSE  # as Tune caches it until the save resolves
    exploited.status = Trial.PAUSED  # Ray's PBT pauses it; Tune gives its actor to waiting0
    scheduler._call_off_hand_overs(tune_controller)
    kept = staged - resetting == 1  # nothing staged for the saving trial's actor: it trains on
    assert cached["saving"] == (TrialScheduler.CONTINUE if kept else TrialScheduler.PAUSE)
    assert (saving in scheduler._handing_over) is not kept


def test_a_trial_keeps_its_turn_three_times_at_most():
    a, starting = FakeTrial(Trial.RUNNING), FakeTrial(Trial.PENDING)
    scheduler, tune_controller = pbt(), controller(a, starting)
    decisions = [scheduler._one_turn_at_a_time(tune_controller, a) for _ in range(4)]
    assert decisions == [TrialScheduler.CONTINUE] * 3 + [TrialScheduler.PAUSE]


def test_a_trial_not_scored_since_it_resumed_keeps_its_turn_three_times_at_most():
    """A hand-over drops the episodes in progress: with turns shorter than an episode a trial
    was never scored again (Pendulum, a probe's run). It keeps its turn until it scores."""
    a, b, c = (FakeTrial(Trial.RUNNING, "a"), FakeTrial(Trial.RUNNING, "b"),
               FakeTrial(Trial.PENDING, "c"))
    scheduler, tune_controller = pbt(), controller(a, b, c)
    decisions = [scheduler._one_turn_at_a_time(tune_controller, a) for _ in range(4)]
    assert decisions == [TrialScheduler.CONTINUE] * 3 + [TrialScheduler.PAUSE]
    scheduler._handing_over.clear()
    scheduler._scored_this_turn.add(b)  # on_trial_result marks a result with a finite score
    assert scheduler._one_turn_at_a_time(tune_controller, b) == TrialScheduler.PAUSE
    assert b not in scheduler._scored_this_turn  # its next turn starts unscored


def test_synchronous_round_closer_keeps_its_actor_until_the_next_round_takes_both():
    """The trial whose result closes a synch round is exploited while running: Tune alone keeps
    only the first waiter's actor and stops the closer's (a new process for the next round)."""
    cache = _ObjectCache(may_keep_one=True)
    assert cache.cache_object("cpu", "first waiter")
    assert not cache.cache_object("cpu", "closer")  # Tune's rule, without rl_pbt
    scheduler = pbt()
    scheduler._synch, scheduler._next_perturbation_sync = True, 4
    closer, behind = FakeTrial(Trial.RUNNING, "closer"), FakeTrial(Trial.PAUSED, "behind")
    closer.placement_group_factory = behind.placement_group_factory = "cpu"
    scheduler._trial_state = {behind: SimpleNamespace(last_train_time=2)}
    tune_controller = SimpleNamespace(get_trials=lambda: [behind], _actor_cache=cache,
                                      _trial_to_actor={})
    scheduler._keep_actors_for_next_round(tune_controller, closer)
    assert cache.cache_object("cpu", "closer")
    assert list(cache.flush_cached_objects()) == []  # Tune's clean-up after the step keeps both
    assert scheduler.choose_trial_to_run(tune_controller) is behind
    assert cache.pop_cached_object("cpu") == "first waiter"
    assert scheduler.choose_trial_to_run(tune_controller) is behind
    assert list(cache.flush_cached_objects()) == []
    assert cache.pop_cached_object("cpu") == "closer"
    scheduler.choose_trial_to_run(tune_controller)  # both taken: the places are given back
    assert cache.total_max_objects == 0


@pytest.mark.parametrize(("status", "closes_round", "expected"), [
    (Trial.RUNNING, True, TrialScheduler.CONTINUE),  # the round opener keeps training
    (Trial.PAUSED, True, TrialScheduler.PAUSE),      # exploited: Ray paused it, it stays paused
    (Trial.RUNNING, False, TrialScheduler.PAUSE),    # a waiter for the round: Ray's pause
])
def test_synchronous_round_closer_opens_the_next_round(monkeypatch, status, closes_round,
                                                       expected):
    """Ray pauses every trial at the sync point, also the one whose result closes the round (it
    moves the next sync point then); that one keeps running instead, unless its exploit
    paused it."""
    scheduler = pbt()
    scheduler._synch, scheduler._next_perturbation_sync = True, 4
    trial = FakeTrial(status, "closer")
    scheduler._trial_state = {trial: SimpleNamespace(last_train_time=4)}

    def rays_decision(self, tune_controller, trial, result):
        if closes_round:
            self._next_perturbation_sync = 5
        return TrialScheduler.PAUSE

    monkeypatch.setattr(PopulationBasedTraining, "on_trial_result", rays_decision)
    assert scheduler.on_trial_result(controller(trial), trial, {}) == expected


def test_places_held_for_a_round_are_given_back_to_a_trial_that_needs_other_resources():
    cache = _ObjectCache(may_keep_one=True)
    scheduler = pbt()
    scheduler._synch, scheduler._next_perturbation_sync = True, 4
    closer, behind = FakeTrial(Trial.RUNNING, "closer"), FakeTrial(Trial.PAUSED, "behind")
    closer.placement_group_factory, behind.placement_group_factory = "1 cpu", "2 cpus"
    scheduler._trial_state = {behind: SimpleNamespace(last_train_time=2)}
    tune_controller = SimpleNamespace(get_trials=lambda: [behind], _actor_cache=cache,
                                      _trial_to_actor={})
    scheduler._keep_actors_for_next_round(tune_controller, closer)
    assert cache.cache_object("1 cpu", "closer")
    assert scheduler.choose_trial_to_run(tune_controller) is behind
    assert cache.total_max_objects == 0
    assert list(cache.flush_cached_objects(force_all=True)) == ["closer"]


class FakeActors:
    """Tune's actor manager as ``_booting`` reads it: which actors have their resources."""

    def __init__(self, placed: set) -> None:
        self.placed = placed

    def is_actor_started(self, actor: str) -> bool:
        return actor in self.placed


@pytest.mark.parametrize("synch", [True, False])
def test_a_kept_actor_goes_to_a_trial_whose_own_process_is_not_booting(synch):
    """Ray picks the least trained trial; when that one's own process is booting, Tune would
    give it the kept actor and kill the booting one (round after round, with rounds shorter
    than a start: the whole run in one process). Another trial due to run takes it instead."""
    scheduler = pbt()
    scheduler._synch, scheduler._next_perturbation_sync = synch, 4
    booting, waiting, up = (FakeTrial(Trial.PENDING, name) for name in ("b", "w", "u"))
    done = FakeTrial(Trial.PAUSED, "done")  # at the sync point already
    for trial in (booting, waiting, up, done):
        trial.placement_group_factory = "cpu"
    scheduler._trial_state = {booting: SimpleNamespace(last_train_time=0),
                              waiting: SimpleNamespace(last_train_time=1),
                              up: SimpleNamespace(last_train_time=2),
                              done: SimpleNamespace(last_train_time=4)}
    cache = _ObjectCache(may_keep_one=True)
    tune_controller = SimpleNamespace(
        get_trials=lambda: [done, up, waiting, booting], _actor_cache=cache,
        # b's process is starting; w's actor waits for resources; u's process is up.
        _trial_to_actor={booting: "B", waiting: "W", up: "U"}, _started_actors={"U"},
        _actor_manager=FakeActors({"B", "U"}))
    assert scheduler.choose_trial_to_run(tune_controller) is booting  # no kept actor: Ray's
    assert cache.cache_object("cpu", "kept")
    assert scheduler.choose_trial_to_run(tune_controller) is waiting
    tune_controller._actor_manager.placed.add("W")  # both due trials' processes are booting
    up.status = Trial.RUNNING
    # Synchronous: the paused trial waits at the sync point, so Ray's choice stands; else the
    # paused trial, whose actor went to the cache, takes the kept one.
    assert scheduler.choose_trial_to_run(tune_controller) is (booting if synch else done)


def lockstep_trainable() -> type:
    """Trials that report on the same tick of the wall clock, so the two running ones reach
    their perturbation interval together whatever their start-up stagger."""

    class Lockstep(tune.Trainable):
        def setup(self, config: dict) -> None:
            self.total = 0.0

        def step(self) -> dict:
            time.sleep(TICK - time.time() % TICK)
            self.total += self.config["rate"]
            return {"score": self.total, "tick": round(time.time() / TICK)}

        def save_checkpoint(self, checkpoint_dir: str) -> dict:
            return {"total": self.total}

        def load_checkpoint(self, checkpoint: dict) -> None:
            self.total = checkpoint["total"]

        def reset_config(self, new_config: dict) -> bool:
            time.sleep(0.1)  # as RLlib's rebuild: the staged trial takes a while to start
            return True

    return Lockstep


@pytest.mark.slow
def test_population_taking_turns_reuses_the_first_two_actors(ray_session, tmp_path):
    results = tune.Tuner(
        lockstep_trainable(),
        param_space={"rate": tune.grid_search([1.0, 1.0, 2.0, 2.0])},
        tune_config=tune.TuneConfig(scheduler=pbt(), reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0,
                                  stop={"training_iteration": ITERATIONS}),
    ).fit()
    assert sorted(r.metrics["training_iteration"] for r in results) == [ITERATIONS] * 4
    # Both slots train at every tick until the first trial is done (about 2 results a tick;
    # seen 1.92-2.0). With Ray's own PBT one actor is discarded at the first double pause and
    # every later turn boots a process the next reuse kills: one trial trains at a time (seen
    # 0.72-0.78). After the first trial is done, its last result can meet a pause: not counted.
    # With exploits (quantile 0.5) the calling off of hand-overs read 2.0 in 3 runs against
    # 1.14-1.62 without it, but 1.50 once in a full-suite run: too close to tell apart, so the
    # calling off is tested by the unit test above, not here.
    ticks = [tick for r in results for tick in r.metrics_dataframe["tick"]]
    first_done = min(max(r.metrics_dataframe["tick"]) for r in results)
    per_tick = sum(t <= first_done for t in ticks) / (first_done - min(ticks) + 1)
    assert per_tick >= 1.5, f"{per_tick:.2f} results per tick on 2 slots"

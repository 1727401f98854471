"""Other schedulers to compare PBT with: PB2, ASHA and random search.

Resolution (options, PB2's numeric ranges), PB2's explore kept valid (integers, bounds), a tiny
PB2 and random-search run in the session's Ray, and ``scripts/compare_schedulers.py`` on MLflow
runs with known values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, TINY, compose_config, config_error, load_script
from ray.tune.search.sample import Domain

from rl_pbt import scheduler_options
from rl_pbt.algorithms import ppo_invariants
from rl_pbt.distributions import LogRandInt, LogUniform, RandInt, Uniform
from rl_pbt.errors import ConfigError
from rl_pbt.explore import Explore
from rl_pbt.records import EXPLOITS_FILE, TRIALS_FILE, read_jsonl
from rl_pbt.resolve import resolve
from rl_pbt.schedulers import (
    PlainFIFO,
    RecordingASHA,
    RecordingPB2,
    build_scheduler,
    pb2_bounds,
    restore_dropped,
)
from rl_pbt.tracking import child_runs

#: PB2's Gaussian process, fitted on the few points of a tiny run, warns that it barely converged.
pytestmark = [pytest.mark.filterwarnings("ignore:The optimal value found"),
              pytest.mark.filterwarnings("ignore:lbfgs failed to converge")]


def plan_for(overrides: list[str], tmp_path: Path):
    return resolve(compose_config(overrides), tmp_path, launch_dir=tmp_path)


def load_compare_script():
    """``scripts/compare_schedulers.py`` as a module."""
    return load_script(ROOT / "scripts" / "compare_schedulers.py", "compare_schedulers")


# -- resolution -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scheduler=asha", "scheduler.grace_period=60"],
         "scheduler.grace_period: must be <= scheduler.max_t (50), got 60"),
        (["scheduler=asha", "scheduler.reduction_factor=1"],
         "scheduler.reduction_factor: must be a number in (1, inf), got 1"),
        (["scheduler=asha", "scheduler.max_t=0"], "scheduler.max_t: must be a number in (0, inf)"),
        (["scheduler=asha", "stopper.max_iterations=null"],
         "scheduler.max_t: must be a number in (0, inf), got None"),
        (["scheduler=asha", "scheduler.grace_period=-1"],
         "scheduler.grace_period: must be a number in (0, inf), got -1"),
        (["scheduler=asha", "scheduler.time_attr=episodes"],
         "scheduler.time_attr: unknown 'episodes'; choose from training_iteration"),
        (["scheduler=asha", "+scheduler.max_tt=5"],
         "scheduler.max_tt: not an ASHA option; did you mean 'max_t'? known: time_attr, max_t, "
         "grace_period, reduction_factor"),
        (["scheduler=random", "+scheduler.synch=true"],
         "scheduler.synch: not a random search option; it takes none"),
        (["scheduler=pb2", "+scheduler.resample_probability=0.3"],
         "scheduler.resample_probability: not a PB2 option; known: time_attr, "
         "perturbation_interval, quantile_fraction, log_config, synch"),
        (["scheduler=pb2", "scheduler.quantile_fraction=0.6"],
         "scheduler.quantile_fraction: must be a number in (0, 0.5], got 0.6"),
        (["scheduler=pb2", "scheduler.synch=maybe"], "scheduler.synch: must be true or false"),
        (["scheduler=pb2", "population=1"], "population: PB2 needs at least 2 trials, got 1"),
        (["scheduler=pb2", "mutations=seed"],
         "mutations.hyperparams.lr: scheduler=pb2 needs numeric ranges (Uniform, LogUniform, "
         "RandInt, LogRandInt), got a Grid; use scheduler=pbt for lists and choices"),
        (["scheduler=pb2",
          "+mutations.hyperparams.entropy_coeff={_target_:rl_pbt.distributions.Choice,"
          "values:[0.0,0.01]}"],
         "mutations.hyperparams.entropy_coeff: scheduler=pb2 needs numeric ranges (Uniform, "
         "LogUniform, RandInt, LogRandInt), got a Choice"),
        (["scheduler.name=hyperband"],
         "scheduler.name: unknown 'hyperband'; known: pbt, pb2, asha, random, fifo"),
    ],
)
def test_bad_scheduler_input_is_one_config_error(overrides, message, tmp_path):
    assert message in config_error(overrides, tmp_path)


def test_pb2_without_scikit_learn_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler_options, "PB2_MODULES", {"no_such_module_rl_pbt": "scikit-learn"})
    with pytest.raises(ConfigError) as caught:
        plan_for(["scheduler=pb2"], tmp_path)
    assert str(caught.value) == 'scheduler=pb2 needs scikit-learn: pip install -e ".[pb2]"'


def test_pb2_with_a_broken_scikit_learn_is_one_line(tmp_path, monkeypatch):
    """Installed but failing to import (here: its __init__ raises) was a traceback in Ray's PB2."""
    broken = tmp_path / "pkgs" / "broken_sklearn_rl_pbt"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('numpy.core.multiarray failed')\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    monkeypatch.setattr(scheduler_options, "PB2_MODULES", {broken.name: "scikit-learn"})
    with pytest.raises(ConfigError) as caught:
        plan_for(["scheduler=pb2"], tmp_path)
    assert str(caught.value) == (
        "scheduler=pb2: scikit-learn is installed but does not import (ImportError: "
        "numpy.core.multiarray failed); reinstall it: pip install --force-reinstall scikit-learn")


@pytest.mark.parametrize("name", ["random", "asha"])
def test_random_and_asha_draw_every_mutated_key_even_from_start_config(name, tmp_path):
    """With ``start: config`` fifo keeps algorithm.config's lr; random search draws it."""
    fifo = plan_for(["scheduler=fifo", "mutations.start=config"], tmp_path)
    assert fifo.param_space["lr"] == 3e-4
    plan = plan_for([f"scheduler={name}", "mutations.start=config"], tmp_path)
    for key in plan.mutations:
        assert isinstance(plan.param_space[key], Domain), key


def test_asha_options_reach_the_scheduler(tmp_path):
    plan = plan_for(["scheduler=asha", "stopper.max_iterations=20", "scheduler.grace_period=2",
                     "scheduler.reduction_factor=3"], tmp_path)
    assert plan.scheduler.options == {"time_attr": "training_iteration", "max_t": 20,
                                      "grace_period": 2, "reduction_factor": 3}
    scheduler = build_scheduler(plan)
    assert isinstance(scheduler, RecordingASHA)
    assert (scheduler._max_t, scheduler._metric, scheduler._time_attr) == (
        20, "env_runners/episode_return_mean", "training_iteration")
    assert [rung for rung, _ in scheduler._brackets[0]._rungs] == [18, 6, 2]
    assert scheduler.listeners == [] and scheduler.events == []


def test_random_is_plain_fifo_and_pb2_gets_bounds(tmp_path):
    assert type(build_scheduler(plan_for(["scheduler=random"], tmp_path))) is PlainFIFO
    pb2 = build_scheduler(plan_for(["scheduler=pb2", "scheduler.synch=true"], tmp_path))
    assert isinstance(pb2, RecordingPB2)
    assert pb2._hyperparam_bounds == {"lr": [1e-4, 1e-3], "clip_param": [0.1, 0.3],
                                      "lambda": [0.9, 1.0], "num_epochs": [3, 11]}
    assert pb2._synch is True and pb2._require_attrs is False


# -- PB2's explore step -----------------------------------------------------------------------
MUTATIONS = {"num_epochs": RandInt(1, 3), "lr": LogUniform(1e-4, 1e-3),
             "minibatch_size": LogRandInt(64, 1000), "clip_param": Uniform(0.1, 0.3)}


def test_pb2_bounds_give_integers_one_more_unit():
    assert pb2_bounds(MUTATIONS) == {"num_epochs": [1, 4], "lr": [1e-4, 1e-3],
                                     "minibatch_size": [64, 1001], "clip_param": [0.1, 0.3]}


@pytest.mark.parametrize(
    ("picked", "expected"),
    [
        # What PB2 returned in this file's GP test: the top of each box, in float32.
        ({"num_epochs": 4, "lr": 0.0010000000474974513, "minibatch_size": 1001,
          "clip_param": 0.30000001192092896},
         {"num_epochs": 3, "lr": 1e-3, "minibatch_size": 400, "clip_param": 0.3}),
        # A clone whose integer key held a float: PB2 keeps the float; rounded here.
        ({"num_epochs": 2.6, "lr": np.float32(2.5e-4), "minibatch_size": np.float32(99.4),
          "clip_param": 0.05},
         {"num_epochs": 3, "lr": float(np.float32(2.5e-4)), "minibatch_size": 99,
          "clip_param": 0.1}),
    ],
)
def test_explore_casts_and_clamps_what_pb2_picked(picked, expected):
    config = Explore(MUTATIONS, ppo_invariants)({**picked, "train_batch_size_per_learner": 400})
    assert config == {**expected, "train_batch_size_per_learner": 400}
    for key in ("num_epochs", "minibatch_size", "train_batch_size_per_learner"):
        assert type(config[key]) is int, key
    assert type(config["lr"]) is float


def test_pb2_gp_pick_is_made_valid():
    """Ray's own PB2 step on known data: its pick leaves the box (float32, high + 1) and the
    explore step brings it back, integers as ints."""
    from ray.tune.schedulers.pb2 import _explore

    rows = [[f"t{i}", time, epochs, lr, time * (1 + epochs) * lr * 1000]
            for i, (epochs, lr) in enumerate([(1, 1e-4), (3, 1e-3), (2, 5e-4), (1, 8e-4)])
            for time in (2, 4, 6)]
    data = pd.DataFrame(rows, columns=["Trial", "Time", "num_epochs", "lr", "Reward"])
    table = {"num_epochs": MUTATIONS["num_epochs"], "lr": MUTATIONS["lr"]}
    np.random.seed(0)
    clone = {"num_epochs": 3, "lr": 1e-3, "train_batch_size_per_learner": 400,
             "minibatch_size": 100}
    picked, _ = _explore(data, pb2_bounds(table), None, "t1", "t0", dict(clone))
    config = Explore(table, ppo_invariants)(dict(picked))
    assert type(config["num_epochs"]) is int and 1 <= config["num_epochs"] <= 3
    assert 1e-4 <= config["lr"] <= 1e-3
    assert config["minibatch_size"] == 100


def test_restore_dropped_puts_back_empty_dicts_pb2_flattening_loses():
    original = {"lr": 1e-3, "env_config": {}, "_model_config": {"fcnet_hiddens": [64], "x": {}}}
    new = {"lr": 5e-4, "_model_config": {"fcnet_hiddens": [64]}}
    assert restore_dropped(original, new) == {
        "lr": 5e-4, "env_config": {}, "_model_config": {"fcnet_hiddens": [64], "x": {}}}


# -- compare_schedulers.py on hand-logged runs -------------------------------------------------
def _parent(client, experiment, sweep, job, scheduler, start_ms, end_ms, status="FINISHED"):
    tags = {"rl_pbt.sweep": sweep, "rl_pbt.sweep_job": str(job), "rl_pbt.scheduler": scheduler,
            "rl_pbt.env": "cartpole", "mlflow.runName": "PPO-CartPole-v1"}
    run_id = client.create_run(experiment, start_time=start_ms, tags=tags).info.run_id
    return run_id, lambda: client.set_terminated(run_id, status, end_time=end_ms)


def _child(client, experiment, parent_id, returns):
    """A trial's run with ``episode_return_mean`` at (timestamp ms, value) points."""
    run_id = client.create_run(experiment, tags={"mlflow.parentRunId": parent_id}).info.run_id
    for step, (stamp, value) in enumerate(returns, start=1):
        client.log_metric(run_id, "episode_return_mean", value, timestamp=stamp, step=step)


def _finish(client, run_id, best_return, env_steps, end):
    client.log_metric(run_id, "best_return", best_return)
    client.log_metric(run_id, "best_env_steps", env_steps)
    client.log_dict(run_id, {"metric": "env_runners/episode_return_mean", "mode": "max",
                             "target_return": 450.0}, "summary.json")
    end()


def test_compare_tabulates_the_latest_sweep_from_logged_values(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("rl_pbt", artifact_location=(tmp_path / "a").as_uri())
    old_sweep, sweep = str(tmp_path / "old"), tmp_path / "sweep"
    sweep.mkdir()
    old, end = _parent(client, experiment, old_sweep, 0, "pbt", 100_000, 200_000)
    _finish(client, old, 10.0, 1, end)
    # job 1 (pb2) first: rows come in job order, not creation order
    _, end = _parent(client, experiment, str(sweep), 1, "pb2", 3_000_000, 3_050_000, "KILLED")
    end()
    pbt, end = _parent(client, experiment, str(sweep), 0, "pbt", 1_000_000, 1_100_500)
    _child(client, experiment, pbt, [(1_010_000, 100.0), (1_042_000, 460.0)])
    _child(client, experiment, pbt, [(1_030_000, 300.0), (1_050_000, 470.0)])
    _finish(client, pbt, 470.04, 12345, end)
    rnd, end = _parent(client, experiment, str(sweep), 2, "random", 2_000_000, 2_200_000)
    _child(client, experiment, rnd, [(2_010_000, 300.0), (2_100_000, 449.9)])
    _finish(client, rnd, 449.9, 20000, end)

    table, _, paths = load_compare_script().compare(uri)

    assert table == (
        f"Sweep `{sweep}`\n\n"
        "| job | scheduler | env | best return | time to target, s | env steps (best trial) "
        "| wall time, s | status |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        "| 0 | pbt | cartpole | 470.0 | 42.0 | 12345 | 100.5 | FINISHED |\n"
        "| 1 | pb2 | cartpole | n/a | unknown | n/a | 50.0 | KILLED |\n"
        "| 2 | random | cartpole | 449.9 | not reached | 20000 | 200.0 | FINISHED |\n")
    assert paths == [sweep / "compare_schedulers.md", sweep / "compare_schedulers.csv"]
    assert paths[0].read_text() == table
    csv_lines = paths[1].read_text().splitlines()
    assert csv_lines[0] == ('job,scheduler,env,best return,"time to target, s",'
                            'env steps (best trial),"wall time, s",status')
    assert csv_lines[1:] == ["0,pbt,cartpole,470.0,42.0,12345,100.5,FINISHED",
                             "1,pb2,cartpole,n/a,unknown,n/a,50.0,KILLED",
                             "2,random,cartpole,449.9,not reached,20000,200.0,FINISHED"]
    _, old_rows, old_paths = load_compare_script().compare(uri, old_sweep, tmp_path / "out")
    assert [r["scheduler"] for r in old_rows] == ["pbt"]
    assert old_paths[0] == tmp_path / "out" / "compare_schedulers.md"


def test_compare_without_a_sweep_or_a_store_is_one_line(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlflow.db"
    with pytest.raises(SystemExit) as caught:  # no store: none is made
        load_compare_script().compare(f"sqlite:///{store}")
    assert f"the run's MLflow store {store} is gone" in str(caught.value)
    assert not store.exists()
    MlflowClient(f"sqlite:///{store}").search_experiments()  # a store without a sweep
    with pytest.raises(SystemExit) as caught:
        load_compare_script().compare(f"sqlite:///{store}")
    assert "no run in" in str(caught.value) and "rl_pbt.sweep" in str(caught.value)


# -- tiny runs in the session's Ray -----------------------------------------------------------
#: TINY without PBT's knobs and the population, which each run below sets itself.
BASE = [o for o in TINY if not o.startswith(("scheduler.", "population="))]
RUNS = {
    # synch: every perturbation exploits; PB2 can only pick new values once the clone has two
    # results with the same values, so 8 iterations (perturbations at 2, 4, 6).
    "pb2": ["scheduler=pb2", "population=4", "scheduler.synch=true",
            "scheduler.quantile_fraction=0.5", "scheduler.perturbation_interval=2", "seed=11"],
    "random": ["scheduler=random", "population=3", "stopper.max_iterations=3", "seed=5"],
}


@pytest.fixture(scope="module")
def sweep_runs(ray_session, tmp_path_factory):
    """A pb2 and a random run, tagged as jobs 0 and 1 of one sweep, in one SQLite store."""
    from rl_pbt.run import execute

    out = tmp_path_factory.mktemp("schedulers")
    sweep = out / "sweep"
    uri = f"sqlite:///{out}/mlflow.db"
    runs = {}
    for job, (name, overrides) in enumerate(RUNS.items()):
        cfg = compose_config([*BASE, *overrides, f"tracking.tracking_uri={uri}"])
        plan = resolve(cfg, sweep / str(job), choices={"env": "cartpole", "scheduler": name},
                       launch_dir=out)
        summary = execute(plan, {"rl_pbt.sweep": str(sweep), "rl_pbt.sweep_job": str(job)})
        runs[name] = (plan, summary)
    return uri, sweep, runs


@pytest.mark.slow
def test_random_trials_draw_different_values_and_never_exploit(sweep_runs):
    _, _, runs = sweep_runs
    plan, summary = runs["random"]
    rows = read_jsonl(plan.output_dir / TRIALS_FILE)
    assert len({r["trial_id"] for r in rows}) == 3
    assert summary["exploits"] == 0 and not read_jsonl(plan.output_dir / EXPLOITS_FILE)
    first = {}
    for row in rows:  # each trial keeps its draw
        assert first.setdefault(row["trial_id"], row["hyperparameters"]) == row["hyperparameters"]
    for key in plan.mutations:
        if key != "num_epochs":  # 3 draws of an int in [1, 3] may repeat
            assert len({h[key] for h in first.values()}) == 3, key


def _clone_values(rows, event):
    """The hyperparameters the cloned trial trained with up to its checkpoint."""
    before = [r for r in rows if r["trial_id"] == event["source_id"]
              and r["training_iteration"] == event["source_iteration"]
              and r["recorded_at"] <= event["wall_time"]]
    return before[-1]["hyperparameters"]


@pytest.mark.slow
def test_pb2_exploits_change_values_and_keep_integers(sweep_runs):
    from mlflow.tracking import MlflowClient

    uri, _, runs = sweep_runs
    plan, summary = runs["pb2"]
    events = read_jsonl(plan.output_dir / EXPLOITS_FILE)
    rows = read_jsonl(plan.output_dir / TRIALS_FILE)
    assert summary["exploits"] == len(events) >= 1
    # At the first perturbation no clone has two results with the same values: PB2 copies.
    # From the second on every clone has (a copy's starting row counts, see
    # record_copied_start), and PB2's Gaussian process picks new values.
    later = [e for e in events if e["iteration"] > 2]
    assert later and all(e["new"] != _clone_values(rows, e) for e in later), later
    for event in events:
        assert type(event["new"]["num_epochs"]) is int and 1 <= event["new"]["num_epochs"] <= 3
        for key, dist in plan.mutations.items():
            assert dist.low <= event["new"][key] <= dist.high, key
    for row in rows:
        assert type(row["hyperparameters"]["num_epochs"]) is int
    client = MlflowClient(uri)
    parent_id = summary["tracking"]["parent_run_id"]
    children = child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)
    tags = [k for c in children for k in c.data.tags if k.startswith("rl_pbt.exploit.")]
    assert len(tags) == len(events)  # the MLflow listener heard every exploit


@pytest.mark.slow
def test_compare_script_on_the_tiny_sweep(sweep_runs):
    uri, sweep, runs = sweep_runs
    table, rows, paths = load_compare_script().compare(uri)
    assert [(r["job"], r["scheduler"], r["env"]) for r in rows] == [
        ("0", "pb2", "cartpole"), ("1", "random", "cartpole")]
    for row, (_, summary) in zip(rows, runs.values(), strict=True):
        assert row["best return"] == f"{summary['best']['return']:.1f}"
        assert row["env steps (best trial)"] == str(round(summary["best"]["env_steps"]))
        assert row["wall time, s"] == f"{summary['wall_time_s']:.1f}"  # what the run printed
        assert row["time to target, s"] == "not reached" or float(row["time to target, s"]) > 0
    assert paths[0].parent == sweep and paths[0].read_text() == table


def test_the_exploit_names_the_iteration_of_the_checkpoint_it_copies():
    """A paused clone is copied from its newest checkpoint, which after a resume is newer than
    the last result the fresh scheduler saw; a running clone saves at its current result."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from rl_pbt.schedulers import source_checkpoint_iteration

    newest = SimpleNamespace(checkpoint=object(), metrics={"training_iteration": 7})
    paused = SimpleNamespace(status=Trial.PAUSED, is_saving=False, latest_checkpoint_result=newest)
    running = SimpleNamespace(status=Trial.RUNNING, is_saving=True, latest_checkpoint_result=newest)
    assert source_checkpoint_iteration(paused, {"training_iteration": 6}) == 7
    assert source_checkpoint_iteration(running, {"training_iteration": 6}) == 6


class NamedTrial:
    """What PB2's explore step reads of a trial: its name (``str``) and its config."""

    def __init__(self, name: str, lr: float) -> None:
        self.name, self.config = name, {"lr": lr}

    def __str__(self) -> str:
        return self.name


def test_pb2_explores_from_a_clone_that_was_itself_a_copy():
    """A trial that copied its clone's values at one perturbation is explored from at the next
    (Ray's PB2 alone keeps copying it: no row marks where the copy started)."""
    mutations = {"lr": LogUniform(1e-4, 1e-3)}
    pb2 = RecordingPB2(time_attr="training_iteration", metric="score", mode="max",
                       perturbation_interval=2, hyperparam_bounds=pb2_bounds(mutations),
                       custom_explore_fn=Explore(mutations, lambda config: config))
    a, b = NamedTrial("a", 5e-4), NamedTrial("b", 2e-4)
    pb2.data = pd.DataFrame({"Trial": ["a", "b"], "Time": [2, 2], "lr": [5e-4, 2e-4],
                             "Reward": [10.0, 5.0]})
    copied, _ = pb2._get_new_config(b, a)  # a has one result: nothing to learn from, a copy
    assert copied == {"lr": 5e-4}
    b.config = copied
    later = pd.DataFrame({"Trial": ["a", "b"], "Time": [4, 4], "lr": [5e-4, 5e-4],
                          "Reward": [12.0, 30.0]})
    pb2.data = pd.concat([pb2.data, later]).reset_index(drop=True)
    picked, _ = pb2._get_new_config(a, b)  # b gained 20 over 2 iterations with 5e-4
    assert picked["lr"] != 5e-4 and 1e-4 <= picked["lr"] <= 1e-3


def test_asha_tells_which_trials_it_stopped_early_and_not_those_at_the_cap():
    """Tune ends a trial ASHA stops as it ends one at its cap; the stop listeners tell them
    apart (the summary, the console and MLflow say which trials ASHA cut)."""
    from types import SimpleNamespace as NS

    from rl_pbt.schedulers import EarlyStop

    scheduler = RecordingASHA(metric="m", mode="max", time_attr="training_iteration",
                              max_t=2, grace_period=1, reduction_factor=2)
    heard = []
    scheduler.stop_listeners.append(heard.append)
    a, b, c = (NS(trial_id=name) for name in "abc")
    for trial in (a, b, c):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, a, {"training_iteration": 1, "m": 10.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, b, {"training_iteration": 1, "m": 5.0}) == "STOP"
    assert scheduler.on_trial_result(None, a, {"training_iteration": 2, "m": 12.0}) == "STOP"
    assert heard == [EarlyStop("b", 1, 5.0)]

"""Config -> Plan: every option of every group resolves; the guide's setup; bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config, config_error
from ray.tune.search.sample import Categorical, Domain

from rl_pbt.cli import group_options
from rl_pbt.distributions import Grid, RandInt, Uniform
from rl_pbt.resolve import GROUPS, resolve

#: Options that need a value from the user (``???``), with one that works.
NEEDS = {
    ("env", "gym"): ["env.id=MountainCar-v0", "env.target_return=-110"],
    ("env", "entry_point"): [
        "env.entry_point=gymnasium.envs.classic_control.cartpole:CartPoleEnv",
        "env.target_return=400",
    ],
    # Outside an AzureML job there is no MLFLOW_TRACKING_URI; an explicit URI stands in for it.
    ("tracking", "azureml"): ["tracking.tracking_uri=http://127.0.0.1:5000"],
}
GROUP_OPTIONS = [(g, o) for g in (*GROUPS, "experiment") for o in group_options(g)]


def plan_for(overrides: list[str], tmp_path: Path):
    return resolve(compose_config(overrides), tmp_path, launch_dir=tmp_path)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_option_composes_and_resolves(group, option, tmp_path):
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    plan = plan_for(overrides, tmp_path)
    assert plan.mutations
    for key in plan.mutations:
        assert key in plan.param_space
    assert plan.param_space["env"] == plan.env.rllib_name
    assert plan.initial_config["env"] == plan.env.rllib_name


def test_every_group_has_options():
    for group in (*GROUPS, "experiment"):
        assert group_options(group), group


def test_guide_setup_resolves_to_the_guides_values(tmp_path):
    plan = plan_for(["experiment=seed"], tmp_path)
    m = plan.mutations
    assert m["lambda"] == Uniform(0.9, 1.0)
    assert m["clip_param"] == Uniform(0.01, 0.5)
    assert isinstance(m["lr"], Grid) and list(m["lr"].values) == [1e-3, 5e-4, 1e-4, 5e-5, 1e-5]
    assert m["num_epochs"] == RandInt(1, 30)
    assert m["minibatch_size"] == RandInt(128, 16384)
    assert m["train_batch_size_per_learner"] == RandInt(2000, 160000)
    space = plan.param_space
    assert (space["kl_coeff"], space["lambda"], space["clip_param"], space["lr"]) == (
        1.0, 0.95, 0.2, 1e-4)
    for key, values in (("num_epochs", [10, 20, 30]), ("minibatch_size", [128, 512, 2048]),
                        ("train_batch_size_per_learner", [10000, 20000, 40000])):
        assert isinstance(space[key], Categorical) and space[key].categories == values
    assert space["num_env_runners"] == 4
    assert space["num_cpus_for_main_process"] == 1
    assert space["num_gpus_per_learner"] == 0
    assert "free_log_std" not in space["_model_config"]  # CartPole: discrete actions
    options = plan.scheduler.options
    assert options["time_attr"] == "time_total_s"
    assert options["perturbation_interval"] == 120
    assert options["resample_probability"] == 0.25
    assert (plan.stop.max_iterations, plan.stop.target_return) == (100, 300)
    assert plan.stop.stop_all_at_target is False  # the guide's rule is per trial


def test_guide_setup_on_a_continuous_env_sets_free_log_std(tmp_path):
    plan = plan_for(["experiment=seed", "env=pendulum"], tmp_path)
    assert plan.param_space["_model_config"]["free_log_std"] is True
    assert plan.env.continuous_actions


@pytest.mark.parametrize(("overrides", "expected"), [
    (["env=cartpole"], False),  # discrete: nothing to unsquash, so no per-step copy
    (["env=pendulum"], None),  # continuous: RLlib's default (unsquash into the Box)
    (["env=cartpole", "+algorithm.config.normalize_actions=true"], True),  # the user's wins
])
def test_normalize_actions_is_off_only_for_discrete_actions(overrides, expected, tmp_path):
    assert plan_for(overrides, tmp_path).param_space.get("normalize_actions") is expected


def test_start_sample_draws_initial_values_from_the_mutations(tmp_path):
    plan = plan_for(["mutations=narrow"], tmp_path)
    assert isinstance(plan.param_space["lr"], Domain)
    assert 1e-4 <= plan.initial_config["lr"] <= 1e-3


def test_old_names_in_overrides_are_translated(tmp_path):
    plan = plan_for(["+algorithm.config.num_sgd_iter=7", "~algorithm.config.num_epochs",
                     "mutations=seed"], tmp_path)
    assert plan.param_space["num_epochs"] == 7


def test_relative_sqlite_uri_is_anchored_at_the_launch_dir(tmp_path):
    plan = plan_for([], tmp_path)
    assert plan.tracking.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env.id=NoSuchEnv-v0"], "env.id: unknown gymnasium id 'NoSuchEnv-v0'"),
        (["+algorithm.config.clip_parm=0.3"], "did you mean 'clip_param'"),
        (["mutations.hyperparams.clip_param.low=0.6"],
         "mutations.hyperparams.clip_param: Uniform: low=0.6 is greater than high=0.3"),
        (["mutations.hyperparams.lr.low=0"],
         "mutations.hyperparams.lr: LogUniform: log scale needs low > 0"),
        (["mutations=seed", "mutations.hyperparams.lr=[]"],
         "mutations.hyperparams.lr: Grid: values is empty"),
        (["algorithm.config.minibatch_size=5000"],
         "minibatch_size: smallest value 5000 is larger than the largest "
         "train_batch_size_per_learner 2000"),
        (["population=1"], "population: PBT needs at least 2 trials, got 1"),
        (["algorithm.config.gamma=2"],
         "algorithm.config.gamma: a value can be 2; PPO needs 0 <= gamma <= 1"),
        (["algorithm.config.lr=-1"],  # even unused (mutations draw lr): named where it is set
         "algorithm.config.lr or mutations.hyperparams.lr: a value can be -1; PPO needs lr > 0"),
        (["mutations.hyperparams.clip_param.low=0"], "algorithm.config.clip_param or "
         "mutations.hyperparams.clip_param: a value can be 0; PPO needs clip_param > 0"),
        (["scheduler.quantile_fraction=0.7"], "scheduler.quantile_fraction: must be a number"),
        (["env=gym"], "env.id: no value given"),
        (["env=pendulum", "env.model_config.free_log_std=true", "env.id=CartPole-v1"],
         "free_log_std: only for continuous"),
        (["env=entry_point", "env.entry_point=no.such:Env", "env.target_return=1"],
         "env.entry_point: cannot import 'no.such:Env'"),
        (["env=entry_point", "env.entry_point=garbage", "env.target_return=1"],
         "env.entry_point: cannot import 'garbage': Empty module name; give "
         "package.module:ClassName"),
        (["mutations.hyperparams.lr.low=abc"],
         "mutations.hyperparams.lr: LogUniform: low must be a finite number, got 'abc'"),
        (["+mutations.hyperparams.lr.bogus=1"],
         "mutations.hyperparams.lr: rl_pbt.distributions.LogUniform: LogUniform.__init__() got "
         "an unexpected keyword argument 'bogus'; it takes low, high"),
        (["mutations.hyperparams.lr._target_=os.system"],
         "mutations.hyperparams.lr: _target_: cannot call 'os.system' (Hydra never calls it); "
         "give one of rl_pbt.distributions.Uniform"),
        (["mutations.hyperparams.lr._target_=rl_pbt.distributions.Nope"],
         "_target_: cannot call 'rl_pbt.distributions.Nope' (no such class or function)"),
        (["tracking.backend=wandb"], "tracking.backend: unknown 'wandb'"),
        (["tracking.experiment_name=[1]"], "tracking.experiment_name: must be a string, got [1]"),
        (["tracking.tracking_uri={a:1}"], "tracking.tracking_uri: must be a string"),
        (["+scheduler.perturbation_intervall=3"],
         "scheduler.perturbation_intervall: not a PBT option; "
         "did you mean 'perturbation_interval'"),
        (["scheduler.time_attr=time_totl_s"], "scheduler.time_attr: unknown 'time_totl_s'"),
        (["scheduler.synch=maybe"], "scheduler.synch: must be true or false"),
        (["scheduler.perturbation_factors=[-1,0]"],
         "scheduler.perturbation_factors: a list of numbers > 0 such as [1.2, 0.8], got [-1, 0]"),
        (["seed=abc"], "seed: must be an integer >= 0, got 'abc'"),
        (["metric=foo"], "metric: 'foo' is not a key of RLlib's results; RLlib reports returns "
                         "as env_runners/episode_return_mean"),
        (["metric=episode_reward_mean"], "metric: 'episode_reward_mean' is Ray 2.3's name; "
                                         "today's RLlib reports env_runners/episode_return_mean"),
        (["metric=env_runners/episode_reward_mean"],
         "did you mean 'env_runners/episode_return_mean'?"),
        (["metric=env_runners/episode_retrun_mean"],
         "metric: 'env_runners/episode_retrun_mean' is not a key RLlib's env runners report; "
         "did you mean 'env_runners/episode_return_mean'"),
        (["metric=env_runners/episode_return_avg"], "did you mean 'env_runners/episode_return_"),
        (["stopper.max_iterations=null", "stopper.target_return=null"],
         "stopper: no stop rule (max_iterations, target_return, max_env_steps, max_seconds are "
         "all null), the trials would train forever; set one, e.g. stopper.max_iterations=50"),
        (["stopper.max_iterations=2.5"],
         "stopper.max_iterations: must be an integer >= 1 or null, got 2.5"),
        (["metric=env_runners/episode_len_mean", "mode=min"],
         "stopper.target_return: 450 is the env's return target, but "
         "metric=env_runners/episode_len_mean is not a return; set stopper.target_return for "
         "that metric, or stopper.target_return=null"),
        (["metric=evaluation/env_runners/episode_return_mean"],
         "metric: 'evaluation/env_runners/episode_return_mean' is reported only when RLlib "
         "evaluates; add +algorithm.config.evaluation_interval=N"),
        (["metric=env_runner/episode_return_mean"],
         "metric: 'env_runner/episode_return_mean': RLlib's results have no 'env_runner'; did "
         "you mean 'env_runners/episode_return_mean'?"),
        (["tensorboard=maybe"], "tensorboard: must be true or false, got 'maybe'"),
        (["sampler=fast"], "sampler: must be one of batched, rllib, got 'fast'"),
        (["learner=fast"], "learner: must be one of lean, rllib, got 'fast'"),
        (["max_failures=1.5"], "max_failures: must be an integer >= 0"),
        (["algorithm.config._model_config.fcnet_hiddens=abc"],
         "algorithm.config._model_config.fcnet_hiddens: must be a list of layer widths "
         "(integers >= 1) such as [64, 64], got 'abc'"),
        (["algorithm.config._model_config.fcnet_hiddens=[0]"], "got [0]"),
        (["env=gym", "env.id=FrozenLake-v1", "env.target_return=1"],
         "env: FrozenLake-v1 observes Discrete(16); RLlib's default model reads Box "
         "observations only"),
        (["env=gym", "env.id=LunarLander-v3", "env.target_return=200"],
         "env: cannot build LunarLander-v3"),
        (["+env.env_config.no_such_arg=1"], "env: cannot build CartPole-v1"),
        (["mutations=wide", "mutations.hyperparams.train_batch_size_per_learner.low=500"],
         "minibatch_size: a first draw can be 1000, above the smallest first "
         "train_batch_size_per_learner 500"),
        # A value of another kind than RLlib's default for its key: every trial would fail.
        (["algorithm.config.gamma=abc"], "algorithm.config.gamma: must be a number, got 'abc'"),
        (["+algorithm.config.explore=5"], "algorithm.config.explore: must be true or false"),
        (["resources.config.num_envs_per_env_runner=many"],
         "resources.config.num_envs_per_env_runner: must be a number, got 'many'"),
        (["algorithm.config.lr=[1,2]"],
         "algorithm.config.lr: must be a number or a schedule [[0, value], [timestep, value]"),
        (["algorithm.config.lr=[[0,0.001],[1000,0.0001]]", "mutations.start=config"],
         "algorithm.config.lr: a schedule, but mutations.hyperparams.lr mutates lr"),
        (["algorithm.config.num_epochs=0", "mutations.start=config"],
         "algorithm.config.num_epochs: must be a count >= 1, got 0"),
        (["resources.config.num_env_runners=-1"],
         "resources.config.num_env_runners: must be a count >= 0, got -1"),
        (["mutations.hyperparams.num_epochs.low=0"],
         "mutations.hyperparams.num_epochs: a first value can be 0; RLlib needs >= 1"),
    ],
)
def test_bad_input_is_one_config_error(overrides, message, tmp_path):
    assert message in config_error(overrides, tmp_path)


def test_stopper_rule():
    from rl_pbt.plan import StopRule
    from rl_pbt.stopping import PlanStopper

    rule = StopRule("env_runners/episode_return_mean", "max", 10, 450.0, 5000, None, True)
    stopper = PlanStopper(rule)
    assert not stopper("t", {"training_iteration": 3, "env_runners": {"episode_return_mean": 200}})
    assert not stopper.stop_all()
    assert stopper("t", {"training_iteration": 10})
    assert stopper("t", {"training_iteration": 1,
                         "env_runners": {"num_env_steps_sampled_lifetime": 5000}})
    assert not stopper("t", {"training_iteration": 1,
                             "env_runners": {"episode_return_mean": float("nan")}})
    assert not stopper.stop_all()
    assert stopper("t", {"training_iteration": 4, "env_runners": {"episode_return_mean": 451}})
    assert stopper.stop_all()


def test_after_the_wall_time_budget_running_trials_end_on_their_next_result():
    """Tune's stop-all skips the end-of-run checkpoint: the trials running when the budget
    ran out are stopped on their next result (which Tune saves); then everything stops."""
    from types import SimpleNamespace as NS

    from rl_pbt.plan import StopRule
    from rl_pbt.stopping import PlanStopper

    stopper = PlanStopper(StopRule("m", "max", 50, None, None, 0.0, True))
    trials = [NS(trial_id="a", status="RUNNING"), NS(trial_id="b", status="RUNNING"),
              NS(trial_id="c", status="PAUSED")]
    stopper.running.on_step_begin(0, trials)
    assert not stopper.stop_all()  # a and b are in the middle of an iteration
    assert stopper("a", {"training_iteration": 7, "time_this_iter_s": 0.4})
    trials[0].status = "TERMINATED"  # saved and stopped
    trials[2].status = "RUNNING"  # c resumed into a's place: not waited for
    stopper.running.on_step_begin(1, trials)
    assert not stopper.stop_all()
    assert not stopper.may_start()  # the schedulers start no waiting trial now
    trials[1].status = "TERMINATED"
    stopper.running.on_step_begin(2, trials)
    assert stopper.stop_all()
    assert stopper.grace_s == 10.8


def test_no_trial_starts_while_the_run_winds_down(monkeypatch):
    from ray.tune.schedulers import FIFOScheduler

    from rl_pbt.schedulers import PlainFIFO

    scheduler, chosen = PlainFIFO(), []
    monkeypatch.setattr(FIFOScheduler, "choose_trial_to_run",
                        lambda self, tc: chosen.append(tc) or "trial")
    assert scheduler.choose_trial_to_run("controller") == "trial"
    scheduler.may_start = lambda: False
    assert scheduler.choose_trial_to_run("controller") is None
    assert chosen == ["controller"]


@pytest.mark.parametrize(("overrides", "cpus", "line"), [
    ([], 1, "1 CPU per trial x 4 trials = 4 CPUs wanted; the cluster has 2. 2 trials train at "
            "once; the other 2 take turns"),
    (["experiment=seed"], 5, None),  # the guide's 4 env runners + 1 CPU
    (["resources=rllib_defaults"], 2, "2 CPUs per trial x 4 trials = 8 CPUs wanted; the cluster "
                                      "has 2. 1 trial trains at once; the other 3 take turns"),
])
def test_trial_resources_and_the_concurrency_report(overrides, cpus, line, tmp_path):
    from rl_pbt.cluster import Concurrency, trial_resources

    plan = plan_for(overrides, tmp_path)
    trial = trial_resources(plan)
    assert trial.cpus == cpus
    if line:
        fit = Concurrency(trial, 2, 0, plan.population, min(plan.population, int(2 // cpus)))
        assert line in fit.report()


@pytest.mark.parametrize("overrides", [
    ["+algorithm.config.rollout_fragment_length=auto", "+algorithm.config.grad_clip=0.5",
     "algorithm.config.num_epochs=null", "+algorithm.config.use_kl_loss=false"],
    ["+algorithm.config.entropy_coeff=[[0,0.01],[1000,0.0]]", "mutations.start=config"],
    ["+algorithm.config.merge_env_runner_states=true", "+algorithm.config.explore=null"],
])
def test_values_of_the_kinds_rllib_takes_pass(overrides, tmp_path):
    """Counts take ``auto`` or null, a null default takes a number, entropy_coeff a schedule,
    a string key true (RLlib's ``merge_env_runner_states``)."""
    from rl_pbt.cluster import trial_resources

    assert trial_resources(plan_for(overrides, tmp_path)).cpus == 1


def test_rllibs_own_checks_fail_as_a_config_error(tmp_path):
    """RLlib's ``validate()`` (run for the trial's resource request) rejects a schedule that
    does not start at 0: one ConfigError naming RLlib's reason."""
    from rl_pbt.cluster import trial_resources
    from rl_pbt.errors import ConfigError

    plan = plan_for(["+algorithm.config.entropy_coeff=[[5,0.01],[1000,0.0]]",
                     "mutations.start=config"], tmp_path)
    with pytest.raises(ConfigError) as caught:
        trial_resources(plan)
    assert str(caught.value).startswith(
        "algorithm.config: RLlib rejects the first trial's config: When providing a "
        "`entropy_coeff` schedule, the first timestep must be 0")


@pytest.mark.parametrize("value", ["0", "-2", "true", "'2'", "1.5"])
def test_num_cpus_must_be_a_count(value, tmp_path):
    message = config_error([f"resources.num_cpus={value}"], tmp_path)
    assert message.startswith("resources.num_cpus: must be an integer >= 1 or null")


@pytest.mark.parametrize("metric", [
    "env_runners/episode_return_mean", "env_runners/episode_duration_sec_mean",
    "evaluation/env_runners/episode_return_mean", "learners/default_policy/total_loss",
    "env_runners/episode_len_min", "perf/cpu_util_percent",
    "time_this_iter_s", "iterations_since_restore", "num_training_step_calls_per_iteration"])
def test_result_keys_rllib_reports_pass_the_metric_check(metric):
    """Keys of a real PPO result (Ray 2.60) are not refused."""
    from rl_pbt.metrics import check_metric

    assert check_metric(metric) == metric


@pytest.mark.parametrize(("uri", "file_store"), [
    ("mlruns", True), ("./mlruns", True), ("file:///tmp/mlruns", True), ("sqlite:///x.db", False),
    ("http://127.0.0.1:5000", False), ("databricks", False), ("databricks-uc", False),
    ("postgresql://user@host/db", False)])
def test_file_store_uris_are_told_apart(uri, file_store, monkeypatch):
    from rl_pbt.resolve import _file_store

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert _file_store(uri) is file_store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's opt-out: its choice
    assert _file_store(uri) is False


def test_pbt_that_cannot_perturb_before_the_cap_is_a_warning(tmp_path, caplog):
    """perturbation_interval (or burn_in_period) at or past max_iterations: random search
    under PBT's name; a smoke test may mean it, so the run goes on, with a warning."""
    plan_for(["stopper.max_iterations=5"], tmp_path)
    assert "PBT cannot exploit" not in caplog.text
    plan_for(["stopper.max_iterations=4"], tmp_path)  # the cap stops the trial first
    assert ("scheduler.perturbation_interval=4 is not below stopper.max_iterations=4: PBT "
            "cannot exploit in this run") in caplog.text


def test_fifo_trains_the_configured_values_not_draws(tmp_path):
    """'fifo: each trial keeps its configured values' (README); with mutations.start=sample it
    drew them, as random search does."""
    plan = plan_for(["scheduler=fifo", "algorithm.config.lr=0.002",
                    "algorithm.config.num_epochs=2"], tmp_path)
    assert (plan.param_space["lr"], plan.param_space["num_epochs"]) == (0.002, 2)
    assert not isinstance(plan_for(["scheduler=random"], tmp_path).param_space["lr"], float)


def test_a_start_value_outside_its_mutation_range_is_a_warning(tmp_path, caplog):
    """mutations.start=config with lr=0.01 and a [1e-4, 1e-3] range trained at 0.01 without a
    word; fifo (no perturbation) may train any value. A warning: mutations=wide starts its
    log-scale entropy_coeff from the config's 0 on purpose."""
    overrides = ["mutations.start=config", "algorithm.config.lr=0.01"]
    assert plan_for(overrides, tmp_path).param_space["lr"] == 0.01
    assert ("algorithm.config.lr=0.01 is outside mutations.hyperparams.lr [0.0001, 0.001]: "
            "trials start there") in caplog.text
    caplog.clear()
    assert plan_for([*overrides, "scheduler=fifo"], tmp_path).param_space["lr"] == 0.01
    assert "outside" not in caplog.text
    plan_for(["mutations=wide", "mutations.start=config"], tmp_path)

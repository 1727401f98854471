"""The command line: help, --cfg job, and one clear line for each kind of bad input."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from conftest import TINY, run_cli

from rl_pbt.cli import check_override_keys
from rl_pbt.resolve import GROUPS

BAD_INPUT = [
    (["env.id=NoSuchEnv-v0"], "env.id: unknown gymnasium id 'NoSuchEnv-v0'"),
    (["env=cartpol"], "env=cartpol: no such option; did you mean 'cartpole'?"),
    (["mutations=wid"], "mutations=wid: no such option; did you mean 'wide'?"),
    (["+algorithm.config.num_sgd_iterations=3"],
     "did you mean 'num_epochs' (Ray 2.3 called it 'num_sgd_iter')?"),
    (["+algorithm.config.clip_parm=0.3"], "did you mean 'clip_param'"),
    (["mutations.hyperparams.clip_param.low=0.9"], "low=0.9 is greater than high=0.3"),
    (["mutations.hyperparams.lr.low=0"], "log scale needs low > 0"),
    (["mutations=seed", "mutations.hyperparams.lr=[]"], "values is empty"),
    (["algorithm.config.minibatch_size=4096"], "is larger than the largest"),
    (["population=1"], "population: PBT needs at least 2 trials, got 1"),
    (["checkpoint.frequncy=2"], "checkpoint.frequncy: no such key in the config; did you mean "
                                "'frequency'?"),
    (["scheduler=random", "scheduler.perturbation_interval=2"],
     "scheduler.perturbation_interval: no such key in scheduler=random; it has name"),
    (["-m", "scheduler=pbt,random", "scheduler.perturbation_interval=2"],
     "no such key in scheduler=random; scheduler=pbt has it: sweep scheduler=random separately"),
    (["algorithm.config.gamma=abc"], "algorithm.config.gamma: must be a number, got 'abc'"),
    (["stopper.stop_all_at_target=maybe"],
     "stopper.stop_all_at_target: must be true or false, got 'maybe'"),
    (["mutations.hyperparams.clip_param=[0.1,0.2]"], "mutations.hyperparams.clip_param: a "
     "mapping in mutations=narrow, not a list; to replace it with a list: "
     "~mutations.hyperparams.clip_param +mutations.hyperparams.clip_param=[0.1,0.2]"),
    (["-m", "env=cartpole,acrobot", "--cfg", "job"],
     "--cfg shows one job's config; drop -m and give one value per key"),
    (["resume="], "resume: no folder given; resume=RUN_DIR continues the run in RUN_DIR"),
    (["tracking.tracking_uri=mlruns"], "tracking.tracking_uri: 'mlruns' is a folder for MLflow's "
     "file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; give "
     "sqlite:///PATH.db"),
    # A key RLlib takes that the YAML does not list: Hydra adds it only with '+'.
    (["algorithm.config.torch_compile_learner=true"], "algorithm.config.torch_compile_learner: "
     "no such key in algorithm=ppo (a key it lacks is added with "
     "+algorithm.config.torch_compile_learner=true); did you mean"),
    (["env.env_config.size=3"], "env.env_config.size: no such key in env=cartpole (a key it "
     "lacks is added with +env.env_config.size=3); it has no keys"),
    # A later job of a sweep: every job is checked before the first trains.
    (["-m", "algorithm.config.gamma=0.99,abc", "stopper.max_iterations=2"],
     "job 1 (algorithm.config.gamma=abc stopper.max_iterations=2): algorithm.config.gamma: "
     "must be a number"),
    (["+algorithm.config.entropy_coeff=[[5,0.01],[1000,0.0]]", "mutations.start=config"],
     "algorithm.config: RLlib rejects the first trial's config: When providing a "
     "`entropy_coeff` schedule"),
]

#: Overrides the README and the tests use: the key check before Hydra lets them all through.
GOOD_OVERRIDES = [
    [*TINY, "scheduler=pb2"], ["stopper=wall_time", "stopper.max_seconds=45"],
    ["stopper=env_steps", "stopper.max_env_steps=1000"], ["tracking.tracking_uri=sqlite:///x"],
    ["resources=cluster", "resources.address=127.0.0.1:6379"], ["env=pendulum", "mutations=wide"],
    ["algorithm.config._model_config.fcnet_hiddens=[32]", "checkpoint.frequency=2", "seed=5"],
    ["experiment=seed", "stopper.max_iterations=3"], ["hydra.run.dir=/tmp/x", "resume=/tmp/x"],
    ["+env.env_config.size=3", "mutations=seed", "mutations.hyperparams.lr=[0.1]"],
    ["~mutations.hyperparams.clip_param", "+mutations.hyperparams.clip_param=[0.1,0.2]"],
    # Picks only Hydra reads: left to Hydra.
    ["-m", "scheduler=choice(asha)", "scheduler.grace_period=8"],
    ["-m", "mutations=glob(wide)", "mutations.hyperparams.entropy_coeff.high=0.05"],
    ["--config-name=other", "some.key=1"], ["+env@other=pendulum", "other.id=Pendulum-v1"],
]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_one_line_error(proc, message):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rl_pbt: error:")]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    # Ray, started beside the config checks, logs nothing of its start when it is not used.
    others = proc.stderr.replace(lines[0], "")
    assert not re.search(r"\bray\b|SIGTERM|token", others, re.IGNORECASE), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    proc = run_cli(args, cwd=tmp_path, timeout=180)
    _assert_one_line_error(proc, message)
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "outputs").exists()
    assert not (tmp_path / "multirun").exists()


def test_a_new_run_in_an_old_run_folder_is_refused_before_hydra_writes(tmp_path):
    """hydra.run.dir at a finished run merged the two runs' records, and the summary reported
    the old run's trials as the new run's; Hydra also wrote its .hydra/ over the old one's."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text("{}")
    proc = run_cli([f"hydra.run.dir={old}", "population=2"], cwd=tmp_path, timeout=120)
    _assert_one_line_error(proc, f"hydra.run.dir: {old} already holds a run (run.json); pick a "
                                 f"new folder, or resume={old} to continue that run")
    assert sorted(p.name for p in old.iterdir()) == ["run.json"]


def test_an_option_from_another_config_folder_is_left_to_hydra(tmp_path):
    """The README's best_experiment.yaml workflow: --config-dir DIR experiment=best (the
    option is in DIR, not in conf/); the run's command keeps the folder."""
    from rl_pbt.cli import check_group_options
    from rl_pbt.run import _config_dir_args

    check_group_options(["--config-dir", str(tmp_path), "experiment=best"])  # exits if refused
    assert _config_dir_args(["--config-dir", str(tmp_path), "experiment=best", "seed=1"]) == [
        "--config-dir", str(tmp_path)]
    assert _config_dir_args(["-cd=conf2", "experiment=best"]) == [
        f"-cd={Path('conf2').resolve()}"]


@pytest.mark.parametrize("args", GOOD_OVERRIDES)
def test_known_keys_pass_the_key_check(args):
    check_override_keys(args)  # exits on a key it does not know


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc = run_cli([f"tracking.tracking_uri={uri}"], cwd=tmp_path, timeout=180)
    _assert_one_line_error(proc, f"tracking.tracking_uri: cannot reach MLflow at {uri}")
    assert "Concurrency" not in proc.stdout  # Ray was never taken over for the run


def test_a_store_mlflow_cannot_open_fails_before_training(tmp_path):
    """MLflow's own failure to open the store was a traceback after Hydra made the run
    folder; it is one line, and the file is left as it was."""
    (tmp_path / "notadb.db").write_text("not a database\n" * 20)
    proc = run_cli(["tracking.tracking_uri=sqlite:///notadb.db", *TINY], cwd=tmp_path,
                   timeout=180)
    _assert_one_line_error(proc, f"tracking.tracking_uri: MLflow cannot open sqlite:///"
                                 f"{tmp_path}/notadb.db: (sqlite3.DatabaseError) file is not a "
                                 "database")
    assert (tmp_path / "notadb.db").read_text() == "not a database\n" * 20
    assert not (tmp_path / "outputs").exists()


def test_help_lists_groups_and_options(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    for group in GROUPS:
        assert f"{group}: " in proc.stdout, group
    assert "cartpole, entry_point, gym, mountaincar_continuous, pendulum" in proc.stdout
    assert "narrow, seed, wide" in proc.stdout


def test_cfg_job_shows_the_guides_setup(tmp_path):
    proc = run_cli(["experiment=seed", "--cfg", "job"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("time_attr: time_total_s", "perturbation_interval: 120",
                 "resample_probability: 0.25", "num_env_runners: 4", "kl_coeff: 1.0",
                 "- 0.001", "high: 160000", "max_iterations: 100", "target_return: 300"):
        assert text in proc.stdout, text


#: (logger, a message rl_pbt drops, another message of that logger that still shows)
KNOWN_NOISE = [
    ("ray.tune.schedulers.pbt",
     "Cannot find metric env_runners/episode_return_mean in trial result {...}",
     "another PBT warning"),
    ("ray.rllib.algorithms.algorithm_config",
     "You are running PPO on the new API stack! This is the new default ...",
     "another config warning"),
    ("ray._common.deprecation",
     "DeprecationWarning: `RLModule(config=[RLModuleConfig object])` has been deprecated.",
     "another deprecation"),
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...",
     "Token authentication is disabled for this Ray cluster. Anyone with network access ..."),
    ("ray.tune.tune",
     "Experiment has been interrupted, but the most recent state was saved.\n"
     "Resume experiment with: Tuner.restore(path=\"/x/tune\", trainable=...)",
     "Total run time: 3.00 seconds (2.50 seconds for the tuning loop)."),
    ("ray.tune.analysis.experiment_analysis",
     "Failed to fetch metrics for 1 trial(s):\n- PPO_x_00002: FileNotFoundError(...)",
     "another experiment analysis warning"),
]


def test_pbts_num_to_keep_warning_is_handled_and_other_warnings_show():
    """rl_pbt copies every handed-over checkpoint, so PBT's advice to raise num_to_keep is
    dropped inside the run's fit; other warnings, and the same one outside, still show."""
    import warnings

    from rl_pbt.run import tune_settings

    text = "Using `CheckpointConfig.num_to_keep <= 2` with PBT can lead to restoration problems"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with tune_settings():
            warnings.warn(text, stacklevel=1)
            warnings.warn("another warning", stacklevel=1)
        warnings.warn(text, stacklevel=1)
    assert [str(w.message) for w in shown] == ["another warning", text]


def test_known_noise_is_dropped_and_other_warnings_pass():
    """RLlib's new-API-stack notice, PBT's 20 KB "Cannot find metric" dump, RLlib's notice
    about its own checkpoints, Ray's "token authentication is enabled" and Tune's
    "Tuner.restore(...)" hint after a Ctrl-C are dropped; any other warning of the same loggers
    still shows."""
    import logging

    from rl_pbt.noise import quiet_known_noise

    quiet_known_noise()
    quiet_known_noise()  # a multirun's next job: still one filter each
    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())  # type: ignore[method-assign]
    for name, dropped, kept in KNOWN_NOISE:
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        logger.addHandler(handler)  # Ray's loggers do not propagate to pytest's handler
        try:
            logger.warning(dropped)
            logger.warning(kept)
        finally:
            logger.removeHandler(handler)
    assert shown == [kept for _, _, kept in KNOWN_NOISE]

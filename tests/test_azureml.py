"""AzureML, offline: the job spec loads, the launcher picks head and workers, tracking=azureml.

Nothing here reaches Azure. The job spec tests need the ``azureml`` extra and skip without it;
the launcher and tracking tests need only the project.
"""

from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from conftest import ROOT, compose_config, load_script
from packaging.requirements import Requirement

from rl_pbt.errors import ConfigError
from rl_pbt.resolve import resolve

AZUREML_DIR = ROOT / "scripts" / "azureml"
JOB_FILE = AZUREML_DIR / "job.yml"
WORKSPACE_URI = ("azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/0000/"
                 "resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws")


def azureml_script(name: str) -> ModuleType:
    """``scripts/azureml/NAME.py`` as a module."""
    return load_script(AZUREML_DIR / f"{name}.py", f"azureml_{name}")


start_ray = azureml_script("start_ray")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name lookup or connection fails the test: these checks must stay offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- the launcher: which node does what --------------------------------------------------------
HEAD_IP = "10.0.0.4"
PYTORCH = {"MASTER_ADDR": HEAD_IP, "MASTER_PORT": "6105", "WORLD_SIZE": "3",
           "AZUREML_NODE_COUNT": "3", "LOCAL_RANK": "0"}
MPI = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
       "OMPI_COMM_WORLD_LOCAL_RANK": "0", "AZ_BATCH_MASTER_NODE": "10.0.0.5:6000"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({**PYTORCH, "NODE_RANK": "0", "RANK": "0"}, (0, 3, 0, HEAD_IP)),
        ({**PYTORCH, "NODE_RANK": "2", "RANK": "2"}, (2, 3, 0, HEAD_IP)),
        # no NODE_RANK: the global rank, one process per node
        ({**PYTORCH, "RANK": "1"}, (1, 3, 0, HEAD_IP)),
        # no AZUREML_NODE_COUNT: WORLD_SIZE processes, one per node
        ({"MASTER_ADDR": HEAD_IP, "WORLD_SIZE": "4", "NODE_RANK": "3"}, (3, 4, 0, HEAD_IP)),
        ({**MPI, "OMPI_COMM_WORLD_RANK": "0"}, (0, 2, 0, "10.0.0.5")),
        ({**MPI, "OMPI_COMM_WORLD_RANK": "1"}, (1, 2, 0, "10.0.0.5")),
        # two processes per node: rank 3 is node 1's second process
        ({**MPI, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
          "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (1, 2, 1, "10.0.0.5")),
        ({"AZ_BATCHAI_MPI_MASTER_NODE": "10.0.0.6", "OMPI_COMM_WORLD_RANK": "1",
          "OMPI_COMM_WORLD_SIZE": "2"}, (1, 2, 0, "10.0.0.6")),
        # nothing set: a one-node run, this process is the head
        ({}, (0, 1, 0, None)),
    ],
)
def test_node_role_reads_what_azureml_sets(env, expected):
    role = start_ray.node_role(env)
    assert (role.node_rank, role.nodes, role.local_rank, role.head_host) == expected
    assert role.is_head == (expected[0] == 0)
    assert role.starts_ray == (expected[2] == 0)


def test_head_listens_and_workers_join_the_head():
    head = start_ray.node_role({**PYTORCH, "NODE_RANK": "0"})
    worker = start_ray.node_role({**PYTORCH, "NODE_RANK": "1"})
    assert start_ray.ray_start_command(head, 6380)[:4] == ["ray", "start", "--head", "--port=6380"]
    command = start_ray.ray_start_command(worker, 6380)
    assert "--head" not in command
    assert f"--address={HEAD_IP}:6380" in command


def test_a_worker_without_a_head_address_stops_with_one_line():
    worker = start_ray.node_role({"NODE_RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(SystemExit, match="neither MASTER_ADDR nor AZ_BATCH_MASTER_NODE"):
        start_ray.ray_start_command(worker)


def test_the_head_runs_rl_pbt_on_the_cluster_with_azureml_tracking():
    command = start_ray.rl_pbt_command(["population=8", "tracking=none"], "/mnt/runs", "py")
    assert command[:3] == ["py", "-m", "rl_pbt"]
    options = command[3:]
    for option in ("resources=cluster", "resources.address=auto", "tracking=azureml",
                   "hydra.run.dir=/mnt/runs/run", "hydra.sweep.dir=/mnt/runs/multirun"):
        assert option in options
    # the user's overrides come last, so Hydra lets them win
    assert options[-2:] == ["population=8", "tracking=none"]
    assert options.index("tracking=azureml") < options.index("tracking=none")
    assert not any(o.startswith("hydra.") for o in start_ray.rl_pbt_command([], None, "py"))


def test_ray_nodes_import_rl_pbt_from_the_code_snapshot():
    env = start_ray.with_root_on_path({"PYTHONPATH": "/opt/lib"}, Path("/code"))
    assert env["PYTHONPATH"].split(":") == ["/code", "/opt/lib"]
    assert start_ray.with_root_on_path({}, Path("/code"))["PYTHONPATH"] == "/code"
    assert start_ray.ROOT == ROOT


class FakeClock:
    """time.monotonic and time.sleep for the wait loops, without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1

    def __call__(self) -> float:
        return self.now


def test_wait_until_polls_until_ready_or_timeout():
    clock = FakeClock()
    answers = iter([False, False, True])
    assert start_ray.wait_until(lambda: next(answers), 60, 5, clock.sleep, clock)
    assert clock.sleeps == 2
    clock = FakeClock()
    assert not start_ray.wait_until(lambda: False, 12, 5, clock.sleep, clock)
    assert clock.now == 15


def test_a_worker_leaves_after_the_head_misses_three_probes_in_a_row():
    clock = FakeClock()
    probes = iter([True, False, True, False, False, False, True])
    start_ray.wait_while_up(lambda: next(probes), 3, 10, clock.sleep)
    assert next(probes) is True  # stopped right after the third miss in a row
    assert clock.sleeps == 5


def test_job_command_is_the_launchers_command_line():
    """Read as plain YAML (no azure-ai-ml): the command start_ray.py parses, as submitted."""
    spec = yaml.safe_load(JOB_FILE.read_text())
    words = [*shlex.split(spec["command"]), "env=acrobot"]
    assert words[:2] == ["python", "scripts/azureml/start_ray.py"]
    args = start_ray.parse_args(words[2:])
    assert args.shared_dir == "${{outputs.runs}}"
    assert args.overrides == ["env=acrobot"]


# -- tracking=azureml --------------------------------------------------------------------------
def plan_for(overrides: list[str], tmp_path: Path):
    return resolve(compose_config(overrides), tmp_path, launch_dir=tmp_path)


@pytest.fixture
def outside_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def test_azureml_tracking_takes_the_jobs_uri_and_experiment(monkeypatch, tmp_path, outside_a_job):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rl-pbt")
    tracking = plan_for(["tracking=azureml"], tmp_path).tracking
    assert tracking.tracking_uri == "http://127.0.0.1:5999"
    assert tracking.experiment_name == "rl-pbt"
    assert tracking.enabled
    assert tracking.backend == "mlflow"  # the same tracker as tracking=mlflow


def test_azureml_tracking_names_the_experiment_when_azureml_does_not(
    monkeypatch, tmp_path, outside_a_job
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert plan_for(["tracking=azureml"], tmp_path).tracking.experiment_name == "rl_pbt"


def test_an_explicit_tracking_uri_beats_the_environment(monkeypatch, tmp_path, outside_a_job):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    plan = plan_for(["tracking=azureml", "tracking.tracking_uri=sqlite:///runs.db"], tmp_path)
    assert plan.tracking.tracking_uri == f"sqlite:///{tmp_path.resolve()}/runs.db"


@pytest.mark.parametrize("value", [None, ""])
def test_azureml_tracking_outside_a_job_is_one_config_error(
    value, monkeypatch, tmp_path, outside_a_job
):
    if value is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    with pytest.raises(ConfigError) as caught:
        plan_for(["tracking=azureml"], tmp_path)
    message = str(caught.value)
    assert message.startswith("tracking.tracking_uri: MLFLOW_TRACKING_URI is not set")
    assert "tracking=mlflow" in message
    assert "\n" not in message


def test_an_azureml_uri_without_the_plugin_says_what_to_install(
    monkeypatch, tmp_path, outside_a_job
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", WORKSPACE_URI)
    monkeypatch.setitem(sys.modules, "azureml.mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[azureml\]"') as caught:
        plan_for(["tracking=azureml"], tmp_path)
    assert "\n" not in str(caught.value)


def test_an_azureml_uri_with_the_plugin_is_kept_as_it_is(
    monkeypatch, tmp_path, outside_a_job, no_network
):
    pytest.importorskip("azureml.mlflow", reason="needs the azureml extra")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", WORKSPACE_URI)
    assert plan_for(["tracking=azureml"], tmp_path).tracking.tracking_uri == WORKSPACE_URI


# -- the image: the same dependencies as pyproject.toml ----------------------------------------
def test_the_images_pins_satisfy_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (AZUREML_DIR / "environment" / "requirements.txt").read_text().splitlines()
    pins = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            pins[pin.name] = str(pin.specifier).removeprefix("==")
    wanted = [*project["dependencies"], "azureml-mlflow" + _spec_of(project, "azureml-mlflow")]
    for text in wanted:
        requirement = Requirement(text)
        assert requirement.name in pins, f"{requirement.name} is not in the image"
        assert requirement.specifier.contains(pins[requirement.name], prereleases=True), text


def _spec_of(project: dict, name: str) -> str:
    """The version range the ``azureml`` extra gives ``name``."""
    for text in project["optional-dependencies"]["azureml"]:
        requirement = Requirement(text)
        if requirement.name == name:
            return str(requirement.specifier)
    raise AssertionError(f"{name} is not in the azureml extra")


# -- the job spec, as the azure-ai-ml SDK reads it (no workspace) -------------------------------
@pytest.fixture
def azure_ml(no_network) -> ModuleType:
    return pytest.importorskip("azure.ai.ml", reason="needs the azureml extra")


def test_job_spec_loads_as_a_multi_node_command_job(azure_ml):
    from azure.ai.ml import PyTorchDistribution
    from azure.ai.ml.entities import Command

    job = azure_ml.load_job(JOB_FILE)
    assert isinstance(job, Command)
    assert job.resources.instance_count > 1
    assert isinstance(job.distribution, PyTorchDistribution)
    assert job.distribution.process_count_per_instance == 1  # one Ray node per machine
    assert job.outputs["runs"].mode == "rw_mount"  # Tune's storage, shared by every node
    code = (AZUREML_DIR / job.code).resolve()
    assert code == ROOT
    command = shlex.split(job.command)
    script = code / command[1]
    assert command[0] == "python" and script == AZUREML_DIR / "start_ray.py" and script.is_file()
    assert command[command.index("--shared-dir") + 1] == "${{outputs.runs}}"
    assert "tracking=azureml" in start_ray.rl_pbt_command([], None)


def test_job_environment_is_the_docker_context_here(azure_ml):
    job = azure_ml.load_job(JOB_FILE)
    context = (AZUREML_DIR / job.environment.build.path).resolve()
    assert context == AZUREML_DIR / "environment"
    dockerfile = (context / "Dockerfile").read_text()
    assert "COPY requirements.txt" in dockerfile
    assert "torch==2.13.0" in dockerfile and "/whl/cpu" in dockerfile


def test_submit_applies_the_command_line_to_the_job(azure_ml):
    submit = azureml_script("submit")
    overrides = ["population=8", "mutations.hyperparams.lr=[1e-4,1e-3]"]
    job = submit.build_job(JOB_FILE, overrides, compute="big-cpus", instances=4,
                           experiment="pbt-sweep")
    assert (job.compute, job.resources.instance_count, job.experiment_name) == (
        "big-cpus", 4, "pbt-sweep")
    args = start_ray.parse_args(shlex.split(job.command)[2:])
    assert args.overrides == overrides
    assert submit.build_job(JOB_FILE, []).command == azure_ml.load_job(JOB_FILE).command


def test_submit_needs_a_workspace():
    submit = azureml_script("submit")
    with pytest.raises(SystemExit):
        submit.parse_args(["--compute", "cpu-cluster"])
    args = submit.parse_args(["--config", "config.json", "--", "env=acrobot", "-m"])
    assert args.overrides == ["env=acrobot", "-m"]

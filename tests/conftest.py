"""Shared fixtures: config composition, one Ray instance and one MLflow server per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from rl_pbt.cli import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent

#: Overrides that shrink a run to seconds: tiny batches, few iterations, frequent perturbation.
TINY = [
    "population=4",
    "stopper.max_iterations=8",
    "scheduler.quantile_fraction=0.5",
    "scheduler.perturbation_interval=2",
    "algorithm.config.train_batch_size_per_learner=400",
    "algorithm.config.minibatch_size=100",
    "mutations.hyperparams.num_epochs.high=3",
    "mutations.hyperparams.num_epochs.low=1",
    "resources.config.num_envs_per_env_runner=4",
]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides, as ``python -m rl_pbt`` would."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides or [])


def config_error(overrides: list[str], tmp_path: Path) -> str:
    """The ConfigError a config is rejected with; it must be one line."""
    from rl_pbt.errors import ConfigError
    from rl_pbt.resolve import resolve

    with pytest.raises(ConfigError) as caught:
        resolve(compose_config(overrides), tmp_path, launch_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for every test that trains in-process."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1: all bound at once, so none repeats."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def load_script(path: Path, name: str) -> ModuleType:
    """Import a script under ``scripts/`` as module ``name`` (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 and a free port; stopped after the session."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    mlflow = shutil.which("mlflow") or "mlflow"
    log = open(folder / "server.log", "w")  # noqa: SIM115 - the server writes it until stopped
    proc = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", f"sqlite:///{folder}/server.db",
         "--default-artifact-root", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((folder / "server.log").read_text()) from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not answer /health within 120 s")
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m rl_pbt`` in a subprocess, in ``cwd``, and capture its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": ""}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "rl_pbt", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout,
    )

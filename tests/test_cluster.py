"""Joining a running Ray cluster: bad addresses fail in one line, and a real two-node cluster.

The cluster is two ``ray start --block`` processes on this machine (head + one worker node, one
CPU each), every port they open picked free, Ray's temp folder private to the test, token
authentication on with a token made for the test. It is stopped by terminating those two
processes, never with ``ray stop`` (which would end every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose_config, free_port, free_ports, run_cli

from rl_pbt.cluster import MISSING, gcs_unreachable, join_address, ray_reason
from rl_pbt.errors import ConfigError
from rl_pbt.plan import Resources
from rl_pbt.resolve import resolve

#: Ray's unix sockets live under ``TEMP/session_<date>_<pid>/sockets/``: about 65 characters
#: below the temp folder, and a socket path must stay under 108.
MAX_TEMP_DIR_CHARS = 40
#: Ports each node opens besides its workers' (the head also opens ``--port``).
NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
WORKER_PORTS = 40
NODE_START_S = 60.0
#: Overrides after TINY for the two-node run (see where it is used).
LONGER_ITERATIONS = ["algorithm.config.train_batch_size_per_learner=4000",
                     "algorithm.config.minibatch_size=500", "stopper.max_iterations=6",
                     "scheduler.perturbation_interval=3"]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port_range(count: int, taken: set[int]) -> int:
    """The first of ``count`` consecutive free ports, below Linux's ephemeral range (32768+)
    from which ``free_ports`` draws, so a node's workers never collide with the other ports."""
    for _ in range(200):
        first = random.randrange(20000, 32768 - count)
        span = set(range(first, first + count))
        if not span & taken and all(_bindable(p) for p in span):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def _free_ports_besides(count: int, taken: set[int]) -> list[int]:
    """``free_ports`` that are none of ``taken``: a port drawn earlier is closed again until
    Ray binds it, and the kernel gave the head's GCS port out a second time (CI, test_cluster:
    'dashboard_agent_grpc is trying to use a port number ... used by other components')."""
    for _ in range(100):
        ports = free_ports(count)
        if not set(ports) & taken:
            return ports
    raise RuntimeError(f"no {count} free ports besides {sorted(taken)}")


def _node_flags(taken: set[int], head: bool = False) -> list[str]:
    """``ray start`` flags that pin every port a node listens on to a free one.

    A head with Ray Client installed (``grpc``) also serves it, on 10001 unless told.
    """
    flags = list(NODE_PORT_FLAGS)
    if head and importlib.util.find_spec("grpc") is not None:
        flags.append("ray-client-server-port")
    ports = dict(zip(flags, _free_ports_besides(len(flags), taken), strict=True))
    first = _free_port_range(WORKER_PORTS, taken | set(ports.values()))
    taken.update(ports.values(), range(first, first + WORKER_PORTS))
    return [*(f"--{flag}={port}" for flag, port in ports.items()),
            f"--min-worker-port={first}", f"--max-worker-port={first + WORKER_PORTS - 1}"]


@dataclass
class LocalCluster:
    """A running two-node cluster, and the environment a process needs to join it."""

    port: int
    env: dict[str, str]
    node_ids: frozenset[str]
    temp_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start --block`` with the test's Python, in its own session (process group)."""
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1",
             "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
            env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + NODE_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"the head's GCS did not open port {port} in {NODE_START_S:g} s")


#: Run by a separate process: wait until both nodes are alive, print their ids.
_NODE_IDS = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(0.3)
print(json.dumps(alive))
"""


def _cluster_node_ids(address: str, env: dict[str, str]) -> frozenset[str]:
    """The cluster's own account of its nodes, asked by a process of its own."""
    proc = subprocess.run([sys.executable, "-c", _NODE_IDS, address, str(NODE_START_S)],
                          env=env, capture_output=True, text=True, timeout=NODE_START_S + 60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return frozenset(json.loads(proc.stdout.strip().splitlines()[-1]))


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries this cluster's marker: its nodes and their workers
    (which Ray puts in process groups of their own)."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes() and int(entry.name) != os.getpid():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stop(procs: list[subprocess.Popen], marker: str) -> None:
    """Terminate the ``ray start --block`` processes (each stops its node), then anything of
    this cluster still alive, by pid."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the node's own session, made by start_new_session
            proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _marked_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def _temp_dir(tmp_path: Path) -> tuple[Path, bool]:
    """Ray's temp folder: in the test's folder when that is short enough, else in /tmp.

    Returns:
        the folder, and whether the test must remove it.
    """
    if len(str(tmp_path / "ray")) <= MAX_TEMP_DIR_CHARS:
        (tmp_path / "ray").mkdir()
        return tmp_path / "ray", False
    return Path(tempfile.mkdtemp(prefix="rl_pbt_ray_")), True


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A head and a worker node on 127.0.0.1, one CPU each; always stopped, even on failure."""
    marker = secrets.token_hex(8)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RL_PBT_TEST_CLUSTER": marker}
    env.pop("RAY_ADDRESS", None)
    temp_dir, owned = _temp_dir(tmp_path)
    port = free_port()
    taken = {port}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_ray_start(
            ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
             *_node_flags(taken, head=True)], env, tmp_path / "head.log"))
        _wait_for_port(port, procs[0], tmp_path / "head.log")
        procs.append(_ray_start([f"--address=127.0.0.1:{port}", *_node_flags(taken)], env,
                                tmp_path / "worker.log"))
        node_ids = _cluster_node_ids(f"127.0.0.1:{port}", env)
        assert len(node_ids) == 2, (tmp_path / "worker.log").read_text()[-3000:]
        yield LocalCluster(port, env, node_ids, temp_dir)
    finally:
        _stop(procs, marker)
        if owned:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_run_on_a_two_node_cluster_trains_on_both_nodes(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    run_dir = tmp_path / "run"
    args = ["resources=cluster", f"resources.address={cluster.address}", *TINY,
            "population=2", "tracking=none", "seed=3", f"hydra.run.dir={run_dir}",
            # Iterations of a second or more: TINY's 0.2 s ones end the run before the second
            # node's trial has started, and the first trial's reused actor takes its turns.
            *LONGER_ITERATIONS]
    proc = subprocess.run([sys.executable, "-m", "rl_pbt", *args], cwd=tmp_path,
                          env=cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray: joined the cluster at" in proc.stdout
    assert "the cluster has 2. 2 trials train at once" in proc.stdout

    ray_info = json.loads((run_dir / "run.json").read_text())["ray"]
    assert ray_info["origin"] == "joined"
    # Ray swaps 127.0.0.1 for this machine's address; the port is the head's own.
    assert ray_info["gcs_address"].endswith(f":{cluster.port}")
    assert {n["node_id"] for n in ray_info["nodes"]} == cluster.node_ids
    assert (ray_info["num_nodes"], ray_info["cpus"]) == (2, 2)
    assert ray_info["driver_node_id"] in cluster.node_ids  # no Ray of its own

    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    used = {row["probe"]["node_id"] for row in rows}
    assert used <= cluster.node_ids
    assert used == cluster.node_ids, "1 CPU per node and 2 trials at once: both nodes train"


def test_an_unreachable_address_is_one_line_and_fast(tmp_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    proc = run_cli(["resources=cluster", f"resources.address=127.0.0.1:{port}",
                    "tracking=none"], cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"rl_pbt: error: resources.address: cannot reach a Ray cluster at 127.0.0.1:{port}: "
        "connection refused (nothing listens on that port)")
    assert elapsed < 30
    assert not (tmp_path / "outputs").exists()


def test_num_cpus_with_an_address_is_one_line(tmp_path):
    proc = run_cli(["resources=cluster", "resources.address=10.0.0.1:6379",
                    "resources.num_cpus=2", "tracking=none"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("rl_pbt: error: resources.num_cpus: not allowed when joining the "
                           "cluster at 10.0.0.1:6379")


@pytest.mark.parametrize(("address", "environ", "num_cpus", "expected"), [
    (None, {}, 4, None),                                     # start Ray here
    (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, None, "10.0.0.1:6379"),
    ("auto", {}, None, "auto"),
    ("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}, None, "10.0.0.1:6379"),  # as ray.init reads it
    ("head:6380", {"RAY_ADDRESS": "10.0.0.1:6379"}, None, "head:6380"),
    ("[::1]:6379", {}, None, "[::1]:6379"),
    (MISSING, {}, None, ConfigError("resources=cluster joins a running Ray cluster")),
    ("head", {}, None, ConfigError("expected HOST:PORT")),
    ("head:99999", {}, None, ConfigError("expected HOST:PORT")),
    ("ray://head:10001", {}, None, ConfigError("Ray Client address, not supported")),
    ("head:6379", {}, 2, ConfigError("resources.num_cpus: not allowed")),
    (None, {"RAY_ADDRESS": "head:6379"}, 2, ConfigError("resources.num_cpus: not allowed")),
])
def test_join_address(address, environ, num_cpus, expected):
    resources = Resources(address=address, num_cpus=num_cpus)
    if isinstance(expected, ConfigError):
        with pytest.raises(ConfigError, match=re.escape(str(expected))):
            join_address(resources, environ)
    else:
        assert join_address(resources, environ) == expected


def test_cluster_option_reads_ray_address(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    plan = resolve(compose_config(["resources=cluster"]), tmp_path, launch_dir=tmp_path)
    assert plan.resources.address == "10.0.0.1:6379"
    assert plan.resources.num_cpus is None
    monkeypatch.delenv("RAY_ADDRESS")
    plan = resolve(compose_config(["resources=cluster"]), tmp_path, launch_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs its address"):
        join_address(plan.resources, {})


def test_gcs_probe_tells_a_dead_port_from_a_port_that_is_not_ray():
    port = free_port()
    assert gcs_unreachable("127.0.0.1", port, timeout=2) == (
        "connection refused (nothing listens on that port)")
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        reason = gcs_unreachable("127.0.0.1", silent.getsockname()[1], timeout=0.5)
    assert reason is not None and "not Ray's GCS" in reason


def test_a_missing_token_is_named():
    try:
        try:
            raise RuntimeError("Failed to connect to GCS.\nray.exceptions.AuthenticationError: "
                               "RPC error: InvalidAuthToken: token is missing")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from cause
    except ConnectionError as err:
        assert "RAY_AUTH_MODE=token" in ray_reason(err)
    assert ray_reason(ConnectionError("Could not find any running Ray instance.\nmore")) == (
        "Could not find any running Ray instance.")

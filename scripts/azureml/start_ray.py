"""Start one Ray cluster over the nodes of an AzureML job, then run rl_pbt on its head.

    python scripts/azureml/start_ray.py --shared-dir DIR [--port 6379] [-- HYDRA_OVERRIDES...]

AzureML runs a distributed job's command once per process on every node (job.yml: ``pytorch``
distribution, one process per instance) and tells each process where it stands through
environment variables: ``NODE_RANK``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and
``MASTER_ADDR`` (the rank-0 node's IP) for ``pytorch``; ``OMPI_COMM_WORLD_*`` and
``AZ_BATCH_MASTER_NODE`` (``IP:PORT``) for ``mpi``; ``AZUREML_NODE_COUNT``, where set, counts
the nodes.

- Node 0, the head: ``ray start --head``; waits until every node has joined, so that rl_pbt's
  concurrency report and PBT's first placement see the whole cluster; runs
  ``python -m rl_pbt resources=cluster resources.address=auto tracking=azureml OVERRIDES``;
  stops Ray and exits with rl_pbt's exit code, which becomes the job's status.
- Every other node: waits for the head's port, ``ray start --address=HEAD:PORT``, and stays
  until that port closes (the head has finished and stopped Ray); then stops its own Ray and
  exits 0.
- A second process on a node (``process_count_per_instance > 1``) exits at once: one Ray node
  per machine.

Since Ray 2.7, Tune needs every node to read and write one storage path, or PBT cannot restore a
checkpoint written on another node. So the run's folder (Hydra's run and sweep dirs; Tune's
``storage_path`` lies below them) is ``--shared-dir``: job.yml's ``runs`` output, mounted
read-write on every node.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The repository root: the job's code snapshot on every node.
ROOT = Path(__file__).resolve().parents[2]
RAY_PORT = 6379
#: What the head runs; the user's overrides come after these, and Hydra lets the last one win.
RL_PBT_OPTIONS = ("resources=cluster", "resources.address=auto", "tracking=azureml")


@dataclass(frozen=True)
class NodeRole:
    """Where this process stands in the job: which node, of how many, and where the head is."""

    node_rank: int
    nodes: int
    local_rank: int
    head_host: str | None

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0

    @property
    def starts_ray(self) -> bool:
        """One Ray node per machine: only each machine's first process starts one."""
        return self.local_rank == 0


def _first_int(env: Mapping[str, str], names: Sequence[str], default: int) -> int:
    """The first of ``names`` that is set in ``env``, as an integer."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return int(value)
    return default


def head_host(env: Mapping[str, str]) -> str | None:
    """The rank-0 node's address, or None when the job names none (a one-node job).

    ``pytorch`` jobs set ``MASTER_ADDR``; ``mpi`` jobs set ``AZ_BATCH_MASTER_NODE`` as
    ``IP:PORT`` (older images ``AZ_BATCHAI_MPI_MASTER_NODE``), and only with two or more nodes.
    """
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"].strip()
    for name in ("AZ_BATCH_MASTER_NODE", "AZ_BATCHAI_MPI_MASTER_NODE"):
        if env.get(name):
            return env[name].strip().rsplit(":", 1)[0]
    return None


def node_role(env: Mapping[str, str]) -> NodeRole:
    """Read this process's node rank, the node count and the head's address from ``env``.

    ``NODE_RANK`` names the node directly; otherwise the global rank is divided by the
    processes per node (MPI places consecutive ranks on one node). Nothing set at all is a
    one-node run: this process is the head.
    """
    per_node = max(1, _first_int(env, ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"), 1))
    local_rank = _first_int(env, ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"), 0)
    if env.get("NODE_RANK", "").strip():
        node_rank = int(env["NODE_RANK"])
    else:
        node_rank = _first_int(env, ("RANK", "OMPI_COMM_WORLD_RANK"), 0) // per_node
    processes = _first_int(env, ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"), 1)
    nodes = _first_int(env, ("AZUREML_NODE_COUNT",), 0) or max(1, processes // per_node)
    return NodeRole(node_rank, nodes, local_rank, head_host(env))


def ray_start_command(role: NodeRole, port: int = RAY_PORT) -> list[str]:
    """``ray start`` for this node: the head listens on ``port``, the others join it."""
    if role.is_head:
        return ["ray", "start", "--head", f"--port={port}", "--disable-usage-stats"]
    if not role.head_host:
        raise SystemExit(
            f"start_ray: node {role.node_rank} of {role.nodes} has no head address: neither "
            "MASTER_ADDR nor AZ_BATCH_MASTER_NODE is set; use job.yml's pytorch distribution"
        )
    return ["ray", "start", f"--address={role.head_host}:{port}", "--disable-usage-stats"]


def rl_pbt_command(
    overrides: Sequence[str], shared_dir: str | None, python: str = sys.executable
) -> list[str]:
    """The head's training command: the cluster, AzureML tracking, run folders on the mount.

    The user's overrides come last, so ``tracking=none`` (say) still wins.
    """
    folders = [f"hydra.run.dir={shared_dir}/run", f"hydra.sweep.dir={shared_dir}/multirun"]
    return [python, "-m", "rl_pbt", *RL_PBT_OPTIONS, *(folders if shared_dir else []),
            *overrides]


def with_root_on_path(env: Mapping[str, str], root: Path = ROOT) -> dict[str, str]:
    """``env`` with the code snapshot first on PYTHONPATH.

    Ray's worker processes inherit the environment of the ``ray start`` that started their node,
    and on any node they import ``rl_pbt`` (its trainable) from this snapshot.
    """
    path = [str(root), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(path)}


def port_open(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (the head's GCS)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    ready: Callable[[], bool], timeout: float, interval: float = 5.0,
    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Poll ``ready`` until it is true (True) or ``timeout`` seconds have passed (False)."""
    deadline = clock() + timeout
    while not ready():
        if clock() >= deadline:
            return False
        sleep(interval)
    return True


def wait_while_up(
    up: Callable[[], bool], misses: int = 3, interval: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once ``up`` has been false ``misses`` times in a row.

    One failed probe can be a blip; the head stops Ray only when rl_pbt has finished.
    """
    missed = 0
    while missed < misses:
        missed = 0 if up() else missed + 1
        if missed < misses:
            sleep(interval)


def alive_nodes(timeout: float, expected: int) -> int:
    """Wait (on the head) until ``expected`` Ray nodes are alive; return how many are."""
    import ray

    def count() -> int:
        return sum(1 for node in ray.nodes() if node.get("Alive"))

    ray.init(address="auto", log_to_driver=False, configure_logging=False)
    try:
        wait_until(lambda: count() >= expected, timeout)
        return count()
    finally:
        ray.shutdown()


def log(role: NodeRole, message: str) -> None:
    print(f"[start_ray node {role.node_rank}/{role.nodes}] {message}", flush=True)


def run_head(role: NodeRole, args: argparse.Namespace, env: dict[str, str]) -> int:
    """Start the head, wait for the other nodes, train, stop Ray; rl_pbt's exit code."""
    subprocess.run(ray_start_command(role, args.port), check=True, env=env)
    try:
        joined = alive_nodes(args.join_timeout, role.nodes)
        if joined < role.nodes:
            log(role, f"only {joined} of {role.nodes} nodes joined within "
                      f"{args.join_timeout:g} s; training on those (PBT makes trials take turns)")
        command = rl_pbt_command(args.overrides, args.shared_dir)
        log(role, "running " + " ".join(command))
        return subprocess.run(command, env=env, cwd=ROOT).returncode
    finally:
        subprocess.run(["ray", "stop"], env=env)


def run_worker(role: NodeRole, args: argparse.Namespace, env: dict[str, str]) -> int:
    """Join the head once it listens; leave when it has gone."""
    command = ray_start_command(role, args.port)  # fails first when there is no head address
    host = str(role.head_host)
    if not wait_until(lambda: port_open(host, args.port), args.join_timeout):
        log(role, f"the head {host}:{args.port} did not answer within {args.join_timeout:g} s")
        return 1
    subprocess.run(command, check=True, env=env)
    log(role, f"joined {host}:{args.port}; waiting for the head to finish")
    wait_while_up(lambda: port_open(host, args.port))
    subprocess.run(["ray", "stop"], env=env)
    log(role, "the head has stopped; Ray stopped here too")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-dir", default=None,
                        help="a folder every node mounts at the same path (job.yml's runs output)")
    parser.add_argument("--port", type=int, default=RAY_PORT, help="the head's Ray (GCS) port")
    parser.add_argument("--join-timeout", type=float, default=600.0,
                        help="seconds to wait for the head (workers) or for all nodes (head)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for python -m rl_pbt")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    role = node_role(os.environ)
    if not role.starts_ray:
        log(role, f"local rank {role.local_rank}: one Ray node per machine, nothing to do")
        return 0
    if role.nodes > 1 and not args.shared_dir:
        log(role, "warning: no --shared-dir; PBT cannot restore checkpoints across nodes")
    env = with_root_on_path(os.environ)
    return run_head(role, args, env) if role.is_head else run_worker(role, args, env)


if __name__ == "__main__":
    sys.exit(main())

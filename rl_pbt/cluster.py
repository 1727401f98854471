"""Start or join Ray, and say how many trials of the population can train at once.

The user guide's rule: a trial needs ``num_cpus_for_main_process + num_env_runners x
num_cpus_per_env_runner`` CPUs (RLlib's ``default_resource_request``); if ``CPUs per trial x
population`` exceeds the cluster's CPUs, PBT makes the rest take turns.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import ray

from rl_pbt import local_ray
from rl_pbt.algorithms import import_object
from rl_pbt.errors import ConfigError
from rl_pbt.plan import Plan, Resources
from rl_pbt.scheduler_options import POPULATION_BASED
from rl_pbt.values import first_line

#: How this run got its Ray: started here, joined a running cluster, or kept this process's.
Origin = Literal["started", "joined", "reused"]
#: ``resources.address=auto``: the cluster this machine belongs to (Ray's own lookup).
AUTO = "auto"
#: ``resources.address`` left unset in ``conf/resources/cluster.yaml`` (``oc.env``'s default).
MISSING = "???"
#: Seconds the GCS probe waits to connect and for an answer.
PROBE_TIMEOUT_S = 5.0
#: Ray's tries to reach the GCS when joining (its default, 20, is 20 s for a missing token).
JOIN_ATTEMPTS = 3
#: The variable Ray reads that count from (``ray._private.node``); the user's value wins.
RAY_JOIN_ATTEMPTS_VAR = "RAY_gcs_server_port_wait_time_s"
#: An HTTP/2 client's first bytes and an empty SETTINGS frame; a gRPC server answers with
#: a SETTINGS frame of its own (frame type, byte 3, is 4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4
#: The resource only the head node has.
HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for, summed over its placement-group bundles."""

    cpus: float
    gpus: float
    bundles: int


@dataclass(frozen=True)
class Concurrency:
    """How the population maps onto the cluster."""

    trial: TrialResources
    cluster_cpus: float
    cluster_gpus: float
    population: int
    concurrent: int
    #: Whether the scheduler pauses trials to let others train (PBT, PB2); ASHA, random search
    #: and FIFO start a waiting trial only when one ends.
    pauses: bool = True

    @property
    def take_turns(self) -> bool:
        return self.concurrent < self.population

    def report(self) -> str:
        """The line printed before training starts."""
        per_trial = _count(self.trial.cpus, "CPU") + (
            f" + {_count(self.trial.gpus, 'GPU')}" if self.trial.gpus else "")
        at_once = "1 trial trains" if self.concurrent == 1 else f"{self.concurrent} trials train"
        head = (
            f"Concurrency: {per_trial} per trial x {_count(self.population, 'trial')} = "
            f"{_count(self.trial.cpus * self.population, 'CPU')} wanted; the cluster has "
            f"{self.cluster_cpus:g}. {at_once} at once"
        )
        if self.take_turns:
            waiting = self.population - self.concurrent
            how = ("take turns (PBT pauses and resumes them)" if self.pauses else
                   "start as others end")
            return head + f"; the other {waiting} {how}."
        return head + "; none wait."


def _count(number: float, noun: str) -> str:
    return f"{number:g} {noun}" + ("" if number == 1 else "s")


def trial_resources(plan: Plan) -> TrialResources:
    """Ask the algorithm what one trial of this plan requests (RLlib's own rule); RLlib's own
    checks of a value (an ``lr`` schedule's form, ...) fail here, before anything starts."""
    algorithm = import_object(plan.algorithm.algorithm_class)
    try:
        config = import_object(plan.algorithm.config_class)().update_from_dict(
            {k: v for k, v in plan.initial_config.items() if k not in ("env", "env_config")}
        )
        factory = algorithm.default_resource_request(config)  # runs RLlib's config.validate()
    except (ValueError, TypeError) as err:  # from RLlib's checks (a TypeError for a bad form)
        raise ConfigError(
            f"algorithm.config: RLlib rejects the first trial's config: {first_line(err)}"
        ) from None
    needed = factory.required_resources
    return TrialResources(needed.get("CPU", 0.0), needed.get("GPU", 0.0), len(factory.bundles))


def start_ray(plan: Plan) -> Origin:
    """Join the cluster at ``resources.address`` (or ``RAY_ADDRESS``), else start Ray here.

    A process that already runs Ray (a Hydra multirun, a test session) keeps its instance.
    The command line may have begun the start already (:mod:`rl_pbt.local_ray`).

    Returns:
        ``"joined"``, ``"started"`` or ``"reused"``: recorded in ``run.json``.
    """
    address = join_address(plan.resources)
    early = None if address else local_ray.started_early()
    if early:
        return early
    if ray.is_initialized():
        return "reused"
    if address:
        join(address)
        return "joined"
    local_ray.init_local(plan.resources.num_cpus)
    return "started"


def join_address(resources: Resources, environ: Mapping[str, str] = os.environ) -> str | None:
    """The cluster to join, checked before Ray is touched; None means start Ray here.

    ``resources.address`` wins over ``RAY_ADDRESS``; ``auto`` takes ``RAY_ADDRESS`` when set, as
    ``ray.init`` does, so the address checked (and recorded) is the one Ray will use.
    """
    address = resources.address
    if address is None or (address == AUTO and environ.get("RAY_ADDRESS")):
        address = environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    address = str(address).strip()
    if address == MISSING:
        raise ConfigError(
            "resources.address: resources=cluster joins a running Ray cluster and needs its "
            "address: resources.address=HOST:PORT (the head's GCS port, 6379 by default), "
            "resources.address=auto on a node of the cluster, or the RAY_ADDRESS variable")
    if "://" in address:
        raise ConfigError(
            f"resources.address: {address} is a Ray Client address, not supported: rl_pbt "
            "writes its run folder where it runs; run it on a node of the cluster with "
            "HOST:PORT or auto, or with `ray job submit`")
    if address != AUTO:
        split_host_port(address)
    if resources.num_cpus is not None:
        raise ConfigError(
            f"resources.num_cpus: not allowed when joining the cluster at {address}, whose CPUs "
            "are those its nodes were started with (ray start --num-cpus); drop it")
    return address


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a host and a port number."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"resources.address: expected HOST:PORT (the head's GCS port, 6379 by default) "
            f"or auto, got {address!r}")
    return host, int(port)


def join(address: str) -> None:
    """``ray.init`` to a running cluster: a dead address is a one-line error within seconds.

    Ray itself retries a dead address for minutes (seen here: over 2 minutes for a closed
    port), so the GCS is probed first; the probe cannot see token authentication, so Ray's
    own attempts are also cut from 20 to ``JOIN_ATTEMPTS``.
    """
    target = None if address == AUTO else split_host_port(address)
    reason = gcs_unreachable(*target) if target else None
    if reason is None:
        try:
            with environ_default(RAY_JOIN_ATTEMPTS_VAR, str(JOIN_ATTEMPTS)):
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            reason = ray_reason(err)
    if reason is not None:
        raise ConfigError(
            f"resources.address: cannot reach a Ray cluster at {address}: {reason}")
    nodes = alive_nodes()
    print(f"Ray: joined the cluster at {ray.get_runtime_context().gcs_address}: "
          f"{_count(len(nodes), 'node')}, {_count(_cpus(nodes), 'CPU')}.", flush=True)


def gcs_unreachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why Ray's GCS does not answer at ``host:port``, or None when it does.

    A TCP connect and one HTTP/2 exchange (the GCS is a gRPC server) take milliseconds, and
    also catch a port that belongs to something else, such as the dashboard's 8265.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        return f"unknown host {host!r}"
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except TimeoutError:
        return f"no answer within {timeout:g} s (host down, or a firewall drops the port)"
    except OSError as err:
        return err.strerror or first_line(err)
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None  # the GCS speaks TLS first: the connect is all that can be checked
        try:
            sock.sendall(HTTP2_PREFACE)
            reply = sock.recv(9)
        except OSError:
            reply = b""
    if len(reply) >= 4 and reply[3] == HTTP2_SETTINGS:
        return None
    return ("something listens there, but not Ray's GCS; give the port `ray start --head` "
            "printed (--port, 6379 by default)")


def ray_reason(err: BaseException) -> str:
    """Ray's reason for a failed ``ray.init``, in one line; it hides the cause in a chain."""
    chain = []
    while err is not None and len(chain) < 5:
        chain.append(err)
        err = err.__cause__ or err.__context__
    if any("AuthToken" in str(e) or "Authentication" in str(e) for e in chain):
        return ("the cluster uses token authentication and this process has no valid token; "
                "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the "
                "cluster's token")
    return first_line(chain[0])


@contextmanager
def environ_default(name: str, default: str) -> Iterator[None]:
    """Set an environment variable for the block unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = default
    try:
        yield
    finally:
        os.environ.pop(name, None)


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes, as ``ray.nodes()`` lists them."""
    return [node for node in ray.nodes() if node.get("Alive")]


def _cpus(nodes: list[dict[str, Any]]) -> float:
    return sum(node.get("Resources", {}).get("CPU", 0.0) for node in nodes)


def describe(origin: Origin) -> dict[str, Any]:
    """Which Ray this run used: for ``run.json``, so a run on a cluster can be traced to it.

    Every result's probe carries the node its trial ran on; these are the ids to match.
    """
    nodes = alive_nodes()
    context = ray.get_runtime_context()
    return {
        "origin": origin,
        "gcs_address": context.gcs_address,
        "driver_node_id": context.get_node_id(),
        "num_nodes": len(nodes),
        "cpus": _cpus(nodes),
        "nodes": [{"node_id": node["NodeID"], "ip": node.get("NodeManagerAddress"),
                   "cpus": node.get("Resources", {}).get("CPU", 0.0),
                   "head": HEAD_RESOURCE in node.get("Resources", {})} for node in nodes],
    }


def concurrency(plan: Plan, trial: TrialResources) -> Concurrency:
    """Compare one trial's request (:func:`trial_resources`) with the running cluster; refuse
    one that can never fit."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if trial.cpus > cpus or trial.gpus > gpus:
        raise ConfigError(
            f"resources.config: a trial needs {trial.cpus:g} CPUs and {trial.gpus:g} GPUs but "
            f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower num_env_runners "
            f"or num_gpus_per_learner, or use a bigger cluster"
        )
    fit = int(cpus // trial.cpus) if trial.cpus else plan.population
    if trial.gpus:
        fit = min(fit, int(gpus // trial.gpus))
    return Concurrency(trial, cpus, gpus, plan.population, max(1, min(fit, plan.population)),
                       pauses=plan.scheduler.name in POPULATION_BASED)

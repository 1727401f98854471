"""Start or join Ray, and say how many trials of the population can train at once.

The user guide's rule: a trial needs ``num_cpus_for_main_process + num_env_runners x
num_cpus_per_env_runner`` CPUs (RLlib's ``default_resource_request``); if ``CPUs per trial x
population`` exceeds the cluster's CPUs, PBT makes the rest take turns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from rl_pbt.algorithms import import_object
from rl_pbt.errors import ConfigError
from rl_pbt.plan import Plan


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
            return head + f"; the other {waiting} take turns (PBT pauses and resumes them)."
        return head + "; none wait."


def _count(number: float, noun: str) -> str:
    return f"{number:g} {noun}" + ("" if number == 1 else "s")


def trial_resources(plan: Plan) -> TrialResources:
    """Ask the algorithm what one trial of this plan requests (RLlib's own rule)."""
    config = import_object(plan.algorithm.config_class)().update_from_dict(
        {k: v for k, v in plan.initial_config.items() if k not in ("env", "env_config")}
    )
    factory = import_object(plan.algorithm.algorithm_class).default_resource_request(config)
    needed = factory.required_resources
    return TrialResources(needed.get("CPU", 0.0), needed.get("GPU", 0.0), len(factory.bundles))


def start_ray(plan: Plan) -> None:
    """Join the cluster at ``resources.address`` (or ``RAY_ADDRESS``), else start Ray here.

    A process that already runs Ray (a Hydra multirun, a test session) keeps its instance.
    """
    if ray.is_initialized():
        return
    address = plan.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return
    ray.init(
        num_cpus=plan.resources.num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


def concurrency(plan: Plan) -> Concurrency:
    """Compare one trial's request with the running cluster; refuse one that can never fit."""
    trial = trial_resources(plan)
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
    return Concurrency(trial, cpus, gpus, plan.population, max(1, min(fit, plan.population)))

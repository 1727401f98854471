"""The resolved plan of one tuning experiment: plain Python objects, no OmegaConf.

``rl_pbt.resolve`` builds a :class:`Plan` from the composed Hydra config; everything downstream
(cluster start, tracking, the Tuner) reads only these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_pbt.algorithms import AlgorithmSpec
from rl_pbt.distributions import Distribution


@dataclass(frozen=True)
class EnvSpec:
    """The environment: a gymnasium id, or a class named by ``entry_point``."""

    id: str
    entry_point: str | None
    env_config: dict[str, Any]
    target_return: float
    continuous_actions: bool
    #: Discrete or MultiDiscrete: actions go to the env as sampled (nothing to unsquash).
    discrete_actions: bool

    @property
    def rllib_name(self) -> str:
        """What RLlib's ``env`` key gets: the gymnasium id, or the name it is registered under."""
        return f"rl_pbt:{self.id}" if self.entry_point else self.id


@dataclass(frozen=True)
class StopRule:
    """When a trial stops (any condition) and when the whole experiment stops."""

    metric: str
    mode: str
    max_iterations: int | None
    target_return: float | None
    max_env_steps: int | None
    max_seconds: float | None
    stop_all_at_target: bool = False


@dataclass(frozen=True)
class Resources:
    """Where Ray runs and how many trials share it."""

    address: str | None
    num_cpus: int | None


@dataclass(frozen=True)
class Tracking:
    """Where runs are recorded; ``backend == "none"`` records nothing."""

    backend: str
    tracking_uri: str | None
    experiment_name: str | None

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    @property
    def sqlite_file(self) -> Path | None:
        """The database file of a ``sqlite:///`` store, else None."""
        uri = self.tracking_uri or ""
        return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@dataclass(frozen=True)
class SchedulerSpec:
    """PBT's settings, validated; :func:`rl_pbt.schedulers.build_scheduler` makes the object."""

    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """Everything one tuning experiment needs, checked before anything starts."""

    name: str
    algorithm: AlgorithmSpec
    env: EnvSpec
    param_space: dict[str, Any]
    initial_config: dict[str, Any]
    mutations: dict[str, Distribution]
    scheduler: SchedulerSpec
    stop: StopRule
    resources: Resources
    tracking: Tracking
    population: int
    seed: int
    num_to_keep: int
    max_failures: int
    checkpoint_frequency: int
    output_dir: Path
    trainable: str = "pbt_ready"
    sampler: str = "batched"
    learner: str = "lean"
    tensorboard: bool = False
    choices: dict[str, str] = field(default_factory=dict)
    config_yaml: str = ""
    command: str = ""

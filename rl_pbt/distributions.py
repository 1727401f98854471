"""Search distributions written in YAML and instantiated by Hydra.

A mutation in PBT needs three things from one spec: a callable that resamples a value (what
``PopulationBasedTraining`` calls with ``resample_probability``), a Tune domain for the initial
draw in ``param_space``, and the bounds that the explore step clamps a perturbed value back into
(PBT's x1.2 / x0.8 otherwise walks out of the declared range). Each class below holds all three.

A plain YAML list is not one of these: it keeps PBT's list meaning (shift to a neighbour) and is
handled by :class:`Grid`, which :func:`as_distribution` wraps around it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune

from rl_pbt.errors import ConfigError
from rl_pbt.values import finite


class Distribution:
    """Base class: a sampler with bounds that also knows its Tune domain."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __call__(self) -> Any:
        """Draw one value with Python's ``random`` (PBT seeds and calls it this way)."""
        raise NotImplementedError

    def to_tune(self) -> Any:
        """Return the Tune search-space domain used for the trial's first value."""
        raise NotImplementedError

    def for_pbt(self) -> Any:
        """Return what ``PopulationBasedTraining(hyperparam_mutations=...)`` should get."""
        return self

    def describe(self) -> dict[str, Any]:
        """Plain facts for files and plots: kind, bounds, scale."""
        return {"type": type(self).__name__, "low": self.low, "high": self.high,
                "log": self.log, "integer": self.integer}

    def clamp(self, value: Any) -> Any:
        """Bring a perturbed value back into ``[low, high]``; integers stay integers."""
        bounded = min(max(value, self.low), self.high)
        return round(bounded) if self.integer else float(bounded)


def _check_range(name: str, low: float, high: float, log: bool) -> None:
    for label, value in (("low", low), ("high", high)):
        if finite(value) is None:
            raise ConfigError(f"{name}: {label} must be a finite number, got {value!r}")
    if low > high:
        raise ConfigError(f"{name}: low={low} is greater than high={high}; need low <= high")
    if log and low <= 0:
        raise ConfigError(f"{name}: log scale needs low > 0, got low={low}")


@dataclass(frozen=True)
class Uniform(Distribution):
    """A float drawn uniformly from ``[low, high]``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_range(type(self).__name__, self.low, self.high, self.log)

    def __call__(self) -> float:
        return random.uniform(self.low, self.high)

    def to_tune(self) -> Any:
        return tune.uniform(self.low, self.high)


@dataclass(frozen=True)
class LogUniform(Distribution):
    """A float whose logarithm is uniform: the usual prior for learning rates."""

    low: float
    high: float
    log = True

    def __post_init__(self) -> None:
        _check_range(type(self).__name__, self.low, self.high, self.log)

    def __call__(self) -> float:
        return math.exp(random.uniform(math.log(self.low), math.log(self.high)))

    def to_tune(self) -> Any:
        return tune.loguniform(self.low, self.high)


@dataclass(frozen=True)
class RandInt(Distribution):
    """An integer from ``low`` to ``high``, both included (as Python's ``random.randint``)."""

    low: int
    high: int
    integer = True

    def __post_init__(self) -> None:
        _check_integers(type(self).__name__, self.low, self.high)
        _check_range(type(self).__name__, self.low, self.high, self.log)

    def __call__(self) -> int:
        return random.randint(self.low, self.high)

    def to_tune(self) -> Any:
        # Tune's randint excludes the upper bound.
        return tune.randint(self.low, self.high + 1)


@dataclass(frozen=True)
class LogRandInt(Distribution):
    """An integer whose logarithm is uniform: batch sizes that span orders of magnitude."""

    low: int
    high: int
    integer = True
    log = True

    def __post_init__(self) -> None:
        _check_integers(type(self).__name__, self.low, self.high)
        _check_range(type(self).__name__, self.low, self.high, self.log)

    def __call__(self) -> int:
        draw = math.exp(random.uniform(math.log(self.low), math.log(self.high + 1)))
        return min(int(draw), self.high)

    def to_tune(self) -> Any:
        return tune.lograndint(self.low, self.high + 1)


@dataclass(frozen=True)
class Choice(Distribution):
    """One of ``values``, resampled at random (no neighbour shifting, unlike a plain list)."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _plain_values(type(self).__name__, self.values))

    @property
    def low(self) -> Any:  # type: ignore[override]
        return min(self.values)

    @property
    def high(self) -> Any:  # type: ignore[override]
        return max(self.values)

    @property
    def integer(self) -> bool:  # type: ignore[override]
        return all(isinstance(v, int) and not isinstance(v, bool) for v in self.values)

    def __call__(self) -> Any:
        return random.choice(self.values)

    def to_tune(self) -> Any:
        return tune.choice(list(self.values))

    def clamp(self, value: Any) -> Any:
        """Keep a listed value; snap anything else to the nearest listed number."""
        if value in self.values:
            return value
        return min(self.values, key=lambda v: abs(v - value))


@dataclass(frozen=True)
class Grid(Choice):
    """A plain YAML list: PBT shifts the value to a neighbouring entry when it perturbs it."""

    def for_pbt(self) -> list[Any]:
        return list(self.values)


def _check_integers(name: str, low: Any, high: Any) -> None:
    for label, value in (("low", low), ("high", high)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name}: {label} must be an integer, got {value!r}")


def _plain_values(name: str, values: Sequence[Any]) -> tuple[Any, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"{name}: values must be a list, got {values!r}")
    if len(values) == 0:
        raise ConfigError(f"{name}: values is empty; give at least one value")
    return tuple(values)




def as_distribution(spec: Any) -> Distribution:
    """Turn an instantiated spec or a plain list into a :class:`Distribution`."""
    if isinstance(spec, Distribution):
        return spec
    if isinstance(spec, (list, tuple)):
        return Grid(spec)
    raise ConfigError(
        f"expected a distribution spec (_target_: rl_pbt.distributions.Uniform, ...) "
        f"or a list, got {spec!r}"
    )


#: The classes a spec's ``_target_`` may name (:class:`Grid` is what a plain list becomes).
KINDS = (Uniform, LogUniform, RandInt, LogRandInt, Choice)

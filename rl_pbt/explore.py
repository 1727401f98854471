"""PBT's explore step, made safe: perturbed values stay in bounds and keep the algorithm valid.

Ray's built-in perturbation multiplies by 1.2 or 0.8, which walks out of the declared range and
can break an algorithm's invariants (a minibatch larger than its batch). This runs after it, as
``custom_explore_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rl_pbt.distributions import Distribution


@dataclass(frozen=True)
class Explore:
    """A picklable ``custom_explore_fn``: clamp every mutated key, then apply invariants.

    Attributes:
        mutations: key -> the distribution whose bounds the value must stay in.
        invariants: the algorithm's repair function (see ``rl_pbt.algorithms``).
    """

    mutations: Mapping[str, Distribution]
    invariants: Callable[[dict[str, Any]], dict[str, Any]]

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, dist in self.mutations.items():
            if key in config:
                config[key] = dist.clamp(config[key])
        return self.invariants(config)

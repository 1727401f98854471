"""Environments by gymnasium id or by ``module:Class``, the same way in the driver and trials."""

from __future__ import annotations

from functools import partial
from typing import Any

import gymnasium as gym

from rl_pbt.algorithms import import_object
from rl_pbt.plan import EnvSpec


def make_from_entry_point(entry_point: str, env_config: dict[str, Any]) -> gym.Env:
    """Build the class named by ``entry_point`` with ``env_config`` as keyword arguments."""
    return import_object(entry_point)(**dict(env_config))


def register(env: EnvSpec) -> None:
    """Make an entry-point env known to RLlib under ``env.rllib_name`` (gym ids need nothing).

    Ray's registry lives in the cluster, so trial processes find the creator too.
    """
    if not env.entry_point:
        return
    from ray.tune.registry import register_env

    register_env(env.rllib_name, partial(make_from_entry_point, env.entry_point))

"""The ``scheduler`` group's knobs, checked with messages that say what each scheduler takes.

Ray asserts some of these deep inside a scheduler's constructor, after Ray has started; checked
here, bad knobs end in one :class:`~rl_pbt.errors.ConfigError` before anything runs.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Mapping
from typing import Any

from rl_pbt.distributions import Choice, Distribution
from rl_pbt.errors import ConfigError
from rl_pbt.plan import SchedulerSpec
from rl_pbt.values import finite, first_line

SCHEDULERS = ("pbt", "pb2", "asha", "random", "fifo")
PBT_OPTIONS = ("time_attr", "perturbation_interval", "burn_in_period", "quantile_fraction",
               "resample_probability", "perturbation_factors", "log_config", "synch")
#: What ``ray.tune.schedulers.pb2.PB2`` takes of PBT's knobs (it picks values, never resamples).
PB2_OPTIONS = ("time_attr", "perturbation_interval", "quantile_fraction", "log_config", "synch")
ASHA_OPTIONS = ("time_attr", "max_t", "grace_period", "reduction_factor")
#: Each scheduler's name in messages and the options it accepts (fifo ignores any).
SCHEDULER_OPTIONS = {"pbt": ("PBT", PBT_OPTIONS), "pb2": ("PB2", PB2_OPTIONS),
                     "asha": ("ASHA", ASHA_OPTIONS), "random": ("random search", ())}
#: Schedulers whose trials draw every mutated key once, whatever ``mutations.start`` says:
#: their search is that draw.
DRAW_ONCE = ("random", "asha")
#: Population-based schedulers: they exploit (a trial takes another's checkpoint), so they need
#: two trials, and pause trials to let others take their turn.
POPULATION_BASED = ("pbt", "pb2")
#: Modules PB2 imports beyond Ray, and the package that provides each.
PB2_MODULES = {"sklearn": "scikit-learn"}
#: Result keys that grow with training: PBT's clock.
TIME_ATTRS = ("training_iteration", "time_total_s", "num_env_steps_sampled_lifetime",
              "env_runners/num_env_steps_sampled_lifetime")


def resolve_scheduler(
    scheduler: Mapping[str, Any], population: int,
    mutations: Mapping[str, Distribution] | None = None,
) -> SchedulerSpec:
    """Check the scheduler's knobs with messages that say what is accepted.

    Args:
        scheduler: the ``scheduler`` group as plain data.
        population: trials; PBT and PB2 need two to exploit.
        mutations: the mutated keys, which PB2 needs as numeric ranges.
    """
    name = scheduler.get("name")
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name: unknown {name!r}; known: {', '.join(SCHEDULERS)}")
    if name == "fifo":
        return SchedulerSpec(name, {})
    options = {k: v for k, v in scheduler.items() if k != "name"}
    label, allowed = SCHEDULER_OPTIONS[name]
    _check_known_options(options, label, allowed)
    if name in POPULATION_BASED and population < 2:
        raise ConfigError(f"population: {label} needs at least 2 trials, got {population}")
    if name == "pb2":
        _check_pb2_ready(mutations or {})
    if name == "asha":
        _check_asha(options)
    elif allowed:
        _check_pbt(options, allowed)
    return SchedulerSpec(name, options)


def _check_known_options(options: Mapping[str, Any], label: str, allowed: tuple[str, ...]) -> None:
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = f"known: {', '.join(allowed)}" if allowed else "it takes none"
            article = "an" if label[0] in "AEIOU" else "a"
            raise ConfigError(f"scheduler.{key}: not {article} {label} option; {hint}{known}")


def _check_time_attr(options: Mapping[str, Any]) -> None:
    if options.get("time_attr") not in TIME_ATTRS:
        raise ConfigError(f"scheduler.time_attr: unknown {options.get('time_attr')!r}; "
                          f"choose from {', '.join(TIME_ATTRS)}")


def _check_pbt(options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """PBT's knobs, or the subset PB2 takes; every one the scheduler accepts must be set."""
    _check_time_attr(options)
    for key in ("log_config", "synch"):
        if not isinstance(options.get(key), bool):
            raise ConfigError(f"scheduler.{key}: must be true or false, got {options.get(key)!r}")
    _check_number(options, "perturbation_interval", low=0, low_open=True)
    _check_number(options, "quantile_fraction", low=0, high=0.5, low_open=True)
    if "burn_in_period" in allowed:
        _check_number(options, "burn_in_period", low=0)
    if "resample_probability" in allowed:
        _check_number(options, "resample_probability", low=0, high=1)
    if "perturbation_factors" in allowed:
        factors = options.get("perturbation_factors")
        if not (isinstance(factors, list) and factors
                and all(is_number(f) and f > 0 for f in factors)):
            raise ConfigError(  # PBT multiplies by them: 0 or less leaves the value's range
                f"scheduler.perturbation_factors: a list of numbers > 0 such as [1.2, 0.8], "
                f"got {factors!r}")
        options["perturbation_factors"] = tuple(factors)


def _check_pb2_ready(mutations: Mapping[str, Distribution]) -> None:
    """PB2 fits a Gaussian process over numeric ranges: no lists or choices, and scikit-learn."""
    for key, dist in mutations.items():
        if isinstance(dist, Choice):
            raise ConfigError(
                f"mutations.hyperparams.{key}: scheduler=pb2 needs numeric ranges (Uniform, "
                f"LogUniform, RandInt, LogRandInt), got a {type(dist).__name__}; use "
                "scheduler=pbt for lists and choices")
    missing = [package for module, package in PB2_MODULES.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(
            f"scheduler=pb2 needs {' and '.join(missing)}: pip install -e \".[pb2]\"")
    for module, package in PB2_MODULES.items():
        _check_imports(module, package)


def _check_imports(module: str, package: str) -> None:
    """An installed package that fails to import (a numpy it was not built for, a half-removed
    install) would end the run in a traceback where Ray builds PB2: one line here instead."""
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, or whatever its __init__ raises
        raise ConfigError(
            f"scheduler=pb2: {package} is installed but does not import "
            f"({type(err).__name__}: {first_line(err)}); "
            f"reinstall it: pip install --force-reinstall {package}") from None


def _check_asha(options: dict[str, Any]) -> None:
    """ASHA's knobs, with the ranges Ray's ``AsyncHyperBandScheduler`` asserts."""
    _check_time_attr(options)
    _check_number(options, "max_t", low=0, low_open=True)
    _check_number(options, "grace_period", low=0, low_open=True)
    _check_number(options, "reduction_factor", low=1, low_open=True)
    if options["grace_period"] > options["max_t"]:
        raise ConfigError(f"scheduler.grace_period: must be <= scheduler.max_t "
                          f"({options['max_t']}), got {options['grace_period']}")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or a string)."""
    return finite(value) is not None


def _check_number(
    options: Mapping[str, Any], key: str, low: float, high: float | None = None,
    low_open: bool = False,
) -> None:
    value = options.get(key)
    too_low = is_number(value) and (value <= low if low_open else value < low)
    too_high = is_number(value) and high is not None and value > high
    if not is_number(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}" + (
            "]" if high is not None else ")")
        raise ConfigError(f"scheduler.{key}: must be a number in {interval}, got {value!r}")

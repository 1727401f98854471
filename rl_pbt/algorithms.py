"""What rl_pbt knows about each RLlib algorithm: its valid keys, old names, and invariants.

RLlib's ``AlgorithmConfig.update_from_dict`` stores an unknown key without complaint, so a typo
or a Ray 2.3 name from the user guide silently does nothing. Every key is therefore checked here
against the algorithm's own ``to_dict()``; old names are translated with a warning, anything else
unknown is an error that names the closest valid key.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from rl_pbt.errors import ConfigError
from rl_pbt.values import is_numeric

log = logging.getLogger(__name__)

#: Ray 2.3 names (as in the user guide) -> today's RLlib names (new API stack, dict form).
OLD_NAMES: dict[str, str] = {
    "num_sgd_iter": "num_epochs",
    "sgd_minibatch_size": "minibatch_size",
    "train_batch_size": "train_batch_size_per_learner",
    "num_workers": "num_env_runners",
    "num_envs_per_worker": "num_envs_per_env_runner",
    "num_cpus_per_worker": "num_cpus_per_env_runner",
    "num_cpus": "num_cpus_for_main_process",
    "num_gpus": "num_gpus_per_learner",
    "model": "_model_config",
}

#: Today's names that the dict form spells differently; translated without a warning.
SPELLINGS: dict[str, str] = {"model_config": "_model_config", "lambda_": "lambda"}

#: Keys rl_pbt sets itself from other config groups; a user never writes them under
#: ``algorithm.config``.
MANAGED_KEYS = frozenset({"env", "env_config"})


@dataclass(frozen=True)
class AlgorithmSpec:
    """One RLlib algorithm as rl_pbt uses it.

    Attributes:
        name: RLlib's name for it (``PPO``), used in run names and tags.
        algorithm_class: import path of the RLlib ``Algorithm`` subclass.
        config_class: import path of its ``AlgorithmConfig`` subclass (the source of valid keys).
        invariants: repairs a config dict after PBT perturbed it (e.g. minibatch <= batch).
        check: rejects a search space that can never satisfy the invariants.
    """

    name: str
    algorithm_class: str
    config_class: str
    invariants: Callable[[dict[str, Any]], dict[str, Any]]
    check: Callable[..., None]


def import_object(path: str) -> Any:
    """Import ``package.module.Name`` or ``package.module:Name``."""
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cannot import {path!r}: {err}") from None


@cache
def _defaults(config_class: str) -> dict[str, Any]:
    """The algorithm config's ``to_dict()``: every key with RLlib's default value."""
    return import_object(config_class)().to_dict()


@cache
def valid_keys(config_class: str) -> frozenset[str]:
    """Return every key the algorithm's config accepts in dict form.

    ``to_dict()`` names some keys by their private attribute (``_train_batch_size_per_learner``);
    the public name is accepted too where a settable property of that name exists. Keys whose
    value is RLlib's ``DEPRECATED_VALUE`` are stored and ignored, so they are not valid.
    """
    from ray._common.deprecation import DEPRECATED_VALUE

    cls = import_object(config_class)
    defaults = _defaults(config_class)
    keys = {k for k, v in defaults.items() if not _is_deprecated(v, DEPRECATED_VALUE)}
    for key in list(keys):
        public = getattr(cls, key.lstrip("_"), None)
        if key.startswith("_") and isinstance(public, property) and public.fset is not None:
            keys.add(key.lstrip("_"))
    return frozenset(keys)


def _is_deprecated(value: Any, marker: Any) -> bool:
    return isinstance(value, type(marker)) and not isinstance(value, bool) and value == marker


def translate_keys(config: Mapping[str, Any], config_class: str, where: str) -> dict[str, Any]:
    """Return ``config`` with old names renamed; raise on any key the algorithm does not know.

    Args:
        config: keys as the user wrote them.
        config_class: import path of the algorithm's ``AlgorithmConfig``.
        where: the config path shown in messages (``algorithm.config``).
    """
    known = valid_keys(config_class)
    out: dict[str, Any] = {}
    written: dict[str, str] = {}  # today's key -> the name it was written as
    for key, value in config.items():
        new_key = OLD_NAMES.get(key, key)
        if key in SPELLINGS:
            new_key = SPELLINGS[key]
        elif new_key != key:
            log.warning("%s.%s is an old RLlib name; using %s", where, key, new_key)
        if new_key not in known or new_key in MANAGED_KEYS:
            raise ConfigError(unknown_key_message(where, key, known - MANAGED_KEYS))
        if new_key in out:
            key, value = _old_name_wins(where, new_key, (written[new_key], out[new_key]),
                                        (key, value))
        out[new_key], written[new_key] = value, key
    return out


def _old_name_wins(where: str, new_key: str, first: tuple[str, Any],
                   second: tuple[str, Any]) -> tuple[str, Any]:
    """A key set under another name (an old name, or a spelling such as ``lambda_``) and its
    dict-form name: the other name and its value, which a user adds
    (``+algorithm.config.num_sgd_iter=5``) over the YAML's key, as the guide wrote it. Two
    other names of one key are an error."""
    old = [pair for pair in (first, second) if pair[0] in OLD_NAMES or pair[0] in SPELLINGS]
    if len(old) != 1:
        raise ConfigError(f"{where}: {first[0]} and {second[0]} both set; keep only {new_key}")
    kept = old[0]
    replaced = second if kept is first else first
    if replaced[1] != kept[1]:
        log.warning("%s: %s=%r replaces %s=%r", where, kept[0], kept[1], new_key, replaced[1])
    return kept


#: Keys whose number may also be a schedule, ``[[timestep, value], ...]`` (RLlib checks its form).
SCHEDULE_KEYS = frozenset({"lr", "entropy_coeff"})


#: Counts (``num_*`` keys) that must be at least 1; the others at least 0.
COUNT_MINIMUM = {"num_envs_per_env_runner": 1, "num_epochs": 1}


def check_values(config: Mapping[str, Any], config_class: str, where: str) -> None:
    """Reject a value of another kind than RLlib's number or true/false default for its key
    (``gamma=abc``, ``explore=5``).

    RLlib stores such a value without complaint and every trial then fails in its first
    update. Only number and true/false keys are checked, loosely where RLlib is: null passes,
    a number may be ``auto`` (some counts take it), ``lr`` and ``entropy_coeff`` a schedule.
    Keys with a string, mapping, list or null default take several kinds in RLlib
    (``input``: a string, list or mapping; ``policies``: a mapping or list) and are left to it.
    Distribution specs (``_target_``) are checked where they are instantiated.
    """
    defaults = _defaults(config_class)
    for key, value in config.items():
        if value is None or (isinstance(value, Mapping) and "_target_" in value):
            continue
        default = defaults.get(key, defaults.get("_" + key))
        expected = _expected_kind(key, default, value)
        if expected:
            raise ConfigError(f"{where}.{key}: must be {expected}, got {value!r}")


def _expected_kind(key: str, default: Any, value: Any) -> str | None:
    """What ``value`` (not null) should be, given RLlib's default for ``key``; None if it is."""
    number = is_numeric(value)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, (int, float)):
        if key in SCHEDULE_KEYS:
            ok = number or _is_schedule(value)
            return None if ok else "a number or a schedule [[0, value], [timestep, value], ...]"
        if number and key.startswith("num_") and value < COUNT_MINIMUM.get(key, 0):
            return f"a count >= {COUNT_MINIMUM.get(key, 0)}"  # RLlib fails in each trial
        return None if number or value == "auto" else "a number"
    return None


def _is_schedule(value: Any) -> bool:
    """Two or more ``[timestep, value]`` pairs of numbers (RLlib checks the first is at 0)."""
    return isinstance(value, (list, tuple)) and len(value) >= 2 and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(is_numeric, pair))
        for pair in value)


def unknown_key_message(where: str, key: str, known: frozenset[str]) -> str:
    """Say which key is unknown and which valid key is closest (old names point to new ones)."""
    candidates = sorted(known | set(OLD_NAMES))
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:
        return f"{where}.{key}: unknown key for this algorithm; see its AlgorithmConfig"
    new = OLD_NAMES.get(close[0])
    hint = f"{new!r} (Ray 2.3 called it {close[0]!r})" if new else repr(close[0])
    return f"{where}.{key}: unknown key for this algorithm; did you mean {hint}?"


def ppo_invariants(config: dict[str, Any]) -> dict[str, Any]:
    """Keep PPO's SGD settings consistent: 1 <= minibatch <= train batch, epochs >= 1.

    PBT perturbs each key on its own, so a doubled minibatch can overtake a halved batch;
    RLlib would then reject the config and the trial would fail.
    """
    batch = config.get("train_batch_size_per_learner")
    if batch is not None:
        config["train_batch_size_per_learner"] = max(int(batch), 1)
    if "minibatch_size" in config and config["minibatch_size"] is not None:
        minibatch = max(int(config["minibatch_size"]), 1)
        if batch is not None:
            minibatch = min(minibatch, config["train_batch_size_per_learner"])
        config["minibatch_size"] = minibatch
    if "num_epochs" in config:
        config["num_epochs"] = max(int(config["num_epochs"]), 1)
    return config


#: PPO's keys with a meaningful range: (lowest allowed, highest allowed, low end included).
#: RLlib takes any number and trains nonsense (gamma=2) or nothing (lr=-1).
PPO_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "gamma": (0.0, 1.0, True), "lambda": (0.0, 1.0, True), "lr": (0.0, None, False),
    "clip_param": (0.0, None, False), "kl_coeff": (0.0, None, True),
    "entropy_coeff": (0.0, None, True), "vf_loss_coeff": (0.0, None, True),
}


def _check_ranges(bounds: Mapping[str, Any]) -> None:
    for key, (low, high, inclusive) in PPO_RANGES.items():
        lowest, highest = bounds.get(key) or (None, None)
        if not is_numeric(lowest) or not is_numeric(highest):
            continue
        below = lowest < low if inclusive else lowest <= low
        if below or (high is not None and highest > high):
            bad = lowest if below else highest
            need = (f"{low:g} <= {key} <= {high:g}" if high is not None else
                    f"{key} {'>=' if inclusive else '>'} {low:g}")
            raise ConfigError(f"{key}: a value can be {bad:g}; PPO needs {need}")


def ppo_check(bounds: Mapping[str, Any], first: Mapping[str, Any] | None = None) -> None:
    """Reject a search space where minibatch_size can exceed the train batch, or a key can
    leave its range (:data:`PPO_RANGES`).

    Args:
        bounds: key -> (lowest, highest) value the key can take over the run.
        first: the same for the first draw only. The explore step repairs perturbed values,
            but a trial's first config goes to RLlib as drawn, so it must be valid already.
    """
    minibatch = bounds.get("minibatch_size")
    batch = bounds.get("train_batch_size_per_learner")
    if minibatch and batch and minibatch[0] is not None and minibatch[0] > batch[1]:
        raise ConfigError(
            f"minibatch_size: smallest value {minibatch[0]} is larger than the largest "
            f"train_batch_size_per_learner {batch[1]}; need minibatch_size <= train batch"
        )
    start_mb, start_batch = (first or {}).get("minibatch_size"), (first or {}).get(
        "train_batch_size_per_learner")
    if start_mb and start_batch and start_mb[1] > start_batch[0]:
        raise ConfigError(
            f"minibatch_size: a first draw can be {start_mb[1]}, above the smallest first "
            f"train_batch_size_per_learner {start_batch[0]}; lower minibatch_size's high or "
            "raise the train batch's low"
        )
    _check_ranges(bounds)
    epochs = bounds.get("num_epochs")
    if epochs and epochs[1] < 1:
        raise ConfigError(f"num_epochs: highest value {epochs[1]} is below 1; need >= 1")
    for key in ("num_epochs", "minibatch_size", "train_batch_size_per_learner"):
        low = ((first or {}).get(key) or (None, None))[0]
        if low is not None and low < 1:  # a first config goes to RLlib unrepaired
            raise ConfigError(f"{key}: a first value can be {low}; RLlib needs >= 1")


#: Invariants per algorithm name. An algorithm without an entry needs only its YAML file.
RULES: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], Callable[..., None]]] = {
    "PPO": (ppo_invariants, ppo_check),
}


def algorithm_spec(name: str, algorithm_class: str, config_class: str) -> AlgorithmSpec:
    """Build the spec from the algorithm's YAML fields plus its rules, if it has any."""
    invariants, check = RULES.get(name, (_unchanged, _no_check))
    return AlgorithmSpec(name, algorithm_class, config_class, invariants, check)


def _unchanged(config: dict[str, Any]) -> dict[str, Any]:
    return config


def _no_check(bounds: Mapping[str, Any], first: Mapping[str, Any] | None = None) -> None:
    return None

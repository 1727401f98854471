"""What PBT may rank trials by: keys of RLlib's results, and Ray 2.3's names for some of them.

A metric no result carries ranks nothing: PBT then makes no exploit, and the run ends with
every trial "unscored". The user guide (Ray 2.3) ranked by ``episode_reward_mean``; today's
RLlib reports ``env_runners/episode_return_mean``.
"""

from __future__ import annotations

from typing import Any

from rl_pbt.errors import ConfigError

#: Ray 2.3's names of the episode metrics (the user guide's) -> today's.
OLD_METRICS = {"episode_reward_mean": "env_runners/episode_return_mean",
               "episode_reward_max": "env_runners/episode_return_max",
               "episode_reward_min": "env_runners/episode_return_min",
               "episode_len_mean": "env_runners/episode_len_mean"}
#: RLlib's episode metrics under env_runners/ (a callback may log more there).
EPISODE_METRICS = tuple(f"env_runners/episode_{kind}_{stat}" for kind in ("return", "len")
                        for stat in ("mean", "max", "min"))


#: First parts of nested result keys that are not among RLlib's metric names.
EXTRA_GROUPS = ("perf", "env_runner_group", "config", "rl_pbt")


def _rllib_metric_names() -> frozenset[str]:
    """Every name RLlib's metrics module defines (``episode_return_mean``, ``env_runners``,
    ``learners``, ...): the parts its results are made of."""
    import ray.rllib.utils.metrics as names

    return frozenset(value for key, value in vars(names).items()
                     if key.isupper() and isinstance(value, str))


def _check_nested(metric: str) -> None:
    """The group (first part) must be one of RLlib's results, and a key right under
    ``env_runners/`` one RLlib's env runner reports: rl_pbt adds no callbacks that could log
    others there, and a misspelt return (``env_runners/episode_retrun_mean``) trained a whole
    run that ranked nothing."""
    import difflib

    names = _rllib_metric_names()
    parts = metric.split("/")
    if parts[0] not in names and parts[0] not in EXTRA_GROUPS:
        close = difflib.get_close_matches(parts[0], [*names, *EXTRA_GROUPS], n=1, cutoff=0.8)
        hint = f"; did you mean {'/'.join([close[0], *parts[1:]])!r}?" if close else (
            f"; RLlib reports returns as {EPISODE_METRICS[0]}")
        raise ConfigError(f"metric: {metric!r}: RLlib's results have no {parts[0]!r}{hint}")
    if len(parts) == 2 and parts[0] == "env_runners" and parts[1] not in names:
        close = difflib.get_close_matches(parts[1], sorted(names), n=3, cutoff=0.7)
        hint = ("did you mean " + " or ".join(repr(f"env_runners/{c}") for c in close) + "?"
                if close else f"returns are {EPISODE_METRICS[0]} (or _max, _min)")
        raise ConfigError(f"metric: {metric!r} is not a key RLlib's env runners report; {hint}")


def _top_level_keys() -> tuple[str, ...]:
    """Tune's keys at the top of every result (``AUTO_RESULT_KEYS``); RLlib adds its counters
    there (``num_...``), which :func:`check_metric` lets through by name."""
    from ray.tune.result import AUTO_RESULT_KEYS

    return tuple(AUTO_RESULT_KEYS)


def check_metric(metric: Any) -> str:
    """The metric PBT ranks by must be a key of RLlib's results: a misspelt one ranked
    nothing, made no exploit, and the summary blamed unfinished episodes.

    Nested keys (``a/b``) must start with one of RLlib's result groups, and a key right under
    ``env_runners/`` must be one the env runner reports (:func:`_check_nested`); deeper keys
    (a learner's statistics, evaluation's) pass. A Ray 2.3 name half carried over
    (``env_runners/episode_reward_mean``) names today's. A key without ``/`` must be one Tune
    or RLlib puts at the top of every result."""
    import difflib

    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"metric: must be a result key such as {EPISODE_METRICS[0]}, "
                          f"got {metric!r}")
    if metric in OLD_METRICS:
        raise ConfigError(f"metric: {metric!r} is Ray 2.3's name; today's RLlib reports "
                          f"{OLD_METRICS[metric]}")
    if "/" in metric:
        name = metric.rpartition("/")[2]
        renamed = metric.replace("reward", "return")
        if "reward" in name and renamed != metric and renamed.endswith(EPISODE_METRICS):
            raise ConfigError(f"metric: {metric!r} is not a key of RLlib's results (Ray 2.3 "
                              f"said reward); did you mean {renamed!r}?")
        _check_nested(metric)
        return metric
    top = _top_level_keys()
    if metric in top or metric.startswith("num_"):
        return metric
    close = difflib.get_close_matches(metric, top, n=1, cutoff=0.8)
    hint = f"did you mean {close[0]!r}?" if close else (
        f"RLlib reports returns as {EPISODE_METRICS[0]} (or _max, _min); nested keys are "
        "written a/b")
    raise ConfigError(f"metric: {metric!r} is not a key of RLlib's results; {hint}")

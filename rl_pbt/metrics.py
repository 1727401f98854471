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


def _top_level_keys() -> tuple[str, ...]:
    """Tune's keys at the top of every result (``AUTO_RESULT_KEYS``); RLlib adds its counters
    there (``num_...``), which :func:`check_metric` lets through by name."""
    from ray.tune.result import AUTO_RESULT_KEYS

    return tuple(AUTO_RESULT_KEYS)


def check_metric(metric: Any) -> str:
    """The metric PBT ranks by must be a key of RLlib's results: a misspelt one ranked
    nothing, made no exploit, and the summary blamed unfinished episodes.

    Nested keys (``a/b``) are RLlib's many metrics, a callback's or evaluation's, and pass,
    but for a Ray 2.3 name half carried over (``env_runners/episode_reward_mean``). A key
    without ``/`` must be one Tune or RLlib puts at the top of every result."""
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
        return metric
    top = _top_level_keys()
    if metric in top or metric.startswith("num_"):
        return metric
    close = difflib.get_close_matches(metric, top, n=1, cutoff=0.8)
    hint = f"did you mean {close[0]!r}?" if close else (
        f"RLlib reports returns as {EPISODE_METRICS[0]} (or _max, _min); nested keys are "
        "written a/b")
    raise ConfigError(f"metric: {metric!r} is not a key of RLlib's results; {hint}")

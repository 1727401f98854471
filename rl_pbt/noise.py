"""Warnings of Ray and RLlib that say nothing to an rl_pbt user, dropped by their message.

Each entry names a logger and a fragment of the one message dropped; every other warning of
that logger still shows. Tune's "Remote file not found" on every PBT resume (its whole logger
is quieted) reports the result.json sync gap that ``rl_pbt.records`` works around.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class _Drop(logging.Filter):
    """Drops a logger's records whose message contains ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


#: The dropped warnings, by logger.
NOISE = {
    # At every config check: the stack rl_pbt is built on.
    "ray.rllib.algorithms.algorithm_config": _Drop(
        "on the new API stack! This is the new default"),
    # When a first iteration ends before any episode (Pendulum's 200-step episodes in a
    # 3072-step batch over 16 envs), with the whole result: 20 KB. PBT waits for a result with a
    # return either way; rl_pbt's progress lines and summary say "no episode finished".
    "ray.tune.schedulers.pbt": _Drop("Cannot find metric"),
    # RLlib's own checkpoints pass the deprecated argument when a module is restored from them.
    "ray._common.deprecation": _Drop(
        "`RLModule(config=[RLModuleConfig object])` has been deprecated"),
    # At every start of a local Ray since Ray 2.5x: a safer default is on (token auth, with a
    # token it wrote to ~/.ray). Its opposite, "Token authentication is disabled", still shows.
    "ray._private.authentication.authentication_token_setup": _Drop(
        "Token authentication is enabled for this Ray cluster"),
    # After a Ctrl-C: Tune's way back (``Tuner.restore(path=..., trainable=...)``) would lose
    # rl_pbt's records and tracking; rl_pbt's next line gives the command that keeps them.
    "ray.tune.tune": _Drop("Resume experiment with: Tuner.restore"),
    # Tune's result tables, which rl_pbt does not read (its summary comes from its own
    # records): a trial that never ran before a wall-time budget ran out has no result file.
    "ray.tune.analysis.experiment_analysis": _Drop("Failed to fetch metrics for"),
}


#: Python warnings of Tune's that rl_pbt's own code answers, ignored during its ``fit`` only.
HANDLED_WARNINGS = (
    # PBT with checkpoint.num_to_keep <= 2 (at every run that sets it): a handed-over
    # checkpoint could be pruned before the exploited trial restores it. rl_pbt copies it into
    # that trial's folder at the exploit, or hands over the clone's newest (rl_pbt.handover).
    "Using `CheckpointConfig.num_to_keep <= 2` with PBT",
)


@contextmanager
def handled_warnings() -> Iterator[None]:
    """Ignore :data:`HANDLED_WARNINGS` inside the block; every other warning still shows."""
    with warnings.catch_warnings():
        for fragment in HANDLED_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(fragment))
        yield


def quiet_known_noise() -> None:
    """Add the filters (once: a logger keeps one of each) and quiet Tune's resume warning."""
    logging.getLogger("ray.tune.logger.logger").setLevel(logging.ERROR)
    for name, drop in NOISE.items():
        logging.getLogger(name).addFilter(drop)

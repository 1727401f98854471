"""An environment that fails on purpose, to see what a tuning run does when a trial crashes.

``env=entry_point env.entry_point=rl_pbt.faults:FlakyEnv`` with ``env.env_config`` naming the
wrapped gymnasium id, the step at which to raise, which trials fail and how often. A trial is
known by the index in its Tune folder name (``..._00001_...``): Tune runs each trial in its own
working directory, so the env can tell which trial it serves without any help from RLlib.
Failures are counted in files under ``state_dir``, so a trial retried in a new process knows
how often it failed already.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym

_TRIAL_INDEX = re.compile(r"_[0-9a-f]{5}_(\d{5})(?:_|$)")


def trial_index(folder: Path) -> int | None:
    """The trial's index from a Tune trial folder name, or None outside a trial."""
    match = _TRIAL_INDEX.search(folder.name)
    return int(match[1]) if match else None


class FlakyEnv(gym.Wrapper):
    """``gym.make(id)`` that raises ``RuntimeError`` at step ``fail_at_step`` of an episode run.

    Args:
        id: the gymnasium id to wrap.
        fail_at_step: steps of this env instance after which it raises.
        fail_trials: indices of the trials that fail (0 = the first trial).
        fail_times: failures per trial; after that the trial trains normally.
        state_dir: where failures are counted (any folder every trial process can write).
    """

    def __init__(self, id: str = "CartPole-v1", fail_at_step: int = 1000,
                 fail_trials: Sequence[int] = (0,), fail_times: int = 1,
                 state_dir: str = ".", **kwargs: Any) -> None:
        super().__init__(gym.make(id, **kwargs))
        self.fail_at_step = fail_at_step
        self.fail_times = fail_times
        index = trial_index(Path.cwd())
        self.counter = (Path(state_dir) / f"trial_{index:05d}.failures"
                        if index is not None and index in set(fail_trials) else None)
        self.steps = 0

    def step(self, action: Any) -> Any:
        self.steps += 1
        if self.counter is not None and self.steps == self.fail_at_step:
            failed = int(self.counter.read_text()) if self.counter.exists() else 0
            if failed < self.fail_times:
                self.counter.write_text(str(failed + 1))
                raise RuntimeError(f"FlakyEnv: injected failure {failed + 1} of "
                                   f"{self.fail_times} at step {self.steps}")
        return self.env.step(action)

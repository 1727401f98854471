"""The stop rule as a Tune ``Stopper``: the guide's rule plus env-step and wall-time budgets."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.stopper import Stopper

from rl_pbt.plan import StopRule
from rl_pbt.values import finite

log = logging.getLogger(__name__)

#: Lifetime env steps sampled by one trial, as RLlib's new API stack reports them.
ENV_STEPS = "env_runners/num_env_steps_sampled_lifetime"


def result_value(result: dict[str, Any], key: str) -> Any:
    """Read ``a/b/c`` from a nested or a flattened result dict."""
    if key in result:
        return result[key]
    node: Any = result
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def target_reached(value: Any, target: float | None, mode: str) -> bool:
    """True when a finite score is at or beyond the target in the direction of ``mode``."""
    if target is None or finite(value) is None:
        return False
    return value >= target if mode == "max" else value <= target


class RunningTrials(Callback):
    """The ids of the trials Tune is running, as of the start of its current step."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.ids = {trial.trial_id for trial in trials if trial.status == Trial.RUNNING}


class PlanStopper(Stopper):
    """Stop a trial at its iteration cap, its return target or its env-step budget;
    stop everything when the wall-time budget is spent.

    Tune's stop-all ends running trials without their end-of-run checkpoint, so after the
    budget ran out the best agent's checkpoint was iterations older than its reported return
    (a probe: 'return 315.5 ... 11 iterations', checkpoint of iteration 8). The trials running
    when it runs out therefore finish the iteration under way and are stopped on its result,
    which Tune saves; paused trials hold a checkpoint of their last result already. Waiting is
    bounded by :attr:`grace_s` (twice the longest iteration seen, plus 10 s). ``running``
    (a Tune callback) must be among the run's callbacks.
    """

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule
        self.started = time.monotonic()
        self.solved = False
        self.running = RunningTrials()
        self.longest_iteration_s = 0.0
        self._finishing: set[str] | None = None  # running when the budget ran out
        self._finishing_since = 0.0

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        rule = self.rule
        self.longest_iteration_s = max(self.longest_iteration_s,
                                       finite(result.get("time_this_iter_s")) or 0.0)
        iteration = result.get("training_iteration", 0)
        if rule.max_iterations is not None and iteration >= rule.max_iterations:
            return True
        if target_reached(result_value(result, rule.metric), rule.target_return, rule.mode):
            self.solved = True
            return True
        steps = result_value(result, ENV_STEPS)
        if rule.max_env_steps is not None and steps is not None and steps >= rule.max_env_steps:
            return True
        return self._budget_spent()  # the trial ends on this result, saved

    def stop_all(self) -> bool:
        if self.solved and self.rule.stop_all_at_target:
            return True
        if not self._budget_spent():
            return False
        now = time.monotonic()
        if self._finishing is None:
            self._finishing, self._finishing_since = set(self.running.ids), now
        waiting = self._finishing & self.running.ids
        timed_out = now - self._finishing_since >= self.grace_s
        if waiting and timed_out:
            log.warning("the wall-time budget's wait for the last iteration of %s ended after "
                        "%.0f s; their newest checkpoints are older than their last results",
                        ", ".join(sorted(waiting)), self.grace_s)
        return not waiting or timed_out

    @property
    def grace_s(self) -> float:
        """Longest wait for the running trials' last iteration after the budget ran out."""
        return 2 * self.longest_iteration_s + 10.0

    def may_start(self) -> bool:
        """Whether a waiting trial may start: not once the budget is spent."""
        return not self._budget_spent()

    def _budget_spent(self) -> bool:
        budget = self.rule.max_seconds
        return budget is not None and time.monotonic() - self.started >= budget

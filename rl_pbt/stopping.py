"""The stop rule as a Tune ``Stopper``: the guide's rule plus env-step and wall-time budgets."""

from __future__ import annotations

import time
from typing import Any

from ray.tune.stopper import Stopper

from rl_pbt.plan import StopRule
from rl_pbt.values import finite

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


class PlanStopper(Stopper):
    """Stop a trial at its iteration cap, its return target or its env-step budget;
    stop everything when the wall-time budget is spent."""

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule
        self.started = time.monotonic()
        self.solved = False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        rule = self.rule
        iteration = result.get("training_iteration", 0)
        if rule.max_iterations is not None and iteration >= rule.max_iterations:
            return True
        if target_reached(result_value(result, rule.metric), rule.target_return, rule.mode):
            self.solved = True
            return True
        steps = result_value(result, ENV_STEPS)
        return rule.max_env_steps is not None and steps is not None and (
            steps >= rule.max_env_steps
        )

    def stop_all(self) -> bool:
        if self.solved and self.rule.stop_all_at_target:
            return True
        budget = self.rule.max_seconds
        return budget is not None and time.monotonic() - self.started >= budget

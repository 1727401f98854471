"""torch's Adam without the TorchDynamo import that each of its methods starts with.

Every public method of torch's ``Optimizer`` (``add_param_group``, which the constructor calls,
``zero_grad``, ``state_dict``, ``load_state_dict``) and Adam's ``step`` are wrapped so that
``torch.compile`` can trace around them; the wrappers import ``torch._dynamo`` (with sympy and
the rest of the compiler) at the first call, 1.1 s of a trial's start here, for a learner that
is never compiled. :class:`EagerAdam` calls the same functions unwrapped: the same kernels in the
same order (bit-identical steps and state), so checkpoints of either load into the other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Adam, Optimizer


def _unwrapped(method: Callable[..., Any], qualname: str) -> Callable[..., Any]:
    """The function under torch's wrappers (``inspect.unwrap`` follows ``__wrapped__``; torch
    wraps ``Adam.step`` once more, with its profiler hook, when the first Adam is made), or the
    method as it is when what lies under is not torch's own ``qualname`` (another torch)."""
    inner = inspect.unwrap(method)
    return inner if getattr(inner, "__qualname__", None) == qualname else method


class EagerAdam(Adam):
    """``torch.optim.Adam`` whose methods skip the wrappers that import TorchDynamo.

    Not for ``torch.compile`` (the wrappers' graph breaks are what a compiled step needs):
    ``rl_pbt.learners`` uses torch's Adam when RLlib compiles the learner. Checked against
    torch's Adam bit for bit (``tests/test_optimizers.py``) for the torch this project pins.
    """

    add_param_group = _unwrapped(Optimizer.add_param_group, "Optimizer.add_param_group")
    zero_grad = _unwrapped(Optimizer.zero_grad, "Optimizer.zero_grad")
    state_dict = _unwrapped(Optimizer.state_dict, "Optimizer.state_dict")
    load_state_dict = _unwrapped(Optimizer.load_state_dict, "Optimizer.load_state_dict")
    _adam_step = _unwrapped(Adam.step, "Adam.step")

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Adam's step with grad mode as torch's wrapper sets it (off unless differentiable)."""
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return self._adam_step(closure)

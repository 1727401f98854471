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
from torch.optim import optimizer as optimizer_module


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
    _torch_zero_grad = _unwrapped(Optimizer.zero_grad, "Optimizer.zero_grad")
    state_dict = _unwrapped(Optimizer.state_dict, "Optimizer.state_dict")
    load_state_dict = _unwrapped(Optimizer.load_state_dict, "Optimizer.load_state_dict")
    _adam_step = _unwrapped(Adam.step, "Adam.step")

    def _plain_step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Adam's step with grad mode as torch's wrapper sets it (off unless differentiable)."""
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return self._adam_step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; with ``set_to_none`` (RLlib's call, torch's default) and no
        profiler running, without the profiler range torch opens around it: 0.8 against 8 us
        for CartPole's 12 tensors, once per minibatch."""
        if not set_to_none or torch.autograd._profiler_enabled():
            return self._torch_zero_grad(set_to_none)
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None
        return None

    #: The plain step inside torch's step wrapper: step hooks and the profiler's label.
    _hooked_step = Optimizer.profile_hook_step(_plain_step)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Adam's step; through torch's step wrapper only when a step hook is registered (on
        this optimizer or globally) or torch's profiler runs. The wrapper costs 10 us per step
        here (a profiler range and the hook lookups): 0.5 ms of a CartPole update."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or optimizer_module._global_optimizer_pre_hooks
                or optimizer_module._global_optimizer_post_hooks
                or torch.autograd._profiler_enabled()):
            return self._hooked_step(closure)
        return self._plain_step(closure)

    # torch's constructor wraps a class's step with that wrapper unless it is marked hooked.
    step.hooked = True  # type: ignore[attr-defined]

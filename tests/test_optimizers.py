"""EagerAdam: torch's Adam step for step and state for state, without importing TorchDynamo."""

from __future__ import annotations

import subprocess
import sys

import torch

from rl_pbt.optimizers import EagerAdam


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _train(optimizer_class: type, steps: int, state: dict | None = None):
    """A few steps from the same weights and batches; the weights and the optimizer's state."""
    net = _net()
    optimizer = optimizer_class(net.parameters(), lr=1e-2, fused=True)
    if state is not None:
        optimizer.load_state_dict(state)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = net(torch.randn(32, 4, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()], optimizer.state_dict()


def _assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for key, values in ours["state"].items():
        for name, value in values.items():
            assert torch.equal(value, theirs["state"][key][name]), name


def test_steps_and_state_are_torchs_adam_bit_for_bit():
    ours, our_state = _train(EagerAdam, 5)
    theirs, their_state = _train(torch.optim.Adam, 5)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    _assert_same_state(our_state, their_state)


def test_each_loads_the_others_state():
    """A checkpoint of either optimizer restores into the other (RLlib saves ``state_dict``)."""
    _, saved_by_torch = _train(torch.optim.Adam, 3)
    _, saved_by_ours = _train(EagerAdam, 3)
    _, ours = _train(EagerAdam, 2, state=saved_by_torch)
    _, theirs = _train(torch.optim.Adam, 2, state=saved_by_ours)
    _assert_same_state(ours, theirs)


def test_it_never_imports_torchs_compiler():
    """Making, stepping, saving and loading it leaves ``torch._dynamo`` unimported."""
    code = """
import sys, torch
from rl_pbt.optimizers import EagerAdam
net = torch.nn.Linear(3, 2)
opt = EagerAdam(net.parameters(), fused=True)
net(torch.ones(4, 3)).sum().backward()
opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_step_hooks_and_the_profiler_see_its_steps_as_torchs():
    """Its step skips torch's step wrapper only while nothing would see it: a step hook of its
    own or a global one runs as on torch's Adam, and torch's profiler gets the step's and
    zero_grad's ranges."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    calls: dict[str, list[str]] = {"ours": [], "torch's": []}
    for name, optimizer_class in (("ours", EagerAdam), ("torch's", torch.optim.Adam)):
        net = _net()
        optimizer = optimizer_class(net.parameters(), fused=True)
        seen = calls[name]
        net(torch.ones(2, 4)).sum().backward()
        optimizer.step()  # no hook yet
        own = optimizer.register_step_pre_hook(lambda *_, seen=seen: seen.append("own pre"))
        pre = register_optimizer_step_pre_hook(lambda *_, seen=seen: seen.append("pre"))
        post = register_optimizer_step_post_hook(lambda *_, seen=seen: seen.append("post"))
        try:
            optimizer.step()
        finally:
            for handle in (own, pre, post):
                handle.remove()
        optimizer.step()  # hooks gone
    assert calls["ours"] == calls["torch's"] == ["pre", "own pre", "post"]

    net = _net()
    optimizer = EagerAdam(net.parameters(), fused=True)
    net(torch.ones(2, 4)).sum().backward()
    with torch.profiler.profile() as profile:
        optimizer.step()
        optimizer.zero_grad()
    names = {event.name for event in profile.events()}
    assert {"Optimizer.step#EagerAdam.step", "Optimizer.zero_grad#EagerAdam.zero_grad"} <= names


def test_zero_grad_clears_as_torchs():
    """Without the profiler range: set_to_none drops every gradient; otherwise torch's own
    zeroing runs."""
    net = _net()
    optimizer = EagerAdam(net.parameters(), fused=True)
    net(torch.ones(2, 4)).sum().backward()
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in net.parameters())

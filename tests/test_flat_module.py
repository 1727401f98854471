"""The flat forward passes compute exactly what RLlib's default PPO module computes, and step
aside for modules they do not cover; the flat categorical draw is torch's."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical

from rl_pbt.flat_module import FlatPPOModule, sample_categorical


def _module(env_id: str, inference_only: bool = False, **model_config):
    config = PPOConfig().environment(env_id).rl_module(
        model_config={"fcnet_hiddens": [16, 8], **model_config})
    spec = config.get_rl_module_spec(env=gym.make(env_id))
    spec.inference_only = inference_only
    torch.manual_seed(0)
    return spec.build()


@pytest.mark.parametrize(("env_id", "model_config"), [
    ("CartPole-v1", {}),
    ("CartPole-v1", {"vf_share_layers": True, "fcnet_activation": "relu"}),
    ("Pendulum-v1", {}),  # a Gaussian head with its log stds clipped
    ("Pendulum-v1", {"vf_share_layers": True}),
])
def test_flat_passes_equal_the_modules_own(env_id, model_config):
    module = _module(env_id, **model_config)
    flat = FlatPPOModule.of(module)
    assert flat is not None and flat.trains
    obs = torch.randn(64, module.observation_space.shape[0]) * 3
    batch = {Columns.OBS: obs}
    assert torch.equal(flat.exploration(obs),
                       module._forward_exploration(batch)[Columns.ACTION_DIST_INPUTS])
    theirs = module._forward_train(batch)
    ours = flat.train(obs)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    their_values = module.compute_values(batch, embeddings=theirs[Columns.EMBEDDINGS])
    our_values = flat.values(ours[Columns.EMBEDDINGS])
    assert torch.equal(our_values, their_values)
    grads = []
    for out, values in ((theirs, their_values), (ours, our_values)):
        module.zero_grad()
        (out[Columns.ACTION_DIST_INPUTS].square().sum() + values.sum()).backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_weights_loaded_in_place_are_seen():
    module = _module("CartPole-v1")
    flat = FlatPPOModule.of(module)
    other = _module("CartPole-v1")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    module.load_state_dict(other.state_dict())
    obs = torch.randn(8, 4)
    assert torch.equal(flat.exploration(obs),
                       other._forward_exploration({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS])


def test_an_inference_only_module_gets_the_exploration_pass_only():
    module = _module("CartPole-v1", inference_only=True)
    flat = FlatPPOModule.of(module)
    assert flat is not None and not flat.trains
    obs = torch.randn(8, 4)
    assert torch.equal(flat.exploration(obs),
                       module._forward_exploration({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS])
    with pytest.raises(RuntimeError, match="no critic"):
        flat.train(obs)
    shared = FlatPPOModule.of(_module("CartPole-v1", inference_only=True, vf_share_layers=True))
    assert shared is not None and not shared.trains  # RLlib still builds its value head


class _OwnForward(DefaultPPOTorchRLModule):
    def _forward(self, batch, **kwargs):
        return super()._forward(batch, **kwargs)


def test_modules_it_does_not_cover_get_none():
    hooked = _module("CartPole-v1")
    hooked.pi.net.mlp[0].register_forward_hook(lambda *args: None)
    assert FlatPPOModule.of(hooked) is None
    assert FlatPPOModule.of(_module("CartPole-v1", use_lstm=True)) is None
    own = _module("CartPole-v1")
    own.__class__ = _OwnForward
    assert FlatPPOModule.of(own) is None
    backward_hooked = _module("CartPole-v1")
    backward_hooked.vf.net.mlp[0].register_full_backward_hook(lambda *args: None)
    assert FlatPPOModule.of(backward_hooked) is None
    patched = _module("CartPole-v1")
    patched._forward_exploration = lambda batch, **kwargs: {}  # as RLlib's compile() does
    assert FlatPPOModule.of(patched) is None
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert FlatPPOModule.of(_module("CartPole-v1")) is None
    finally:
        handle.remove()
    assert FlatPPOModule.of(_module("CartPole-v1")) is not None


def test_sample_categorical_draws_what_torchs_categorical_draws():
    logits = torch.randn(32, 3) * 4
    logits[0] = torch.tensor([0.0, -torch.inf, 1.0])  # an impossible action
    torch.manual_seed(5)
    dist = TorchCategorical.from_logits(logits)
    their_actions = dist.sample()
    their_logp = dist.logp(their_actions)
    their_next = torch.rand(3)
    torch.manual_seed(5)
    our_actions, our_logp = sample_categorical(logits)
    assert our_actions.dtype == their_actions.dtype
    assert torch.equal(our_actions, their_actions)
    assert torch.equal(our_logp, their_logp)
    assert torch.equal(torch.rand(3), their_next)  # the generator moved as much

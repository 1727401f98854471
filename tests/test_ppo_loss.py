"""rl_pbt's categorical loss terms are torch's Categorical terms: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rl_pbt.ppo_loss import _categorical_terms

#: Logits with a zero-probability action in one row, near-ties, and large magnitudes.
LOGITS = torch.tensor([[0.3, -1.2, 2.0], [-math.inf, 0.5, 0.1], [200.0, -200.0, 0.0],
                       [1e-3, 0.0, -1e-3]])
PREV = torch.tensor([[0.1, 0.1, 0.9], [0.4, -math.inf, 0.2], [-200.0, 200.0, 0.0],
                     [0.0, 0.0, 0.0]])
ACTIONS = torch.tensor([2, 1, 0, 1])


def _torchs(logits: torch.Tensor) -> tuple:
    """RLlib's PPO loss: distributions built first, then logp, KL (probabilities made lazily
    inside it) and entropy."""
    current = torch.distributions.Categorical(logits=logits, validate_args=False)
    previous = torch.distributions.Categorical(logits=PREV, validate_args=False)
    logp = current.log_prob(ACTIONS)
    return logp, torch.distributions.kl.kl_divergence(previous, current), current.entropy()


@pytest.mark.parametrize("with_kl", [True, False])
def test_values_and_gradients_are_torchs(with_kl):
    grads = []
    for terms in (_torchs, lambda x: _categorical_terms(x, PREV, ACTIONS, with_kl, True)):
        logits = LOGITS.clone().requires_grad_(True)
        logp, kl, entropy = terms(logits)
        values = [logp, entropy] + ([kl] if with_kl else [])
        total = logp.sum() + 0.01 * entropy.sum()
        if with_kl:
            total = total + torch.where(kl.isfinite(), kl, 0.0).sum()
        total.backward()
        grads.append(([v.detach() for v in values], logits.grad))
    (ours_values, our_grad), (their_values, their_grad) = grads[1], grads[0]
    for ours, theirs in zip(ours_values, their_values, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("with_kl", [True, False])
def test_without_an_entropy_term_the_entropy_stays_out_of_the_graph(with_kl):
    """PPO's default entropy_coeff=0: the same entropy for the statistics, no gradient path."""
    logits = LOGITS.clone().requires_grad_(True)
    logp, kl, entropy = _categorical_terms(logits, PREV, ACTIONS, with_kl, False)
    their_entropy = _torchs(LOGITS)[2]
    torch.testing.assert_close(entropy, their_entropy, rtol=0, atol=0, equal_nan=True)
    assert not entropy.requires_grad
    assert logp.requires_grad and (kl is None or kl.requires_grad)

"""PPO's loss as RLlib computes it, in fewer tensor operations per minibatch.

On CartPole's minibatches (256 rows, 64x64 networks) each torch operation costs more than its
arithmetic, and RLlib's loss (``PPOTorchLearner.compute_loss_for_module``) wraps the logits in
two distribution objects per minibatch and computes six statistics at every minibatch that
only the last one reports (they are logged with ``window=1``). Here a categorical policy's
terms are the same torch operations without the objects (torch's ``Categorical``: logits
normalised with ``logsumexp``, ``softmax`` probabilities, ``gather`` for the log-likelihood,
its KL rule including the zero-probability cases), other distributions go through RLlib's own
classes, and the statistics are computed once, by ``ppo_stats``, for the minibatch that counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from ray.rllib.algorithms.ppo.ppo import (
    LEARNER_RESULTS_KL_KEY,
    LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY,
    LEARNER_RESULTS_VF_LOSS_UNCLIPPED_KEY,
)
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.torch_utils import explained_variance

#: The columns the loss and the module's training forward read.
LOSS_COLUMNS = (
    Columns.OBS,
    Columns.ACTIONS,
    Columns.ACTION_LOGP,
    Columns.ACTION_DIST_INPUTS,
    Postprocessing.ADVANTAGES,
    Postprocessing.VALUE_TARGETS,
)


@dataclass
class LossTerms:
    """The per-row and mean terms of one minibatch's loss, kept for ``ppo_stats``."""

    surrogate: torch.Tensor
    vf_loss: torch.Tensor
    vf_loss_clipped: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor | None
    mean_kl: torch.Tensor


def _categorical_terms(logits: torch.Tensor, prev_logits: torch.Tensor, actions: torch.Tensor,
                       with_kl: bool, entropy_grad: bool, with_entropy: bool = True,
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-likelihood of ``actions``, KL(prev || current) and entropy, as torch's Categorical
    computes them and in the order RLlib's loss makes it compute them (the probabilities are
    computed lazily, inside the KL): autograd sums the gradients of shared terms in the order
    the graph was built, so the same order gives the same weights bit for bit. Without
    ``entropy_grad`` the entropy is computed outside the graph, for the statistics, and not at
    all without ``with_entropy`` (None)."""
    logits = logits - logits.logsumexp(dim=-1, keepdim=True)
    logp = logits.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    kl, probs = None, None
    if with_kl:
        prev_logits = prev_logits - prev_logits.logsumexp(dim=-1, keepdim=True)
        prev_probs = torch.softmax(prev_logits, dim=-1)
        per_action = prev_probs * (prev_logits - logits)
        probs = torch.softmax(logits, dim=-1)
        per_action = torch.where(probs == 0, torch.inf, per_action)
        kl = torch.where(prev_probs == 0, 0.0, per_action).sum(-1)
    if not (entropy_grad or with_entropy):
        return logp, kl, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        if not with_kl:
            probs = torch.softmax(logits, dim=-1)
        min_real = torch.finfo(logits.dtype).min
        entropy = -(torch.clamp(logits, min=min_real) * probs).sum(-1)
    return logp, kl, entropy


def _distribution_terms(module: Any, logits: torch.Tensor, prev_logits: torch.Tensor,
                        actions: torch.Tensor, with_kl: bool, entropy_grad: bool,
                        with_entropy: bool = True,
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The same three terms through the module's own distribution classes (RLlib's way)."""
    current = module.get_train_action_dist_cls().from_logits(logits)
    previous = module.get_exploration_action_dist_cls().from_logits(prev_logits)
    kl = previous.kl(current) if with_kl else None
    logp = current.logp(actions)
    if not (entropy_grad or with_entropy):
        return logp, kl, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, kl, current.entropy()


def is_categorical(module: Any) -> bool:
    """Whether both of the module's action distributions are RLlib's plain categorical."""
    return (module.get_train_action_dist_cls() is TorchCategorical
            and module.get_exploration_action_dist_cls() is TorchCategorical)


def _mean_over(batch: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """RLlib's ``possibly_masked_mean``: the mean over the rows the loss mask keeps (PPO's
    learner connector adds one masked, artificial step per episode chunk), else over all.
    The kept rows are found once per minibatch and gathered by index: the same values in the
    same order as ``data[mask]`` (so the same sum, and the same gradient, every row once),
    without a boolean index's search and scatter at every mean."""
    mask = batch.get(Columns.LOSS_MASK)
    if mask is None:
        return torch.mean
    num_valid = torch.sum(mask)
    rows = mask.nonzero().squeeze(-1)
    return lambda data: torch.sum(data.index_select(0, rows)) / num_valid


def ppo_loss(module: Any, config: Any, batch: Any, fwd_out: dict, *, entropy_coeff: float,
             kl_coeff: torch.Tensor, categorical: bool,
             value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
             with_stats: bool = True) -> tuple[torch.Tensor, LossTerms]:
    """PPO's total loss for one minibatch, in RLlib's order of terms. For a module with a
    critic: without one (``use_critic=False``) the learner runs RLlib's own loss.
    ``value_head`` computes the values from the training pass's embeddings in place of the
    module's ``compute_values`` (the flat pass of ``rl_pbt.flat_module``). Without
    ``with_stats`` the terms only the statistics need are left out (no entropy unless the
    loss has an entropy term)."""
    mean = _mean_over(batch)
    terms = _categorical_terms if categorical else (
        lambda *args: _distribution_terms(module, *args))
    # With no entropy term (PPO's default) RLlib's loss adds 0 * entropy, which changes
    # neither the loss nor any gradient (finite terms); leaving it out of the graph saves its
    # operations forward and backward at every minibatch.
    entropy_grad = float(entropy_coeff) != 0.0  # a scheduled coefficient is a 0-d tensor
    logp, kl, entropy = terms(fwd_out[Columns.ACTION_DIST_INPUTS],
                              batch[Columns.ACTION_DIST_INPUTS], batch[Columns.ACTIONS],
                              config.use_kl_loss, entropy_grad, with_stats)
    ratio = torch.exp(logp - batch[Columns.ACTION_LOGP])
    mean_kl = mean(kl) if kl is not None else torch.tensor(0.0, device=ratio.device)
    advantages = batch[Postprocessing.ADVANTAGES]
    surrogate = torch.min(advantages * ratio, advantages * torch.clamp(
        ratio, 1 - config.clip_param, 1 + config.clip_param))
    values = (value_head(fwd_out[Columns.EMBEDDINGS]) if value_head is not None else
              module.compute_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS)))
    vf_loss = torch.pow(values - batch[Postprocessing.VALUE_TARGETS], 2.0)
    vf_loss_clipped = torch.clamp(vf_loss, 0, config.vf_clip_param)
    per_row = -surrogate + config.vf_loss_coeff * vf_loss_clipped
    total = mean(per_row - entropy_coeff * entropy if entropy_grad else per_row)
    if config.use_kl_loss:
        total += kl_coeff * mean_kl
    return total, LossTerms(surrogate, vf_loss, vf_loss_clipped, values, entropy, mean_kl)


def ppo_stats(terms: LossTerms, batch: Any) -> dict[str, torch.Tensor]:
    """The statistics RLlib's PPO loss logs for a minibatch, under its keys (the explained
    variance over all rows, masked ones included, as RLlib's)."""
    mean = _mean_over(batch)
    return {
        POLICY_LOSS_KEY: -mean(terms.surrogate),
        VF_LOSS_KEY: mean(terms.vf_loss_clipped),
        LEARNER_RESULTS_VF_LOSS_UNCLIPPED_KEY: mean(terms.vf_loss),
        LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY: explained_variance(
            batch[Postprocessing.VALUE_TARGETS], terms.values),
        ENTROPY_KEY: mean(terms.entropy),
        LEARNER_RESULTS_KL_KEY: terms.mean_kl,
    }

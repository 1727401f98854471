"""PPO's torch learner: RLlib's update, minus most of its per-minibatch overhead.

On CartPole (48 minibatches of 256 rows per update, 64x64 networks) torch's forward, backward
and Adam step are the smaller part of RLlib's ``Learner.update``: the rest is bookkeeping per
minibatch around tensor operations that each cost more than their arithmetic. ``LeanPPOLearner``
keeps RLlib's update loop (its hooks, learner connector, metrics and results) and changes what
runs inside it:

- Adam steps with torch's fused kernel (RLlib's steps one tensor at a time in Python), without
  importing TorchDynamo (1.1 s of a trial's start).
- Minibatches are gathered by index (``rl_pbt.minibatches``: RLlib's rows, RLlib's draws).
- The module's training pass and values run as flat layer operations (``rl_pbt.flat_module``)
  for RLlib's default PPO module; the entropy stays out of the graph when its coefficient is 0.
- The loss is RLlib's PPO loss in fewer operations (``rl_pbt.ppo_loss``); the statistics only
  the last minibatch reports (``window=1``) are computed for that one only, and the module is
  put in training mode once per update instead of at every minibatch.
- Gradients are checked for nan/inf with one fused kernel instead of two checks per tensor;
  RLlib's own handling runs when that one finds something.
- The steps trained are added up over the minibatches and logged once per update (RLlib logs
  eight values per minibatch): the same sums, lifetime sums and Ray counters.

Measured side by side in one process (one trial, 6 epochs, three runs): the update took
135-154 ms against 203-229 ms, and a categorical policy ends every update with bit-identical
weights (``tests/test_learners.py``). The last three changes (checks, clearing, step logging;
with ``EagerAdam``'s step outside torch's wrapper): 67-80 against 82-92 ms per update of 2000
CartPole steps, five alternating runs. Updates off the plain path (sequences, a stateful or custom
module, a custom loss, no critic, several learners, grad scalers, a compiled update,
``num_total_minibatches``) run RLlib's update unchanged; ``lean_update_reason`` names why.
Relies on RLlib 2.60's internals (its iterator's fields, ``_uncompiled_update``), which
``pyproject.toml`` pins.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    MODULE_TRAIN_BATCH_SIZE_MEAN,
    NUM_ENV_STEPS_TRAINED,
    NUM_ENV_STEPS_TRAINED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    WEIGHTS_SEQ_NO,
)
from ray.rllib.utils.minibatch_utils import MiniBatchCyclicIterator

from rl_pbt.flat_module import FlatPPOModule
from rl_pbt.minibatches import cyclic_minibatches
from rl_pbt.optimizers import EagerAdam
from rl_pbt.ppo_loss import LOSS_COLUMNS, is_categorical, ppo_loss, ppo_stats

#: Columns the update reads when the batch has them: the loss mask, and the weights' version
#: each step was sampled with (RLlib's off-policyness metric).
_OPTIONAL_COLUMNS = (Columns.LOSS_MASK, WEIGHTS_SEQ_NO)


class FusedAdamPPOLearner(PPOTorchLearner):
    """PPO's torch learner; its Adam uses the fused kernel (195 against 216 ms per CartPole
    update) and does not import TorchDynamo (``rl_pbt.optimizers``). Checkpoints are unchanged
    in form (the same Adam state)."""

    def configure_optimizers_for_module(self, module_id: Any, config: Any = None) -> None:
        params = self.get_parameters(self._module[module_id])
        # A compiled update needs the graph breaks of torch's wrappers that EagerAdam skips.
        adam = torch.optim.Adam if self.config.torch_compile_learner else EagerAdam
        self.register_optimizer(module_id=module_id, optimizer=adam(params, fused=True),
                                params=params, lr_or_lr_schedule=config.lr)

    def _set_optimizer_state(self, state: Any) -> None:
        """Load as RLlib does, then fuse again: torch takes ``fused`` from the saved param
        groups, so a checkpoint of RLlib's own Adam (an older run, ``trainable=stock``) would
        turn the kernel off."""
        super()._set_optimizer_state(state)
        for optimizer in self._named_optimizers.values():
            for group in optimizer.param_groups:
                group["fused"] = True


class LeanPPOLearner(FusedAdamPPOLearner):
    """RLlib's PPO update with index minibatches, a leaner loss and one finiteness check."""

    #: None when the last update ran lean; else why it ran RLlib's own.
    lean_update_reason: str | None = "no update yet"
    #: True only inside a lean update's minibatch loop (calls from elsewhere go RLlib's way).
    _lean_active: bool = False
    #: The minibatch whose statistics RLlib reports (the last one), told apart by identity.
    _final_batch: Any = None

    #: Gradient steps the lean update took itself (not handed to RLlib's), for the tests.
    lean_steps: int = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._flat_modules: dict[Any, tuple[Any, FlatPPOModule | None]] = {}
        self._trained = _TrainedSteps()

    def _create_iterator_if_necessary(self, *, training_data: Any, **kwargs: Any) -> Any:
        iterator = super()._create_iterator_if_necessary(training_data=training_data, **kwargs)
        self.lean_update_reason = self._lean_reason(iterator)
        self._lean_active, self._final_batch = self.lean_update_reason is None, None
        if not self._lean_active:
            return iterator
        self._trained = _TrainedSteps()  # also drops what an update that failed left
        return self._index_minibatches(iterator)

    def after_gradient_based_update(self, *, timesteps: dict) -> None:
        if self._lean_active:
            self._log_trained_steps()
        self._lean_active, self._final_batch = False, None
        super().after_gradient_based_update(timesteps=timesteps)

    def _lean_reason(self, iterator: Any) -> str | None:
        """Why this update cannot run lean, or None."""
        if type(iterator) is not MiniBatchCyclicIterator:
            return f"RLlib iterates with {type(iterator).__name__}"
        if iterator._num_total_minibatches:
            return "num_total_minibatches is set"
        if self.config.num_learners > 1 or self._grad_scalers is not None:
            return "several learners or grad scalers"
        if self.config.torch_compile_learner:
            return "torch_compile_learner"
        if type(self).compute_loss_for_module is not LeanPPOLearner.compute_loss_for_module:
            return "a custom loss"
        if len(iterator._batch.policy_batches) != 1:
            return "more than one module to update"
        (module_id, batch), = iterator._batch.policy_batches.items()
        module = self.module[module_id].unwrapped()
        if (type(module) is not DefaultPPOTorchRLModule or module.is_stateful()
                or module.inference_only):
            return f"module {type(module).__name__} is not RLlib's stateless default"
        if not self.config.get_config_for_module(module_id).use_critic:
            return "use_critic is off"
        if SampleBatch.SEQ_LENS in batch:
            return "the batch has sequences"
        for column in (*LOSS_COLUMNS, *_OPTIONAL_COLUMNS):
            value = batch.get(column)
            if column not in _OPTIONAL_COLUMNS and value is None:
                return f"the batch has no {column} column"
            if value is not None and not (torch.is_tensor(value) and len(value) == len(batch)):
                return f"column {column} is not one tensor row per step"
        return None

    def _index_minibatches(self, iterator: MiniBatchCyclicIterator) -> Iterator[MultiAgentBatch]:
        """RLlib's minibatches in RLlib's order, each column gathered once by index; the last
        one is marked for the statistics RLlib reports from it. All of an update's permutations
        are drawn before its first minibatch (RLlib draws each at its epoch's end): the same
        stream, unless something else draws from numpy's global generator during the update."""
        (module_id, batch), = iterator._batch.policy_batches.items()
        columns = {name: batch[name] for name in (*LOSS_COLUMNS, *_OPTIONAL_COLUMNS)
                   if name in batch}
        device = batch[Columns.OBS].device
        rows = cyclic_minibatches(len(batch), iterator._minibatch_size, iterator._num_epochs,
                                  iterator._shuffle_batch_per_epoch)
        env_steps = len(iterator._batch)
        self.module[module_id].train()
        for position, minibatch_rows in enumerate(rows):
            index = torch.as_tensor(minibatch_rows, device=device)
            minibatch = SampleBatch({name: column.index_select(0, index)
                                     for name, column in columns.items()})
            if position == len(rows) - 1:
                self._final_batch = minibatch
            yield MultiAgentBatch({module_id: minibatch}, env_steps)

    def _uncompiled_update(self, batch: dict, **kwargs: Any) -> tuple[dict, dict, dict]:
        """RLlib's update step, with the module's training forward called directly: RLlib's
        ``forward_train`` walks the module tree to ``train()`` it at every minibatch (done once
        per update here, in ``_index_minibatches``)."""
        if not self._lean_active:
            return super()._uncompiled_update(batch, **kwargs)
        self._compute_off_policyness(batch)
        fwd_out = {module_id: self._forward_train(module_id, minibatch)
                   for module_id, minibatch in batch.items()}
        loss_per_module = self.compute_losses(fwd_out=fwd_out, batch=batch)
        gradients = self.compute_gradients(loss_per_module)
        self.apply_gradients(self.postprocess_gradients(gradients))
        return fwd_out, loss_per_module, {}

    def _flat_module(self, module_id: Any) -> FlatPPOModule | None:
        """The module's training pass as flat operations (``rl_pbt.flat_module``), found once
        per module object."""
        module = self.module[module_id].unwrapped()
        cached = self._flat_modules.get(module_id)
        if cached is None or cached[0] is not module:
            flat = FlatPPOModule.of(module)
            cached = self._flat_modules[module_id] = (module, flat if flat and flat.trains
                                                      else None)
        return cached[1]

    def _forward_train(self, module_id: Any, minibatch: Any) -> dict[str, Any]:
        flat = self._flat_module(module_id)
        if flat is None:
            return self.module[module_id]._forward_train(minibatch)
        return flat.train(minibatch[Columns.OBS])

    def _compute_off_policyness(self, batch: Any) -> None:
        """RLlib logs it per minibatch with ``window=1``: only the last one's is reported."""
        if not self._lean_active or any(b is self._final_batch for b in batch.values()):
            super()._compute_off_policyness(batch)

    def compute_loss_for_module(self, *, module_id: Any, config: Any, batch: Any,
                                fwd_out: Any) -> Any:
        if not self._lean_active:
            return super().compute_loss_for_module(module_id=module_id, config=config,
                                                   batch=batch, fwd_out=fwd_out)
        module = self.module[module_id].unwrapped()
        flat = self._flat_module(module_id)
        total, terms = ppo_loss(
            module, config, batch, fwd_out, value_head=flat.values if flat else None,
            entropy_coeff=self.entropy_coeff_schedulers_per_module[module_id].get_current_value(),
            kl_coeff=self.curr_kl_coeffs_per_module[module_id],
            categorical=is_categorical(module), with_stats=batch is self._final_batch)
        if batch is self._final_batch:
            self.metrics.log_dict(ppo_stats(terms, batch), key=module_id, window=1)
        return total

    def _log_steps_trained_metrics(self, batch: MultiAgentBatch) -> None:
        """RLlib logs eight values per minibatch. In a lean update the steps are added up and
        logged once, after the last minibatch (the same sums and lifetime sums; the
        throughputs are then over the update); the mean minibatch size gets every value."""
        if not self._lean_active:
            return super()._log_steps_trained_metrics(batch)
        for module_id, module_batch in batch.policy_batches.items():
            size = len(module_batch)
            self.metrics.log_value(key=(module_id, MODULE_TRAIN_BATCH_SIZE_MEAN), value=size,
                                   reduce="mean")
            self._trained.module_steps[module_id] = (
                self._trained.module_steps.get(module_id, 0) + size)
        self._trained.env_steps += batch.env_steps()
        return None

    def _log_metrics(self, batch: MultiAgentBatch) -> None:
        """Ray's counters of steps trained, counted once per lean update (the same totals)."""
        if not self._lean_active or int(batch.env_steps()) <= 0:
            return super()._log_metrics(batch)
        self._trained.counted_module_steps += sum(map(len, batch.policy_batches.values()))
        return None

    def _log_trained_steps(self) -> None:
        """What RLlib's per-minibatch logging of the update's steps adds up to."""
        trained, log = self._trained, self.metrics.log_value
        for module_id, steps in trained.module_steps.items():
            log((module_id, WEIGHTS_SEQ_NO), self._weights_seq_no, window=1)
            log((module_id, NUM_MODULE_STEPS_TRAINED), steps, reduce="sum")
            log((module_id, NUM_MODULE_STEPS_TRAINED_LIFETIME), steps, reduce="lifetime_sum",
                with_throughput=True)
            log((ALL_MODULES, NUM_MODULE_STEPS_TRAINED), steps, reduce="sum",
                with_throughput=True)
            log((ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), steps,
                reduce="lifetime_sum", with_throughput=True)
        if trained.module_steps:
            log((ALL_MODULES, NUM_ENV_STEPS_TRAINED), trained.env_steps, reduce="sum",
                with_throughput=True)
            log((ALL_MODULES, NUM_ENV_STEPS_TRAINED_LIFETIME), trained.env_steps,
                reduce="lifetime_sum", with_throughput=True)
        if trained.env_steps:  # a minibatch without env steps went RLlib's way (_log_metrics)
            self._metrics_all_modules_num_env_steps_trained.inc(value=trained.env_steps)
            self._metrics_all_modules_num_module_steps_trained.inc(
                value=trained.counted_module_steps)

    def apply_gradients(self, gradients_dict: Any) -> None:
        """RLlib checks every gradient tensor for nan/inf twice (when setting it, and again
        before each optimizer step), one reduction and one sync each; one norm over all of
        them finds the same tensors (a nan or inf makes it non-finite). Anything unusual (a
        non-finite gradient, lr schedulers, grad scalers) goes RLlib's way."""
        grads = list(gradients_dict.values())
        if (self.config.torch_skip_nan_gradients or not grads
                or self._lr_scheduler_classes is not None or self._grad_scalers is not None
                or any(grad is None for grad in grads) or not _all_finite(grads)):
            return super().apply_gradients(gradients_dict)
        for param_id, grad in gradients_dict.items():
            self._params[param_id].grad = grad
        for module_id, optimizer_names in self._module_optimizers.items():
            for optimizer_name in optimizer_names:
                self.get_optimizer(module_id, optimizer_name).step()
        self.lean_steps += 1
        return None


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds a nan or inf.

    One fused kernel over all tensors where they share a device and a float dtype: the check
    of torch's gradient scaler with a scale of 1 (its kernel returns each value unchanged then),
    6 us against 28 us for a norm per tensor (12 of CartPole's). Else a norm per tensor, whose
    overflow (finite values above ~1e19) also reads as not finite: the caller then checks
    tensor by tensor."""
    first = tensors[0]
    if first.dtype in _FUSED_CHECK_DTYPES and all(
            t.device == first.device and t.dtype == first.dtype for t in tensors):
        found = torch.zeros(1, device=first.device)
        torch._amp_foreach_non_finite_check_and_unscale_(
            tensors, found, torch.ones(1, device=first.device))
        return not bool(found)
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors)).sum()))


#: Float dtypes the fused check takes (torch's gradient scaler's kernel).
_FUSED_CHECK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _TrainedSteps:
    """Steps of the lean update's minibatches, logged once after the last one."""

    def __init__(self) -> None:
        self.module_steps: dict[Any, int] = {}
        self.env_steps = 0
        #: Module steps of the minibatches with env steps, Ray's counter's (as RLlib counts).
        self.counted_module_steps = 0


def learner_for(default: type, lean_update: bool = True) -> type | None:
    """rl_pbt's counterpart of an algorithm's default learner class, if it has one:
    ``lean_update=False`` keeps RLlib's update (Adam still fused)."""
    if default is not PPOTorchLearner:
        return None
    return LeanPPOLearner if lean_update else FusedAdamPPOLearner


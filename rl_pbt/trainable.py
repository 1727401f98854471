"""A PBT-ready RLlib trainable: exploits reuse the trial's process, and the trial tells the truth.

RLlib's ``Algorithm`` has no ``reset_config``, so on every PBT exploit Tune kills the trial's
actor and starts a new process (seen here: 168 s of wall time for 17 s of training). The mixin
below takes the new config in the same process: it tears the algorithm down and sets it up again
(env runners, learner, optimizer: every key may have changed), then Tune restores the clone's
checkpoint into it.

Two details make that honest:

* ``optimizer.load_state_dict`` puts the *cloned* trial's lr into the optimizer, and RLlib only
  re-applies the scheduled lr after the next update; the first update after an exploit would use
  the old lr. After a restore the config's lr is applied at once.
* Every result carries ``rl_pbt/*`` probes read inside the trial: the lr the optimizer used, the
  clip_param the loss used, and digests of the weights at the start and end of the iteration. A
  test (and anyone) can check that an exploit really changed the agent.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from functools import cache
from typing import Any

import ray

from rl_pbt.algorithms import import_object

PROBE = "rl_pbt"


class PBTReady:
    """Mixin for an RLlib ``Algorithm``: in-process ``reset_config``, per-iteration probes,
    sampling through rl_pbt's batched env loop (``rl_pbt.sampler``) and a fused Adam step
    (``rl_pbt.learners``)."""

    #: False: RLlib's own env runner loop (config ``sampler=rllib``).
    batched_sampler: bool = True
    #: False: RLlib's own learner update, Adam still fused (config ``learner=rllib``).
    lean_learner: bool = True

    @classmethod
    def get_default_config(cls) -> Any:
        """RLlib's defaults with rl_pbt's env runner and learner; a config that names its own
        runner or learner class wins."""
        from rl_pbt.learners import learner_for
        from rl_pbt.sampler import FastEnvRunner

        config = super().get_default_config()  # type: ignore[misc]
        if cls.batched_sampler and config.env_runner_cls is None:
            config.env_runners(env_runner_cls=FastEnvRunner)
        try:
            learner = learner_for(config.get_default_learner_class(), cls.lean_learner)
        except NotImplementedError:  # an algorithm without a default learner
            learner = None
        if learner is not None:
            config.learners(learner_class=learner)
        return config

    def setup(self, config: Any) -> None:
        """RLlib's set-up, its torch seeding without importing torch's compiler
        (``rl_pbt.seeding``: 1.1 s of each trial's start)."""
        from rl_pbt.seeding import deterministic_without_compiler

        with deterministic_without_compiler():
            super().setup(config)  # type: ignore[misc]
        self._restored_from: str | None = None
        self._probe: dict[str, Any] = {}
        _instrument(self)
        _sample_in_eval_mode(self)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """Rebuild the algorithm for ``new_config`` in this process; Tune restores weights next."""
        config = self.get_default_config().update_from_dict(copy.deepcopy(new_config))
        if config.algo_class is None:
            config.algo_class = type(self)
        config.validate()
        config.freeze()
        self.cleanup()
        self.config = config
        self._env_id, self.env_creator = self._get_env_id_and_creator(config.env, config)
        # State Algorithm.__init__ creates: a restore overwrites it, a fresh trial needs it new.
        from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

        self.metrics = MetricsLogger(root=True, stats_cls_lookup=config.stats_cls_lookup)
        self._timers.clear()
        self._counters.clear()
        self._episode_history = []
        self._episodes_to_be_collected = []
        self.setup(copy.deepcopy(config))
        return True

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Restore, then put the config's lr into the optimizer (not the clone's)."""
        super().load_checkpoint(checkpoint_dir)  # type: ignore[misc]
        learner = _local_learner(self)
        if learner is not None:
            _apply_scheduled_lr(learner, self._lifetime_env_steps())
        self._restored_from = str(checkpoint_dir)

    def _lifetime_env_steps(self) -> int:
        from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

        return self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)

    def step(self) -> dict[str, Any]:
        learner = _local_learner(self)
        start = _digest(learner) if learner is not None else None
        self._probe.clear()
        result = super().step()  # type: ignore[misc]
        result[PROBE] = {
            **self._probe,
            "digest_start": start,
            "digest_end": _digest(learner) if learner is not None else None,
            "restored": self._restored_from is not None,
            "restored_from": self._restored_from,  # the checkpoint this iteration started from
            "node_id": ray.get_runtime_context().get_node_id(),  # where it ran, on a cluster
            "pid": os.getpid(),  # the process: an exploit that reuses it keeps the same one
        }
        self._restored_from = None
        return result


def _local_learner(algo: Any) -> Any:
    """The learner in this process (``num_learners=0``), or None when learners are remote."""
    group = getattr(algo, "learner_group", None)
    return getattr(group, "_learner", None)


def _local_env_runner(algo: Any) -> Any:
    """The env runner that samples in this process (``num_env_runners=0``), or None."""
    return algo.env_runner if algo.config.num_env_runners == 0 else None


def _instrument(algo: Any) -> None:
    """Record, at each update, the lr the optimizer steps with, the clip_param the loss uses and
    whether rl_pbt's lean update ran (``LeanPPOLearner``), and the seconds the in-process env
    runner spends sampling."""
    _time_sampling(algo)
    learner = _local_learner(algo)
    if learner is None:
        return
    probe = algo._probe
    apply_gradients = learner.apply_gradients
    compute_loss = learner.compute_loss_for_module

    def recording_apply(gradients: Any) -> Any:
        lrs = [g["lr"] for opt in learner._named_optimizers.values() for g in opt.param_groups]
        probe.setdefault("lr_first_update", float(lrs[0]))
        probe["lr_last_update"] = float(lrs[0])
        probe["updates"] = probe.get("updates", 0) + 1
        probe["lean_update"] = getattr(learner, "lean_update_reason", "RLlib's") is None
        return apply_gradients(gradients)

    def recording_loss(*, module_id: Any, config: Any, batch: Any, fwd_out: Any) -> Any:
        if hasattr(config, "clip_param"):
            probe["clip_param_used"] = float(config.clip_param)
        return compute_loss(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    learner.apply_gradients = recording_apply
    learner.compute_loss_for_module = recording_loss


def _time_sampling(algo: Any) -> None:
    """Add ``sample_s`` and ``sampled_steps`` to the probe: sampling alone, the part a bare env
    loop compares with (``scripts/benchmark.py``), whether the module sampled in eval mode and
    whether rl_pbt's batched loop sampled (``FastEnvRunner.last_sample_fast``).
    Only where sampling runs in this process."""
    runner = _local_env_runner(algo)
    if runner is None:
        return
    probe = algo._probe
    sample = runner.sample

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        episodes = sample(*args, **kwargs)
        probe["sample_s"] = probe.get("sample_s", 0.0) + time.perf_counter() - started
        probe["sampled_steps"] = probe.get("sampled_steps", 0) + sum(map(len, episodes))
        probe["sampled_in_eval_mode"] = not runner.module.training
        probe["fast_sampler"] = getattr(runner, "last_sample_fast", False)
        return episodes

    runner.sample = timed_sample


def _sample_in_eval_mode(algo: Any) -> None:
    """Leave the in-process env runner's module in eval mode. Its forward passes switch it to
    eval and back to train at every env step, two walks over the module tree that cost 8% of
    CartPole's sampling time; learning goes through the learner's own module (``train()``)."""
    runner = _local_env_runner(algo)
    if runner is not None:
        runner.module.eval()


def _apply_scheduled_lr(learner: Any, env_steps: int) -> None:
    """Set each optimizer's lr from the learner's lr schedule (built from the current config)."""
    for names in learner._module_optimizers.values():
        for name in names:
            optimizer = learner._named_optimizers[name]
            schedule = learner._optimizer_lr_schedules.get(optimizer)
            if schedule is not None:
                learner._set_optimizer_lr(optimizer, schedule.update(timestep=env_steps))


def _digest(learner: Any) -> str:
    """A short hash of every RLModule weight: equal digests mean identical agents."""
    sha = hashlib.sha1()
    for module_id in sorted(learner.module.keys()):
        state = learner.module[module_id].state_dict()
        for key in sorted(state):
            sha.update(key.encode())
            sha.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


@cache
def pbt_trainable(algorithm_class: str, batched_sampler: bool = True,
                  lean_learner: bool = True) -> type:
    """The PBT-ready subclass of an RLlib algorithm, e.g. ``ray.rllib.algorithms.ppo.PPO``;
    ``batched_sampler=False`` keeps RLlib's env runner loop, ``lean_learner=False`` RLlib's
    learner update (with the fused Adam step)."""
    base = import_object(algorithm_class)
    return type(f"PBT{base.__name__}", (PBTReady, base),
                {"__module__": __name__, "batched_sampler": batched_sampler,
                 "lean_learner": lean_learner})

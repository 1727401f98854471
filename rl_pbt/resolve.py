"""Composed Hydra config -> :class:`~rl_pbt.plan.Plan`. The only module that reads OmegaConf.

Every key and value is checked here (the scheduler's knobs by :mod:`rl_pbt.scheduler_options`),
before Ray or MLflow is touched, so that bad input ends in one
:class:`~rl_pbt.errors.ConfigError` and nothing half-written.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from rl_pbt.algorithms import (
    AlgorithmSpec,
    algorithm_spec,
    check_values,
    import_object,
    translate_keys,
)
from rl_pbt.distributions import Choice, Distribution, as_distribution
from rl_pbt.envs import make_from_entry_point
from rl_pbt.errors import ConfigError
from rl_pbt.metrics import check_metric
from rl_pbt.plan import EnvSpec, Plan, Resources, SchedulerSpec, StopRule, Tracking
from rl_pbt.scheduler_options import DRAW_ONCE, POPULATION_BASED, is_number, resolve_scheduler
from rl_pbt.values import first_line, is_count, is_numeric

log = logging.getLogger(__name__)

GROUPS = ("env", "algorithm", "mutations", "scheduler", "stopper", "resources", "tracking")
#: ``azureml`` is MLflow on an AzureML job's workspace (URI from the job's environment).
TRACKING_BACKENDS = ("mlflow", "azureml", "none")


def resolve(
    cfg: DictConfig,
    output_dir: Path,
    choices: Mapping[str, str] | None = None,
    launch_dir: Path | None = None,
) -> Plan:
    """Check the whole config and turn it into a Plan.

    Args:
        cfg: the composed config (``@hydra.main`` or ``hydra.compose``).
        output_dir: the run's output folder; every artifact goes below it.
        choices: the option picked in each group, for tags and the summary.
        launch_dir: where relative tracking paths are anchored (default: current directory).
    """
    plain = _to_plain(cfg)
    algorithm = algorithm_spec(
        _require(plain, "algorithm.name"),
        _require(plain, "algorithm.algorithm_class"),
        _require(plain, "algorithm.config_class"),
    )
    env = resolve_env(plain["env"])
    fixed, initial = resolve_algorithm_config(plain, algorithm, env)
    mutations = resolve_mutations(plain["mutations"], algorithm)
    for key in mutations:
        if isinstance(fixed.get(key), (list, tuple)):  # a schedule: PBT perturbs numbers
            raise ConfigError(
                f"algorithm.config.{key}: a schedule, but mutations.hyperparams.{key} mutates "
                f"{key}; give a number or drop {key} from the mutations")
    population = _positive_int(plain, "population")
    scheduler = resolve_scheduler(plain["scheduler"], population, mutations)
    param_space = {**fixed, **{key: dist.to_tune() for key, dist in initial.items()}}
    # fifo keeps the configured values ('each trial keeps its configured values'); random
    # search and ASHA draw every mutated key; PBT draws when mutations.start=sample.
    draw_all = scheduler.name != "fifo" and (
        plain["mutations"].get("start", "sample") == "sample" or scheduler.name in DRAW_ONCE)
    for key, dist in mutations.items():
        if draw_all or key not in param_space:
            param_space[key] = dist.to_tune()
    drawn = {k: d for k, d in mutations.items()
             if draw_all or (k not in fixed and k not in initial)}
    if scheduler.name in POPULATION_BASED:
        _check_start_in_range(fixed, {k: d for k, d in mutations.items() if k not in drawn})
    try:
        algorithm.check(
            _bounds(fixed, initial, mutations),
            _bounds({k: v for k, v in fixed.items() if k not in drawn},
                    {k: d for k, d in initial.items() if k not in drawn}, drawn),
        )
    except ConfigError as err:
        raise ConfigError(_named_where_set(str(err), {**fixed, **initial}, mutations)) from None
    seed = plain.get("seed")
    seed = random.randrange(2**31) if seed is None else _positive_int(plain, "seed", minimum=0)
    stop = resolve_stop(plain, env)
    _check_pbt_can_act(scheduler, stop)
    return Plan(
        name=f"{algorithm.name}-{env.id}",
        algorithm=algorithm,
        env=env,
        param_space=param_space,
        initial_config=_first_draw(param_space),
        mutations=mutations,
        scheduler=scheduler,
        stop=stop,
        resources=resolve_resources(plain["resources"]),
        tracking=resolve_tracking(plain["tracking"], launch_dir or Path.cwd()),
        population=population,
        seed=seed,
        num_to_keep=_positive_int(plain, "checkpoint.num_to_keep"),
        max_failures=_positive_int(plain, "max_failures", minimum=0),
        checkpoint_frequency=_positive_int(plain, "checkpoint.frequency", minimum=0),
        output_dir=Path(output_dir),
        trainable=_one_of(plain, "trainable", ("pbt_ready", "stock")),
        sampler=_one_of(plain, "sampler", ("batched", "rllib")),
        learner=_one_of(plain, "learner", ("lean", "rllib")),
        tensorboard=_flag(plain, "tensorboard"),
        choices=dict(choices or {}),
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )


def _to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations; a missing mandatory value (``???``) names its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key}: no value given; set it on the command line") from None


def _require(plain: Mapping[str, Any], path: str) -> Any:
    node: Any = plain
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{path}: missing from the config")
        node = node[part]
    return node


def _one_of(plain: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = plain.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _flag(plain: Mapping[str, Any], key: str, prefix: str = "") -> bool:
    value = plain.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key}: must be true or false, got {value!r}")
    return value


def _positive_int(plain: Mapping[str, Any], path: str, minimum: int = 1) -> int:
    value = _require(plain, path)
    if not is_count(value, minimum):
        raise ConfigError(f"{path}: must be an integer >= {minimum}, got {value!r}")
    return value


def _check_layer_sizes(model: Mapping[str, Any]) -> None:
    """``fcnet_hiddens`` and the other ``*_hiddens`` of RLlib's model config are lists of layer
    widths; anything else failed in every trial with an error about something else."""
    for key, value in model.items():
        if key.endswith("hiddens") and value is not None and not (
                isinstance(value, (list, tuple)) and all(is_count(v, 1) for v in value)):
            raise ConfigError(f"algorithm.config._model_config.{key}: must be a list of layer "
                              f"widths (integers >= 1) such as [64, 64], got {value!r}")


def resolve_env(env: Mapping[str, Any]) -> EnvSpec:
    """Check the env exists and learn its action space, by building it once."""
    env_config = dict(env.get("env_config") or {})
    entry_point = env.get("entry_point")
    target = env.get("target_return")
    if not is_numeric(target):
        raise ConfigError(f"env.target_return: must be a number, got {target!r}")
    instance = _make_env(env["id"], entry_point, env_config)
    try:
        continuous = isinstance(instance.action_space, gym.spaces.Box)
        discrete = isinstance(instance.action_space,
                              (gym.spaces.Discrete, gym.spaces.MultiDiscrete))
        observations = instance.observation_space
    finally:
        instance.close()
    if not isinstance(observations, gym.spaces.Box):  # every trial failed in RLlib's catalog
        raise ConfigError(
            f"env: {env['id']} observes {observations}; RLlib's default model reads Box "
            "observations only: wrap the env (one-hot, flatten) and use env=entry_point")
    model_config = env.get("model_config") or {}
    if model_config.get("free_log_std") and not continuous:
        raise ConfigError(
            f"env.model_config.free_log_std: only for continuous (Box) action spaces; "
            f"{env['id']} has {instance.action_space}"
        )
    return EnvSpec(env["id"], entry_point, env_config, float(target), continuous, discrete)


def _make_env(env_id: str, entry_point: str | None, env_config: dict[str, Any]) -> gym.Env:
    if entry_point:
        try:
            import_object(entry_point)
        except ConfigError as err:
            raise ConfigError(f"env.entry_point: {err}; give package.module:ClassName") from None
        try:
            env = make_from_entry_point(entry_point, env_config)
        except Exception as err:  # the user's class may fail in any way; say so in one line
            raise ConfigError(f"env: cannot build {entry_point} with env.env_config "
                              f"{env_config}: {first_line(err)}") from None
        if not isinstance(getattr(env, "action_space", None), gym.spaces.Space):
            raise ConfigError(f"env.entry_point: {entry_point} is not a gymnasium.Env "
                              "(it has no action_space)")
        return env
    try:
        gym.spec(env_id)
    except gym.error.Error:
        raise ConfigError(
            f"env.id: unknown gymnasium id {env_id!r}; use a registered id such as "
            "CartPole-v1, or env=entry_point env.entry_point=module:Class"
        ) from None
    try:
        return gym.make(env_id, **env_config)
    except Exception as err:  # missing extras (box2d, mujoco) or bad env_config
        raise ConfigError(f"env: cannot build {env_id} with env.env_config {env_config}: "
                          f"{first_line(err)}") from None


def resolve_algorithm_config(
    plain: Mapping[str, Any], algorithm: AlgorithmSpec, env: EnvSpec
) -> tuple[dict[str, Any], dict[str, Distribution]]:
    """Return the fixed RLlib keys and the keys whose starting value is drawn per trial."""
    config = translate_keys(plain["algorithm"].get("config") or {}, algorithm.config_class,
                            "algorithm.config")
    check_values(config, algorithm.config_class, "algorithm.config")
    resources = translate_keys(plain["resources"].get("config") or {}, algorithm.config_class,
                               "resources.config")
    check_values(resources, algorithm.config_class, "resources.config")
    _check_no_conflict(config, resources)
    fixed: dict[str, Any] = {**config, **resources}
    model = {**(fixed.pop("_model_config", None) or {}), **(plain["env"].get("model_config") or {})}
    _check_layer_sizes(model)
    fixed["_model_config"] = model
    fixed["env"] = env.rllib_name
    fixed["env_config"] = env.env_config
    if env.discrete_actions:
        # RLlib "unsquashes" every sampled action, a no-op for discrete ones that deep-copies
        # the batch at each env step: a sixth of CartPole's sampling time. An explicit setting wins.
        fixed.setdefault("normalize_actions", False)
    initial: dict[str, Distribution] = {}
    for key, value in list(fixed.items()):
        if isinstance(value, Mapping) and "_target_" in value:
            initial[key] = _instantiate(value, f"algorithm.config.{key}")
            del fixed[key]
    return fixed, initial


def _check_no_conflict(config: Mapping[str, Any], resources: Mapping[str, Any]) -> None:
    """A key in both algorithm.config and resources.config with different values: resources
    (how trials run on this machine) would win without a word, so ask for it there."""
    for key, value in resources.items():
        if key in config and config[key] != value:
            raise ConfigError(
                f"algorithm.config.{key}={config[key]!r} conflicts with resources.config.{key}="
                f"{value!r}, which sets how trials run on the machine; set "
                f"resources.config.{key}={config[key]!r} instead")


def resolve_mutations(mutations: Mapping[str, Any], algorithm: AlgorithmSpec) -> dict[str, Any]:
    """Instantiate every mutation spec; keys are checked and translated like config keys."""
    start = mutations.get("start", "sample")
    if start not in ("sample", "config"):
        raise ConfigError(f"mutations.start: must be 'sample' or 'config', got {start!r}")
    specs = translate_keys(mutations.get("hyperparams") or {}, algorithm.config_class,
                           "mutations.hyperparams")
    if not specs:
        raise ConfigError("mutations.hyperparams: empty; PBT needs at least one key to mutate")
    return {key: _instantiate(spec, f"mutations.hyperparams.{key}") for key, spec in specs.items()}


def _instantiate(spec: Any, where: str) -> Distribution:
    """Instantiate one distribution spec, naming its config path in any error."""
    if isinstance(spec, Mapping):
        try:
            spec = instantiate(spec, _convert_="all")
        except InstantiationException as err:
            raise ConfigError(f"{where}: {_instantiation_reason(err, spec)}") from None
    try:
        return as_distribution(spec)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _instantiation_reason(err: InstantiationException, spec: Mapping[str, Any]) -> str:
    """Hydra's error in one line that names what to give: the cause of a failed call (its
    first line, after 'Error in call to target ...:'), or the distributions for a target that
    cannot be found or may not be called."""
    import dataclasses

    from rl_pbt import distributions

    cause = err.__cause__
    if isinstance(cause, ConfigError):
        return str(cause)
    target = str(spec.get("_target_"))
    if isinstance(cause, TypeError):
        kind = getattr(distributions, target.rpartition(".")[2], None)
        takes = (f"; it takes {', '.join(f.name for f in dataclasses.fields(kind))}"
                 if target.startswith("rl_pbt.distributions.") and dataclasses.is_dataclass(kind)
                 else "")
        return f"{target}: {first_line(cause)}{takes}"
    why = ("Hydra never calls it" if "blocklisted" in str(err) else
           "no such class or function" if "Error locating target" in str(err) else first_line(err))
    kinds = ", ".join(f"rl_pbt.distributions.{kind.__name__}" for kind in distributions.KINDS)
    return f"_target_: cannot call {target!r} ({why}); give one of {kinds}"


def _check_start_in_range(fixed: Mapping[str, Any], kept: Mapping[str, Distribution]) -> None:
    """Warn when ``mutations.start=config`` starts a key outside its mutation range: PBT
    trained and reported it silently (lr=0.01 against [1e-4, 1e-3]) and its first perturbation
    jumps into the range. A warning, not an error: a shipped pair (``mutations=wide``'s
    log-scale entropy_coeff with the config's 0) starts there on purpose. Lists (``Choice``)
    are left as the guide's setup has them."""
    for key, dist in kept.items():
        value = fixed.get(key)
        if isinstance(dist, Choice) or not is_numeric(value):
            continue
        if not dist.low <= value <= dist.high:
            log.warning("algorithm.config.%s=%g is outside mutations.hyperparams.%s [%g, %g]: "
                        "trials start there and PBT's first perturbation moves it into the "
                        "range", key, value, key, dist.low, dist.high)


def _named_where_set(message: str, config: Mapping[str, Any], mutations: Mapping[str, Any]) -> str:
    """The algorithm's check names a bare key (``lr: a value can be -0.001``); name where the
    key is set instead: ``algorithm.config.lr``, ``mutations.hyperparams.lr`` or both."""
    key, colon, rest = message.partition(":")
    places = [f"{group}.{key}" for group, keys in (("algorithm.config", config),
                                                   ("mutations.hyperparams", mutations))
              if key in keys]
    return f"{' or '.join(places)}:{rest}" if colon and places else message


def _bounds(
    fixed: Mapping[str, Any], initial: Mapping[str, Distribution], mutations: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """Lowest and highest value each numeric key can take over a whole run."""
    bounds: dict[str, tuple[Any, Any]] = {}
    for key, value in fixed.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            bounds[key] = (value, value)
    for source in (initial, mutations):
        for key, dist in source.items():
            low, high = bounds.get(key, (dist.low, dist.high))
            bounds[key] = (min(low, dist.low), max(high, dist.high))
    return bounds


def _first_draw(param_space: Mapping[str, Any]) -> dict[str, Any]:
    """One concrete config from the param space: what resource checks are computed on."""
    return {k: v.sample() if hasattr(v, "sample") else v for k, v in param_space.items()}


def resolve_stop(plain: Mapping[str, Any], env: EnvSpec) -> StopRule:
    """The stop rule: iterations, return target, env-step and wall-time budgets."""
    stop = plain["stopper"]
    mode = plain.get("mode")
    if mode not in ("max", "min"):
        raise ConfigError(f"mode: must be 'max' or 'min', got {mode!r}")
    for key in ("max_iterations", "max_env_steps", "max_seconds"):
        value = stop.get(key)
        if value is not None and (not is_number(value) or value <= 0):
            raise ConfigError(f"stopper.{key}: must be a positive number or null, got {value!r}")
    if stop.get("max_iterations") is not None and not is_count(stop["max_iterations"]):
        raise ConfigError(f"stopper.max_iterations: must be an integer >= 1 or null, got "
                          f"{stop['max_iterations']!r}")
    target = stop.get("target_return")
    if target is not None and not is_number(target):
        raise ConfigError(f"stopper.target_return: must be a number or null, got {target!r}")
    if all(stop.get(key) is None for key in STOP_KEYS):
        raise ConfigError(f"stopper: no stop rule ({', '.join(STOP_KEYS)} are all null), the "
                          "trials would train forever; set one, e.g. stopper.max_iterations=50")
    metric = check_metric(plain["metric"])
    evaluation = (plain["algorithm"].get("config") or {}).get("evaluation_interval")
    if metric.startswith("evaluation/") and not evaluation:
        raise ConfigError(f"metric: {metric!r} is reported only when RLlib evaluates; add "
                          "+algorithm.config.evaluation_interval=N (every N iterations), or "
                          "rank by env_runners/episode_return_mean")
    _check_target_metric(plain, target)
    return StopRule(
        metric=metric,
        mode=mode,
        max_iterations=stop.get("max_iterations"),
        target_return=target,
        max_env_steps=stop.get("max_env_steps"),
        max_seconds=stop.get("max_seconds"),
        stop_all_at_target=_flag(stop, "stop_all_at_target", "stopper."),
    )


def _check_pbt_can_act(scheduler: SchedulerSpec, stop: StopRule) -> None:
    """Warn when PBT's or PB2's first perturbation comes at or after the iteration cap: it
    never exploits, and the run is random search under PBT's name (a smoke test of a few
    iterations may mean that, so it is a warning, not an error)."""
    options = scheduler.options
    if (scheduler.name not in POPULATION_BASED or stop.max_iterations is None
            or options.get("time_attr") != "training_iteration"):
        return
    for key in ("perturbation_interval", "burn_in_period"):
        value = options.get(key) or 0
        if value >= stop.max_iterations:
            log.warning("scheduler.%s=%g is not below stopper.max_iterations=%d: PBT cannot "
                        "exploit in this run; set it below %d for PBT to act", key, value,
                        stop.max_iterations, stop.max_iterations)
            return


#: The stopper's rules; at least one must be set.
STOP_KEYS = ("max_iterations", "target_return", "max_env_steps", "max_seconds")


def _check_target_metric(plain: Mapping[str, Any], target: Any) -> None:
    """The env option's return target, kept while the metric is not a return: the target was
    met or missed by a number of another kind (a 450-step target on episode length with
    mode=min stopped every trial at its first iteration, 'return 18.6 (target 450: reached)')."""
    env_target = plain["env"].get("target_return")
    if target is None or target != env_target or "return" in str(plain["metric"]):
        return
    raise ConfigError(f"stopper.target_return: {target:g} is the env's return target, but "
                      f"metric={plain['metric']} is not a return; set stopper.target_return "
                      "for that metric, or stopper.target_return=null")


def resolve_resources(resources: Mapping[str, Any]) -> Resources:
    """Where Ray runs; CPU and concurrency limits are checked against it in ``cluster``."""
    value = resources.get("num_cpus")
    if value is not None and not is_count(value):
        raise ConfigError(f"resources.num_cpus: must be an integer >= 1 or null, got {value!r}")
    return Resources(address=resources.get("address"), num_cpus=value)


def resolve_tracking(tracking: Mapping[str, Any], launch_dir: Path) -> Tracking:
    """Pick the backend; anchor a relative SQLite path at the launch directory.

    ``azureml`` resolves to plain MLflow tracking (the tracker is the same; the option picked
    stays in the ``rl_pbt.tracking`` tag). Its URI is the one AzureML sets in a job
    (``conf/tracking/azureml.yaml`` reads ``MLFLOW_TRACKING_URI``), so a run outside a job, or
    an image without the ``azureml://`` plugin, fails here, before Ray starts.
    """
    backend = tracking.get("backend")
    if backend not in TRACKING_BACKENDS:
        raise ConfigError(
            f"tracking.backend: unknown {backend!r}; known: {', '.join(TRACKING_BACKENDS)}"
        )
    if backend == "none":
        return Tracking("none", None, None)
    if backend == "azureml":
        from importlib.util import find_spec

        uri = str(tracking.get("tracking_uri") or "")
        if not uri:
            raise ConfigError(
                "tracking.tracking_uri: MLFLOW_TRACKING_URI is not set; tracking=azureml takes it "
                "from an AzureML job (scripts/azureml/submit.py), elsewhere use tracking=mlflow"
            )
        if uri.startswith("azureml://"):
            try:
                plugin = find_spec("azureml.mlflow")
            except ModuleNotFoundError:  # not even the ``azureml`` namespace
                plugin = None
            if plugin is None:
                raise ConfigError(
                    "tracking.tracking_uri: an azureml:// URI needs the azureml-mlflow plugin; "
                    'pip install -e ".[azureml]"'
                )
        backend = "mlflow"
    uri = _text(tracking, "tracking_uri") or "sqlite:///mlflow.db"
    if _file_store(uri):
        raise ConfigError(
            f"tracking.tracking_uri: {uri!r} is a folder for MLflow's file store, which MLflow "
            "3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; give sqlite:///PATH.db, "
            "http(s)://HOST:PORT or a database URI (postgresql://...)")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str((launch_dir / uri[len(prefix):]).resolve())
    return Tracking(backend, uri, _text(tracking, "experiment_name") or "rl_pbt")


def _file_store(uri: str) -> bool:
    """A URI MLflow reads as its file store (a path, ``file:``), which MLflow 3 refuses (one
    page of traceback after the run folder was made) unless its opt-out is set. ``databricks``
    (and ``databricks-uc``) is a store named without a colon."""
    import os

    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return False
    return uri.startswith(("file:", "/", ".", "~")) or (
        ":" not in uri and not uri.startswith("databricks"))


def _text(tracking: Mapping[str, Any], key: str) -> str | None:
    """A tracking setting as text (a number reads as its digits); null or empty is None."""
    value = tracking.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"tracking.{key}: must be a string, got {value!r}")
    return str(value)

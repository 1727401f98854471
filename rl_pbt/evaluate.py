"""``python -m rl_pbt.evaluate RUN_DIR_or_CHECKPOINT [episodes=N] [video=true] [seed=S]``.

Loads the best agent (or any checkpoint's), plays N episodes without exploration (the policy's
deterministic action), and reports mean +/- std of return and episode length; ``video=true``
also writes a GIF of the first episode. Results go to the run folder and, when the run was
tracked, to an MLflow run nested under the run's parent.
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_pbt.cli import fail, parse_path_and_options
from rl_pbt.errors import ConfigError
from rl_pbt.records import read_json, write_json
from rl_pbt.values import first_line

MODULE_PATH = Path("learner_group", "learner", "rl_module", "default_policy")
def _flag(text: str) -> bool:
    """true or false (also yes/no, 1/0)"""
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


OPTIONS = {"episodes": int, "video": _flag, "seed": int, "env": str}


@dataclass(frozen=True)
class Target:
    """What to evaluate: a checkpoint, its env, and the run folder it came from (if any)."""

    checkpoint: Path
    env_id: str
    env_config: dict[str, Any]
    entry_point: str | None
    run_dir: Path | None


def parse_options(args: list[str]) -> tuple[Path, dict[str, Any]]:
    """``PATH key=value ...`` with the keys of ``OPTIONS``."""
    path, options = parse_path_and_options(
        args, OPTIONS, {"episodes": 10, "video": False, "seed": 0, "env": None},
        "python -m rl_pbt.evaluate RUN_DIR_or_CHECKPOINT [episodes=N] [video=true] [seed=S] "
        "[env=ID]", __doc__)
    if options["episodes"] < 1:
        raise ConfigError(f"episodes: must be >= 1, got {options['episodes']}")
    if options["seed"] < 0:
        raise ConfigError(f"seed: must be >= 0, got {options['seed']}")
    return path, options


def find_target(path: Path, env_override: str | None) -> Target:
    """Resolve a run folder to its best checkpoint, or take a checkpoint folder as it is."""
    if not path.exists():
        raise ConfigError(f"{path}: no such run folder or checkpoint")
    run_dir = path if (path / "run.json").is_file() else _run_dir_above(path)
    checkpoint = path
    if path == run_dir:
        summary = read_json(run_dir / "summary.json")
        best = (summary or {}).get("best") or {}
        if not best.get("checkpoint"):
            raise ConfigError(f"{run_dir}: summary.json names no best checkpoint")
        checkpoint = Path(best["checkpoint"])
    if not (checkpoint / MODULE_PATH).is_dir():
        raise ConfigError(f"{checkpoint}: not an RLlib checkpoint (no {MODULE_PATH})")
    env = ((read_json(run_dir / "run.json") or {}).get("config") or {}).get("env", {}) \
        if run_dir else {}
    env_id = env_override or env.get("id")
    if not env_id:
        raise ConfigError(f"{checkpoint}: not inside an rl_pbt run folder; pass env=ID")
    if env_override:  # another env: the run's env_config and entry point are not its own
        return Target(checkpoint, env_override, {}, None, run_dir)
    return Target(checkpoint, env_id, dict(env.get("env_config") or {}), env.get("entry_point"),
                  run_dir)


def _run_dir_above(path: Path) -> Path | None:
    for parent in [path, *path.resolve().parents]:
        if (parent / "run.json").is_file():
            return parent
    return None


def load_module(checkpoint: Path) -> Any:
    """The trained RLModule of a checkpoint; anything unreadable is one clear error."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    from rl_pbt.noise import quiet_known_noise

    quiet_known_noise()  # RLlib's deprecation notice about its own checkpoint format
    try:
        return RLModule.from_checkpoint(str((checkpoint / MODULE_PATH).resolve()))
    except Exception as err:  # a corrupt checkpoint fails in many ways inside RLlib
        raise ConfigError(f"{checkpoint}: cannot load the checkpoint ({first_line(err)})") from None


def _check_spaces(module: Any, env: Any, env_id: str) -> None:
    """An env whose observations or actions differ from the module's failed deep in torch
    (``mat1 and mat2 shapes cannot be multiplied``): say which env and which spaces."""
    for kind in ("observation", "action"):
        trained = getattr(module, f"{kind}_space", None)
        given = getattr(env, f"{kind}_space", None)
        if trained is not None and given is not None and (
                type(trained) is not type(given) or trained.shape != given.shape
                or getattr(trained, "n", None) != getattr(given, "n", None)):
            env.close()
            raise ConfigError(f"env={env_id}: its {kind}s ({_space(given)}) do not fit the "
                              f"checkpoint's module, trained on {_space(trained)}")


def _space(space: Any) -> str:
    """A space in short: a Box by its shape (its bounds can fill a line)."""
    shape = getattr(space, "shape", None)
    return f"{type(space).__name__} of shape {shape}" if type(space).__name__ == "Box" \
        else str(space)


def play(module: Any, env: Any, episodes: int, seed: int, frames: list | None) -> list[dict]:
    """Play episodes with the deterministic action; collect frames of the first if asked."""
    import torch

    dist_cls = module.get_inference_action_dist_cls()
    results = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, length, done = 0.0, 0, False
        while not done:
            batch = {"obs": torch.as_tensor(obs[None], dtype=torch.float32)}
            with torch.no_grad():
                logits = module.forward_inference(batch)["action_dist_inputs"]
            action = dist_cls.from_logits(logits).to_deterministic().sample()[0].numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total, length, done = total + float(reward), length + 1, terminated or truncated
            if frames is not None and episode == 0:
                frames.append(env.render())
        results.append({"return": total, "length": length})
    return results


def write_gif(frames: list, path: Path, every: int = 2) -> Path:
    """Every ``every``-th frame at half size, 30 frames a second of play."""
    from PIL import Image

    images = [Image.fromarray(f).reduce(2) for f in frames[::every]]
    images[0].save(path, save_all=True, append_images=images[1:], duration=33 * every, loop=0)
    return path


def evaluate(target: Target, episodes: int, video: bool, seed: int) -> dict[str, Any]:
    """Evaluate, write ``evaluation.json`` (and the GIF), log to MLflow; return the numbers."""
    import gymnasium as gym

    from rl_pbt.envs import make_from_entry_point

    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")  # pygame renders; no sound device here
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    module = load_module(target.checkpoint)
    kwargs = {"render_mode": "rgb_array"} if video else {}
    try:
        env = (make_from_entry_point(target.entry_point, {**target.env_config, **kwargs})
               if target.entry_point else gym.make(target.env_id, **target.env_config, **kwargs))
        if video:
            env.reset(seed=seed)
            env.render()  # fails here, not after the episodes, when pygame is missing
    except Exception as err:  # unknown id, missing extras (pygame for video), bad env_config
        raise ConfigError(f"env: cannot build {target.env_id} for evaluation: "
                          f"{first_line(err)}") from None
    _check_spaces(module, env, target.env_id)
    frames: list | None = [] if video else None
    try:
        episodes_out = play(module, env, episodes, seed, frames)
    finally:
        env.close()
    returns = [e["return"] for e in episodes_out]
    lengths = [e["length"] for e in episodes_out]
    out_dir = (target.run_dir or target.checkpoint.parent) / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": str(target.checkpoint), "env_id": target.env_id, "episodes": episodes,
        "seed": seed, "return_mean": statistics.fmean(returns),
        "return_std": statistics.pstdev(returns), "length_mean": statistics.fmean(lengths),
        "length_std": statistics.pstdev(lengths), "per_episode": episodes_out,
        "video": str(write_gif(frames, out_dir / "episode.gif")) if frames else None,
    }
    result["file"] = str(write_json(result, out_dir / "evaluation.json"))
    result["mlflow_run_id"] = log_to_mlflow(target, result, out_dir)
    return result


def log_to_mlflow(target: Target, result: dict[str, Any], out_dir: Path) -> str | None:
    """A run nested under the tuning run's parent, when the run was tracked."""
    summary = read_json(target.run_dir / "summary.json") if target.run_dir else None
    tracking = (summary or {}).get("tracking")
    if not tracking:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from rl_pbt.plan import Tracking
    from rl_pbt.tracking import check_run_store

    try:  # the evaluation stands either way; only its copy in MLflow may be missing
        check_run_store(Tracking("mlflow", tracking["tracking_uri"], None),
                        "the evaluation is in the run folder")
        client = MlflowClient(tracking["tracking_uri"])
        run = client.create_run(tracking["experiment_id"], tags={
            "mlflow.parentRunId": tracking["parent_run_id"], "mlflow.runName": "evaluate",
            "rl_pbt.checkpoint": str(target.checkpoint)})
    except (ConfigError, MlflowException) as err:
        result["mlflow_error"] = first_line(err)
        return None
    for key in ("return_mean", "return_std", "length_mean", "length_std"):
        client.log_metric(run.info.run_id, key, float(result[key]))
    for path in (out_dir / "evaluation.json", result["video"]):  # this evaluation's files only
        if path:
            client.log_artifact(run.info.run_id, str(path), "evaluation")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, evaluate, print one line per figure."""
    try:
        path, options = parse_options(sys.argv[1:] if argv is None else argv)
        target = find_target(path, options["env"])
        result = evaluate(target, options["episodes"], options["video"], options["seed"])
    except ConfigError as err:
        fail(err)
    print(f"{result['episodes']} episodes of {result['env_id']} without exploration: "
          f"return {result['return_mean']:.1f} +/- {result['return_std']:.1f}, "
          f"length {result['length_mean']:.1f} +/- {result['length_std']:.1f}")
    print(f"checkpoint {result['checkpoint']}")
    print(f"written    {result['file']}")
    if result["video"]:
        print(f"video      {result['video']}")
    if result.get("mlflow_error"):
        print(f"MLflow     not logged: {result['mlflow_error']}")
    return result


if __name__ == "__main__":
    main()

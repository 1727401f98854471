"""Benchmark rl_pbt against Ray's defaults on this machine, side by side in one invocation.

    python scripts/benchmark.py [--seeds 3] [--budget 300] [--out benchmarks]

1. Time to solve: wall seconds from launching ``python -m rl_pbt`` until the best trial's mean
   return first reaches the env's target (CartPole-v1: 450), for (a) rl_pbt's defaults and (b) the
   same search (population, mutations, PBT, budget) with RLlib's and Tune's defaults: RLlib's own
   PPO class (a new process at every exploit, ``reuse_actors=False``), one env per remote env
   runner, RLlib's 256x256 network, Tune's TensorBoard files. Median and spread over the seeds,
   and the ratio.
2. PBT efficiency: sum over trials of training time / (wall time x concurrent trial slots); also
   over the span from the first iteration's start to the last result (no process start or end),
   and that span's share of the wall time: the whole-run figure is the product of the two, so
   the share is its ceiling, whatever PBT does between first and last result.
   The runs of 1. end when they solve, so a setup that solves sooner has its fixed start-up
   weigh more; hence also over equal runs: both setups with the same budget (``--equal-budget``,
   120 s, counted from Tune's start like ``--budget``), the target off, every trial training
   until the budget ends; the efficiency's wall time is still the whole command's.
3. Throughput: env steps per second of one trial, against a bare loop of the same vectorised
   env and policy network with no learning (the physical limit here): per second of training
   (sampling and learning) and per second of sampling alone (the trial's own timer and count,
   in-process env runners only), inside the tuning runs of 1. (two trials and the driver share
   the two cores there, and each trial's epochs are a mutation's draw); and per second of
   training of one trial alone on the machine, as the bare loop runs, from the config's own
   start values (``mutations.start=config``: 6 epochs), for both setups.
4. Start-up: seconds from launch to the first trial result, rl_pbt against a plain Ray Tune
   script that starts the same trials (``scripts/plain_tune.py``).

Every run keeps the default tracking: MLflow into a new SQLite file in the run's temporary
folder (a first run's cost, the store created). Writes ``results.md``, ``results.csv``,
``startup.csv``, ``equal_budget.csv`` and ``trial_alone.csv`` under ``--out``. Every number
is measured in this run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = 450.0
#: (b): the same search with RLlib's and Tune's defaults (see the module docstring).
RAY_DEFAULTS = ["trainable=stock", "resources=rllib_defaults", "tensorboard=true",
                "algorithm.config._model_config.fcnet_hiddens=[256,256]",
                "+algorithm.config.normalize_actions=true"]
#: The equal-budget runs of 2.: no target, no iteration limit, only the wall budget.
UNTIL_BUDGET = ["stopper.target_return=null", "stopper.max_iterations=null"]
#: Seconds of training one trial does alone for 3., after its warm-up iterations.
ALONE_S = 15.0
#: The two setups, each with its overrides of rl_pbt's defaults.
SETUPS = (("rl_pbt", []), ("ray_defaults", RAY_DEFAULTS))


def launch(args: list[str], workdir: Path, timeout: float) -> tuple[float, float, str]:
    """Run ``python -m rl_pbt`` in ``workdir``; return launch time, end time and stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "rl_pbt", *args, f"hydra.run.dir={workdir}/run"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"rl_pbt {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return started, ended, proc.stdout


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure_run(args: list[str], budget: float) -> dict[str, Any]:
    """One tuning run: time to solve, efficiency, one trial's throughput, start-up."""
    with tempfile.TemporaryDirectory(prefix="rl_pbt_bench_") as tmp:
        workdir = Path(tmp)
        started, ended, stdout = launch(
            [*args, f"stopper.max_seconds={budget}"], workdir, budget + 300)
        rows = read_rows(workdir / "run")
    slots = int(re.search(r"(\d+) trials? trains? at once", stdout)[1])
    solved = [r["recorded_at"] for r in rows if (r.get("return") or -1e9) >= TARGET]
    train_s = sum(r.get("time_this_iter_s") or 0.0 for r in rows)
    steps = sum(_iteration_steps(r) for r in rows)
    sampled = [r for r in rows if (r.get("probe") or {}).get("sample_s")]
    sample_s = sum(r["probe"]["sample_s"] for r in sampled)
    sampled_steps = sum(r["probe"].get("sampled_steps", 0) for r in sampled)
    # Training span: from the start of the first iteration to the last result.
    span = max(r["recorded_at"] for r in rows) - min(
        r["recorded_at"] - (r.get("time_this_iter_s") or 0.0) for r in rows)
    return {
        "wall_s": ended - started,
        "solve_s": min(solved) - started if solved else None,
        "first_result_s": min(r["recorded_at"] for r in rows) - started,
        "efficiency": train_s / ((ended - started) * slots),
        "span_efficiency": train_s / (span * slots),
        # The ceiling of "efficiency": the wall's share inside the span (efficiency = this x
        # span_efficiency); the rest is the start before the first iteration and the end.
        "span_share": span / (ended - started),
        "trial_steps_per_s": steps / train_s if train_s else None,
        "sampling_steps_per_s": sampled_steps / sample_s if sample_s else None,
        "slots": slots,
        "exploits": stdout.count("[pbt]"),
        "best_return": max((r.get("return") or -1e9) for r in rows),
    }


def _iteration_steps(row: dict[str, Any]) -> float:
    """Env steps of one iteration: counted in the trial (``probe.sampled_steps``) or, for
    RLlib's own class, lifetime steps over iterations (the batch size, which the benchmark's
    mutations leave fixed)."""
    counted = (row.get("probe") or {}).get("sampled_steps")
    if counted:
        return float(counted)
    return row["env_steps"] / row["training_iteration"] if row.get("env_steps") else 0.0


def bare_loop(num_envs: int = 16, hidden: tuple[int, ...] = (64, 64), seconds: float = 5.0,
              ) -> float:
    """Env steps per second of a vectorised CartPole driven by a torch MLP, no learning."""
    import gymnasium as gym
    import torch

    torch.set_num_threads(1)  # as in a Ray trial (OMP_NUM_THREADS=1)
    envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="sync")
    layers: list[torch.nn.Module] = []
    size = envs.single_observation_space.shape[0]
    for width in hidden:
        layers += [torch.nn.Linear(size, width), torch.nn.Tanh()]
        size = width
    net = torch.nn.Sequential(*layers, torch.nn.Linear(size, 2))
    obs, _ = envs.reset(seed=0)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        with torch.no_grad():
            logits = net(torch.as_tensor(obs, dtype=torch.float32))
        actions = torch.distributions.Categorical(logits=logits).sample().numpy()
        obs, *_ = envs.step(actions)
        steps += num_envs
    envs.close()
    return steps / (time.perf_counter() - started)


def quiet_bare_loop(wait: float = 60.0) -> float:
    """The bare loop once the previous run's Ray processes are gone. This machine's speed drifts
    (the same loop read 22000 to 46000 steps/s over a day), so it is measured beside every seed's
    runs, not once."""
    deadline = time.time() + wait
    while time.time() < deadline and subprocess.run(
            ["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True).returncode == 0:
        time.sleep(1.0)
    time.sleep(2.0)
    return bare_loop()


def _last_json_line(args: list[str], timeout: float, env: dict[str, str] | None = None,
                    ) -> dict[str, Any]:
    """Run a Python script; return the JSON object on its last line of output."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trial_alone(overrides: list[str]) -> float:
    """Env steps per second of training of one trial alone on the machine, in a new process
    (``_train_alone``) with this checkout's rl_pbt (as :func:`launch`), and torch on one thread
    as Ray runs a trial."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return _last_json_line([str(Path(__file__).resolve()), "--trial-alone", json.dumps(overrides)],
                           ALONE_S + 300, env)["steps_per_s"]


def _train_alone(overrides: list[str], seconds: float) -> dict[str, float]:
    """Build the setup's trainable from its resolved config (the config's start values, not a
    draw) in this process and train it: two warm-up iterations, then ``seconds`` of training;
    steps counted by RLlib, time by Tune (``time_this_iter_s``), as in the tuning runs."""
    import ray
    import torch
    from hydra import compose, initialize_config_dir
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED

    from rl_pbt.local_ray import init_local
    from rl_pbt.resolve import resolve
    from rl_pbt.run import trainable_class

    torch.set_num_threads(1)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["mutations.start=config", "seed=1", *overrides])
    with tempfile.TemporaryDirectory(prefix="rl_pbt_alone_") as tmp:
        plan = resolve(cfg, Path(tmp), launch_dir=Path(tmp))
        init_local(None)  # Ray as rl_pbt starts it on this machine
        algo = trainable_class(plan)(config=plan.initial_config)
        for _ in range(2):
            algo.train()
        steps, train_s = 0, 0.0
        while train_s < seconds:
            result = algo.train()
            steps += result[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED]
            train_s += result["time_this_iter_s"]
        algo.stop()
        ray.shutdown()
    return {"steps_per_s": steps / train_s}


def plain_tune_startup() -> float:
    """Seconds from launching ``scripts/plain_tune.py`` to its first trial result."""
    started = time.time()
    first = _last_json_line([str(ROOT / "scripts" / "plain_tune.py")], 600)["first_result_at"]
    return first - started


def spread(values: list[float | None], digits: int = 1) -> str:
    """``median [min-max]`` of the runs that measured the value."""
    done = [v for v in values if v is not None]
    if not done:
        return "n/a"
    low, mid, high = min(done), statistics.median(done), max(done)
    return f"{mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def solve_median(times: list[float | None]) -> float:
    """Median time to solve, an unsolved run counted as slower than any solved one (inf)."""
    return statistics.median_high([math.inf if t is None else t for t in times])


def solve_spread(times: list[float | None], budget: float) -> str:
    """``median [min-max]`` of the times to solve; unsolved runs count as more than the budget,
    so one solved run out of three does not pass for the median."""
    solved = sorted(t for t in times if t is not None)
    missing = len(times) - len(solved)
    if not solved:
        return f"not reached in {budget:.0f} s ({missing}/{len(times)})"
    mid = solve_median(times)
    high = f"> {budget:.0f}" if missing else f"{solved[-1]:.1f}"
    text = f"> {budget:.0f}" if mid == math.inf else f"{mid:.1f}"
    text += f" [{solved[0]:.1f}-{high}]"
    return text + (f", {missing}/{len(times)} not reached" if missing else "")


def median(values: list[float | None]) -> float | None:
    done = [v for v in values if v is not None]
    return statistics.median(done) if done else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=300.0,
                        help="wall seconds per tuning run before it counts as not solved")
    parser.add_argument("--equal-budget", type=float, default=120.0,
                        help="wall seconds of the equal runs that measure PBT efficiency")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--trial-alone", metavar="OVERRIDES_JSON",
                        help=argparse.SUPPRESS)  # the child process of trial_alone()
    args = parser.parse_args()
    if args.trial_alone is not None:
        print(json.dumps(_train_alone(json.loads(args.trial_alone), ALONE_S)))
        return
    runs: dict[str, list[dict[str, Any]]] = {"rl_pbt": [], "ray_defaults": []}
    equal: dict[str, list[float]] = {"rl_pbt": [], "ray_defaults": []}
    bare: list[float] = []
    alone: dict[str, list[float]] = {"rl_pbt": [], "ray_defaults": []}
    for seed in range(1, args.seeds + 1):  # alternate, so drift in the machine hits all three
        bare.append(quiet_bare_loop())
        print("bare", round(bare[-1]), flush=True)
        for name, extra in SETUPS:
            alone[name].append(trial_alone(extra))
            print(name, "trial alone", round(alone[name][-1]), flush=True)
        for name, extra in SETUPS:
            result = measure_run([f"seed={seed}", *extra], args.budget)
            runs[name].append({"seed": seed, **result, "bare_steps_per_s": bare[-1]})
            print(name, seed, json.dumps(result), flush=True)
        for name, extra in SETUPS:
            result = measure_run([f"seed={seed}", *extra, *UNTIL_BUDGET], args.equal_budget)
            equal[name].append(result["efficiency"])
            print(name, seed, "equal budget", json.dumps(result), flush=True)
    startup = {"rl_pbt": [], "plain_tune": []}
    for _ in range(args.seeds):
        startup["plain_tune"].append(plain_tune_startup())
        startup["rl_pbt"].append(measure_run(["stopper.max_iterations=1"], 120)["first_result_s"])
        print("startup", json.dumps({k: v[-1] for k, v in startup.items()}), flush=True)
    write_results(args.out, runs, equal, startup, bare, alone, args)


def _write_csv(path: Path, header: list[str], rows: Iterable[Sequence[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _per_seed(values: dict[str, list[float]]) -> Iterator[tuple[str, int, float]]:
    """``(setup, seed, value)`` rows of per-seed values; seeds count from 1, as the runs."""
    return ((name, seed, value) for name, per_seed in values.items()
            for seed, value in enumerate(per_seed, 1))


def write_results(out: Path, runs: dict, equal: dict, startup: dict, bares: list[float],
                  alone: dict, args: Any) -> None:
    """The Markdown table (for the README) and the CSV of every run; the ratios to the bare
    loop use its median over the seeds."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["setup", *runs["rl_pbt"][0]])
        writer.writeheader()
        for name, rows in runs.items():
            for row in rows:
                writer.writerow({"setup": name, **row})
    _write_csv(out / "startup.csv", ["setup", "first_result_s"],
               ((name, value) for name, values in startup.items() for value in values))
    _write_csv(out / "trial_alone.csv", ["setup", "seed", "steps_per_s", "bare_steps_per_s"],
               ((name, seed, value, bares[seed - 1]) for name, seed, value in _per_seed(alone)))
    _write_csv(out / "equal_budget.csv", ["setup", "seed", "efficiency"], _per_seed(equal))
    ours, ray = runs["rl_pbt"], runs["ray_defaults"]
    ours_solve = solve_median([r["solve_s"] for r in ours])
    ray_solve = solve_median([r["solve_s"] for r in ray])
    solve_ratio = (_ratio(ray_solve, ours_solve) if ray_solve < math.inf
                   else f"> {_ratio(args.budget, ours_solve)} (budget / ours)")
    bare = statistics.median(bares)
    trial = median([r["trial_steps_per_s"] for r in ours])
    sampling = median([r["sampling_steps_per_s"] for r in ours])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine}; {args.seeds} seeds, budget "
        f"{args.budget:.0f} s per run; CartPole-v1, target {TARGET:.0f}, population 4.",
        "",
        "| measure | rl_pbt defaults | Ray/RLlib defaults | ratio |",
        "| --- | --- | --- | --- |",
        f"| time to solve, s (median [min-max]) | "
        f"{solve_spread([r['solve_s'] for r in ours], args.budget)} | "
        f"{solve_spread([r['solve_s'] for r in ray], args.budget)} | {solve_ratio} |",
        f"| wall time of the run, s | {spread([r['wall_s'] for r in ours])} | "
        f"{spread([r['wall_s'] for r in ray])} | |",
        f"| PBT efficiency (training s / (wall s x slots)) | "
        f"{spread([r['efficiency'] for r in ours], 2)} | "
        f"{spread([r['efficiency'] for r in ray], 2)} | |",
        f"| the same, from the first iteration's start to the last result | "
        f"{spread([r['span_efficiency'] for r in ours], 2)} | "
        f"{spread([r['span_efficiency'] for r in ray], 2)} | |",
        f"| share of the wall time inside that span (the ceiling of the efficiency) | "
        f"{spread([r['span_share'] for r in ours], 2)} | "
        f"{spread([r['span_share'] for r in ray], 2)} | |",
        f"| the same, over equal {args.equal_budget:.0f} s runs (target off) | "
        f"{spread(equal['rl_pbt'], 2)} | {spread(equal['ray_defaults'], 2)} | |",
        f"| one trial alone on the machine, env steps/s while training (start config) | "
        f"{spread(alone['rl_pbt'])} | {spread(alone['ray_defaults'])} | "
        f"{_ratio(median(alone['rl_pbt']), bare)} of bare |",
        f"| one trial's env steps/s while training (sampling + learning), in the runs | "
        f"{spread([r['trial_steps_per_s'] for r in ours])} | "
        f"{spread([r['trial_steps_per_s'] for r in ray])} | {_ratio(trial, bare)} of bare |",
        f"| one trial's env steps/s while sampling (no learning, as the bare loop) | "
        f"{spread([r['sampling_steps_per_s'] for r in ours])} | n/a (remote env runners) | "
        f"{_ratio(sampling, bare)} of bare |",
        f"| bare loop (16 envs + 64x64 MLP, no learning), steps/s | {spread(bares, 0)} | | |",
        f"| start-up: launch to first trial result, s | {spread(startup['rl_pbt'])} | "
        f"plain Tune script: {spread(startup['plain_tune'])} | "
        f"{_ratio(median(startup['rl_pbt']), median(startup['plain_tune']))} |",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


if __name__ == "__main__":
    main()

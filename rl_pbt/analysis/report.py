"""Everything written after a run: plots, report.md, best_schedule.json, an experiment file.

Works on any run folder that rl_pbt wrote (``run.json``, ``trials.jsonl``, ``exploits.jsonl``),
at the end of a tuning run or later with ``python -m rl_pbt.report RUN_DIR``.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from rl_pbt.analysis.lineage import RunRecords, Segment, best_of, lineage, winning_schedule
from rl_pbt.analysis.plots import hyperparameters_figure, returns_figure, save_figure
from rl_pbt.errors import ConfigError
from rl_pbt.records import read_json, write_json
from rl_pbt.stopping import target_reached
from rl_pbt.values import short

EXPERIMENT_FILE = "best_experiment.yaml"


@dataclass(frozen=True)
class Report:
    """Paths of what :func:`write_report` wrote."""

    returns_png: Path
    hyperparameters_png: Path
    markdown: Path
    schedule_json: Path
    experiment_yaml: Path

    def paths(self) -> list[Path]:
        return [self.returns_png, self.hyperparameters_png, self.markdown, self.schedule_json,
                self.experiment_yaml]


def load_info(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run folder; a folder without one is not an rl_pbt run."""
    info = read_json(run_dir / "run.json")
    if info is None:
        raise ConfigError(f"{run_dir}: not an rl_pbt run folder (no run.json)")
    return info


def best_trial(records: RunRecords, mode: str) -> str:
    """The trial whose latest return is best (picked as ``summary.json`` picks it)."""
    if not records.rows:
        raise ConfigError("trials.jsonl holds no result (the run ended before its first "
                          "iteration, or the file was emptied); nothing to report")
    best = best_of(records.scored_rows(), mode)
    if best is None:
        raise ConfigError("no trial reported a return (no episode finished); nothing to report")
    return best["trial_id"]


def write_report(run_dir: Path) -> Report:
    """Write plots, ``report.md``, ``best_schedule.json`` and the experiment file."""
    info = load_info(run_dir)
    records = RunRecords.load(run_dir)
    best = best_trial(records, info.get("mode", "max"))
    segments = lineage(records, best)
    schedule = winning_schedule(segments)
    final = records.final_rows()[best]
    scored = records.last_scored(best) or final
    schedule_json = write_json({
        "trial_id": best, "return": scored["return"], "env_steps": final["env_steps"],
        "final_hyperparameters": final["hyperparameters"], "schedule": schedule,
        "lineage": [asdict(s) for s in segments],
    }, run_dir / "best_schedule.json")
    report = Report(
        returns_png=save_figure(returns_figure(records, segments, info),
                                run_dir / "returns.png"),
        hyperparameters_png=save_figure(hyperparameters_figure(records, segments, info),
                                        run_dir / "hyperparameters.png"),
        markdown=run_dir / "report.md",
        schedule_json=schedule_json,
        experiment_yaml=run_dir / EXPERIMENT_FILE,
    )
    report.markdown.write_text(markdown(info, records, best, segments, schedule))
    report.experiment_yaml.write_text(experiment_file(info, final, scored["return"], run_dir))
    return report


def reproduce_command(info: Mapping[str, Any]) -> str:
    """The command line of the run, with its seed pinned."""
    command = info.get("command") or "python -m rl_pbt"
    tuning = re.match(r"python -m rl_pbt( |$)", command)  # not rl_pbt.replay etc.
    if tuning and not re.search(r"(^|\s)seed=", command):
        command += f" seed={info.get('seed')}"
    return command


def markdown(
    info: Mapping[str, Any], records: RunRecords, best: str, segments: Sequence[Segment],
    schedule: Sequence[Mapping[str, Any]],
) -> str:
    """The report: best return, winning schedule, population statistics, how to reproduce."""
    scored = records.scored_rows()
    returns = [r["return"] for r in scored]
    final = next(r for r in scored if r["trial_id"] == best)
    target = info.get("target_return")
    reached = target_reached(final["return"], target, info.get("mode", "max"))
    keys = list(info.get("mutations") or final["hyperparameters"])
    lines = [
        f"# {info.get('name', 'PBT run')}",
        "",
        f"Best agent: trial `{best}`, mean episode return **{final['return']:.1f}** after "
        f"{final['env_steps']:.0f} env steps ({final['training_iteration']} iterations)"
        + (f"; target {target:g} {'reached' if reached else 'not reached'}." if target is not None
           else "."),
        "",
        "## Winning schedule",
        "",
        "The hyperparameters the best agent was trained with, stretch by stretch (its weights "
        "passed through these trials by PBT exploits)." if len(segments) > 1 else
        "The hyperparameters the best agent was trained with (one trial, no exploit in its "
        "lineage).",
        "",
        "| from iteration | from env step | trained by | " + " | ".join(keys) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for point in schedule:
        values = " | ".join(short(point["hyperparameters"].get(k)) for k in keys)
        lines.append(f"| {point['iteration']} | {point['env_steps']} | `{point['trial_id']}` | "
                     f"{values} |")
    lines += [
        "",
        "## Population",
        "",
        f"- trials: {len(records.trial_ids())}, exploits: {len(records.exploits)}",
        f"- latest return of the {len(returns)} scored trials: "
        f"mean {statistics.fmean(returns):.1f}, "
        f"std {statistics.pstdev(returns):.1f}, min {min(returns):.1f}, max {max(returns):.1f}",
        f"- stretches in the best agent's lineage: {len(segments)} "
        f"(trials {', '.join(dict.fromkeys(s.trial_id for s in segments))})",
        "",
        "![returns](returns.png)",
        "",
        "![hyperparameters](hyperparameters.png)",
        "",
        "## Reproduce",
        "",
        "```bash",
        reproduce_command(info),
        "```",
        "",
        "The seed fixes the initial draws and the random stream of PBT's choices; which trial "
        "reaches its perturbation first depends on the machine's timing, so a second run's "
        "exploits (and the results after them) can differ. `replay` trains the winning "
        "schedule again on fresh seeds.",
        "",
        f"Train one agent with the best final hyperparameters, fixed: copy `{EXPERIMENT_FILE}` "
        "to `DIR/experiment/best.yaml` and run "
        "`python -m rl_pbt --config-dir DIR experiment=best`.",
        "",
    ]
    return "\n".join(lines)


def experiment_file(
    info: Mapping[str, Any], final: Mapping[str, Any], reached: float, run_dir: Path,
) -> str:
    """A ``@package _global_`` experiment: the run's setup, best final values fixed, one agent.

    ``reached``: the trial's last return; its final row has none when its last iteration
    finished no episode (500-step CartPole episodes span iterations).
    """
    config = info.get("config") or {}
    algorithm_config = dict((config.get("algorithm") or {}).get("config") or {})
    algorithm_config.update(final["hyperparameters"])
    choices = info.get("choices") or {}
    defaults = [{f"override /{g}": choices[g]} for g in ("env", "resources") if g in choices]
    body = {
        "defaults": [*defaults, {"override /scheduler": "fifo"}],
        "population": 1,
        "mutations": {"start": "config"},
        "algorithm": {"config": algorithm_config},
    }
    for group in ("env", "stopper"):
        if config.get(group):
            body[group] = config[group]
    header = (f"# @package _global_\n# From {run_dir}: trial {final['trial_id']} reached "
              f"{reached:.1f}.\n# One agent with its final hyperparameters, fixed "
              f"(no PBT).\n")
    return header + yaml.safe_dump(body, sort_keys=False)

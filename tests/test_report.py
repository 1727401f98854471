"""Report of a hand-made run folder: plots hold the right series, exports compose and resolve."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from rl_pbt.analysis.lineage import RunRecords, lineage
from rl_pbt.analysis.plots import hyperparameters_figure, returns_figure
from rl_pbt.analysis.report import write_report
from rl_pbt.cli import CONF_DIR
from rl_pbt.errors import ConfigError
from rl_pbt.report import main as report_main
from rl_pbt.resolve import resolve
from rl_pbt.summary import format_summary

MUTATIONS = {"lr": {"type": "LogUniform", "low": 1e-5, "high": 1e-2, "log": True,
                    "integer": False},
             "clip_param": {"type": "Uniform", "low": 0.1, "high": 0.3, "log": False,
                            "integer": False}}


def _row(trial, iteration, t, lr, clip, ret):
    return {"trial_id": trial, "training_iteration": iteration, "recorded_at": t,
            "env_steps": 1000 * iteration, "return": ret,
            "hyperparameters": {"lr": lr, "clip_param": clip}}


@pytest.fixture
def run_dir(tmp_path):
    """Trial b clones a after iteration 2; b ends best."""
    cfg = OmegaConf.to_container(compose_config(["stopper.max_iterations=4"]), resolve=True)
    info = {"name": "PPO-CartPole-v1", "metric": "env_runners/episode_return_mean",
            "mode": "max", "target_return": 450.0, "population": 2, "seed": 5,
            "command": "python -m rl_pbt population=2", "choices": {"env": "cartpole"},
            "mutations": MUTATIONS, "config": cfg}
    rows = [_row("a", 1, 1, 1e-3, 0.2, 20), _row("b", 1, 1, 1e-4, 0.3, 10),
            _row("a", 2, 2, 1e-3, 0.2, 40), _row("b", 2, 2, 1e-4, 0.3, 15),
            _row("a", 3, 3, 1e-3, 0.2, 60), _row("b", 3, 3, 1.2e-3, 0.16, 70),
            _row("a", 4, 4, 1e-3, 0.2, 80), _row("b", 4, 4, 1.2e-3, 0.16, 95)]
    exploit = {"trial_id": "b", "source_id": "a", "iteration": 2, "source_iteration": 2,
               "old": {"lr": 1e-4, "clip_param": 0.3}, "new": {"lr": 1.2e-3, "clip_param": 0.16},
               "wall_time": 2.5}
    (tmp_path / "run.json").write_text(json.dumps(info))
    (tmp_path / "trials.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "exploits.jsonl").write_text(json.dumps(exploit) + "\n")
    return tmp_path


def test_returns_plot_holds_every_trial_the_lineage_and_the_exploit(run_dir):
    records = RunRecords.load(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    fig = returns_figure(records, lineage(records, "b"), info)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"trial a", "trial b", "best agent's lineage", "target 450"} <= set(lines)
    best = lines["best agent's lineage"]
    assert list(best.get_xdata()) == [1000, 2000, 3000, 4000]
    assert list(best.get_ydata()) == [20, 40, 70, 95]  # a's first two, then b's
    assert ax.get_xlabel().startswith("env steps") and ax.get_ylabel() == "mean episode return"
    assert [t.get_text() for t in ax.texts] == ["a→b"]
    assert ax.get_title()


def test_an_exploit_at_the_runs_end_is_marked_at_the_clones_checkpoint(run_dir):
    """a took b's weights at the last iteration and never scored again: the plot had one
    triangle for the report's two exploits."""
    last = {"trial_id": "a", "source_id": "b", "iteration": 4, "source_iteration": 4,
            "old": {"lr": 1e-3, "clip_param": 0.2}, "new": {"lr": 1.4e-3, "clip_param": 0.16},
            "wall_time": 4.5}
    with (run_dir / "exploits.jsonl").open("a") as rows:
        rows.write(json.dumps(last) + "\n")
    records = RunRecords.load(run_dir)
    fig = returns_figure(records, lineage(records, "b"), json.loads(
        (run_dir / "run.json").read_text()))
    texts = {t.get_text(): t.xy for t in fig.axes[0].texts}
    assert texts == {"a→b": (3000, 70), "b→a (not scored since)": (4000, 95)}


def test_hyperparameter_panels_use_log_scale_where_the_distribution_does(run_dir):
    records = RunRecords.load(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    fig = hyperparameters_figure(records, lineage(records, "b"), info)
    lr_ax, clip_ax = fig.axes
    assert lr_ax.get_yscale() == "log" and clip_ax.get_yscale() == "linear"
    schedule = {line.get_label(): line for line in clip_ax.get_lines()}["winning schedule"]
    assert list(schedule.get_ydata()) == [0.2, 0.2, 0.16, 0.16]
    assert clip_ax.get_xlabel().startswith("env steps")


def test_report_files_and_exported_experiment_composes(run_dir, tmp_path_factory):
    report = write_report(run_dir)
    for path in report.paths():
        assert path.is_file() and path.stat().st_size > 0
    text = report.markdown.read_text()
    assert "mean episode return **95.0**" in text
    assert "python -m rl_pbt population=2 seed=5" in text
    schedule = json.loads(report.schedule_json.read_text())
    assert [p["trial_id"] for p in schedule["schedule"]] == ["a", "b"]
    assert schedule["final_hyperparameters"] == {"lr": 1.2e-3, "clip_param": 0.16}
    conf = tmp_path_factory.mktemp("conf")
    shutil.copytree(CONF_DIR, conf, dirs_exist_ok=True)
    shutil.copy(report.experiment_yaml, conf / "experiment" / "best.yaml")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=best"])
    plan = resolve(cfg, tmp_path_factory.mktemp("out"))
    assert plan.population == 1 and plan.scheduler.name == "fifo"
    assert plan.param_space["lr"] == 1.2e-3 and plan.param_space["clip_param"] == 0.16
    assert plan.stop.max_iterations == 4


def test_report_of_a_best_trial_whose_last_iteration_finished_no_episode(run_dir):
    """b's last iteration finished no episode (500-step CartPole episodes span iterations), so
    its last row has no return: a default benchmark run crashed in the report on this."""
    with (run_dir / "trials.jsonl").open("a") as rows:
        rows.write(json.dumps(_row("b", 5, 5, 1.2e-3, 0.16, None)) + "\n")
    report = write_report(run_dir)
    assert "trial b reached 95.0." in report.experiment_yaml.read_text()
    assert json.loads(report.schedule_json.read_text())["return"] == 95


def test_report_command_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        report_main([str(tmp_path)])
    assert stop.value.code == 2
    assert "not an rl_pbt run folder (no run.json)" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        write_report(tmp_path)


def test_summary_says_why_a_trial_has_no_return():
    """A trial exploited at the run's last turn holds the clone's agent, never scored: the
    summary says so instead of a bare n/a."""
    trial = {"trial_id": "b", "return": None, "return_iteration": None, "iterations": 32,
             "exploits": 1, "error": None, "unscored_since": {"source_id": "a", "iteration": 32}}
    summary = {"name": "x", "wall_time_s": 60.0, "exploits": 1, "trials": [trial],
               "metric": "m", "mode": "max", "output_dir": "out"}
    assert ("trial b: return n/a (took a's weights at iteration 32, no episode finished since), "
            "32 it" in format_summary(summary))
    summary["best"] = None
    assert "No trial reported m (no episode finished)." in format_summary(summary)
    # stopper.max_seconds ran out before any iteration ended: episodes are not the reason
    trial.update(iterations=None, unscored_since=None)
    assert "No trial finished an iteration before the run stopped." in format_summary(summary)
    summary["best"] = {"trial_id": "b", "return": 95.0, "env_steps": 100, "iterations": 32,
                       "hyperparameters": {}, "checkpoint": None}
    trial.update(error="ValueError: the env broke")
    text = format_summary(summary)
    assert "best trial   b: return 95.0, then it failed" in text
    assert "checkpoint   none left in the trial folder" in text


def test_the_summary_says_what_stopped_the_run():
    """A wall-time budget, a target, the iteration caps or ASHA: the summary said only whether
    the target was reached."""
    from types import SimpleNamespace as NS

    from rl_pbt.plan import StopRule
    from rl_pbt.summary import stopped_by

    def plan(scheduler="pbt", **rule):
        stop = {"max_iterations": 50, "target_return": 450.0, "max_env_steps": None,
                "max_seconds": None, "stop_all_at_target": True, **rule}
        return NS(stop=StopRule("m", "max", **stop),
                  scheduler=NS(name=scheduler, options={"max_t": 6}))

    def row(ret, iterations, steps=1000, error=None, stopped_early_at=None):
        return {"return": ret, "iterations": iterations, "env_steps": steps, "error": error,
                "stopped_early_at": stopped_early_at}

    assert stopped_by(plan(), [row(460, 20), row(300, 19)], 30) == "a trial reached the target 450"
    assert stopped_by(plan(max_seconds=8), [row(30, 3), row(20, 2)], 8.4) == \
        "the wall-time budget of 8 s ran out"
    assert stopped_by(plan(), [row(300, 50), row(200, 50)], 60) == \
        "every trial reached its iteration cap (50)"
    assert stopped_by(plan(max_env_steps=5000), [row(30, 3, 6015), row(20, 3, 6000)], 9) == \
        "every trial spent its env-step budget (5000)"
    assert stopped_by(plan("asha", max_iterations=6), [row(30, 6), row(20, 1, stopped_early_at=1)],
                      9) == "ASHA stopping 1 of 2 trials early; the others ran to their caps"
    assert stopped_by(plan("asha", max_iterations=9), [row(30, 6), row(20, 6)], 9) == \
        "ASHA's max_t (6) or each trial's own stop rule"
    assert stopped_by(plan(), [row(30, 6, error="E: x"), row(20, 1, error="E: y")], 9) == \
        "every trial failed"


def test_a_lineage_without_exploits_is_not_said_to_pass_through_them(run_dir):
    """ASHA, random search, FIFO (or PBT without an exploit): one trial made the agent."""
    text = write_report(run_dir).markdown.read_text()
    assert "passed through these trials by PBT exploits" in text
    (run_dir / "exploits.jsonl").write_text("")
    text = write_report(run_dir).markdown.read_text()
    assert "one trial, no exploit in its lineage" in text
    assert "PBT exploits" not in text


def test_the_exploit_line_names_the_clones_iteration(capsys):
    """The clone's checkpoint can be older (PBT's save at its perturbation) or newer (a pruned
    save's fallback) than the exploited trial's iteration: the line says which was copied."""
    from rl_pbt.progress import ProgressPrinter
    from rl_pbt.schedulers import ExploitEvent

    ProgressPrinter("m", "max").on_exploit(ExploitEvent(
        trial_id="b", source_id="a", iteration=20, source_iteration=12, old={"lr": 1e-4},
        new={"lr": 1.2e-4}, wall_time=0.0))
    assert capsys.readouterr().out == "[pbt] b cloned a (iteration 12) at iteration 20: " \
        "lr 0.0001->0.00012\n"


def test_a_trial_asha_stopped_early_says_so_in_the_summary(run_dir):
    """The recorder's early stop reaches the trial's row and its summary line; a trial at its
    cap says nothing of ASHA."""
    from types import SimpleNamespace as NS

    from rl_pbt.records import RunRecorder
    from rl_pbt.schedulers import EarlyStop
    from rl_pbt.summary import trial_rows

    recorder = RunRecorder(run_dir, "m", ["lr"])
    recorder.on_early_stop(EarlyStop("a", 4, float("nan")))
    recorder.on_early_stop(EarlyStop("b", 2, 15.0))  # before a kill; the resume trained on
    rows = {row["trial_id"]: row for row in trial_rows(NS(output_dir=run_dir), [], {})}
    assert (rows["a"]["stopped_early_at"], rows["b"]["stopped_early_at"]) == (4, None)
    summary = {"name": "x", "wall_time_s": 9.0, "exploits": 1, "trials": list(rows.values()),
               "metric": "m", "mode": "max", "output_dir": "out", "best": None}
    text = format_summary(summary)
    assert "trial a: return 80.0, 4 it, 0 exploits, stopped early by ASHA at iteration 4" in text
    assert "trial b: return 95.0, 4 it, 0 exploits\n" in text


def test_a_retry_says_where_it_restarts(capsys):
    """A trial failing before its first checkpoint restarts from scratch; the line said 'from
    its last checkpoint' and the summary then had none."""
    from types import SimpleNamespace as NS

    from rl_pbt.progress import ProgressPrinter

    printer = ProgressPrinter("m", "max")
    trial = NS(trial_id="a", checkpoint=None, num_failures=1, error_file=None,
               last_result={"training_iteration": 1})
    printer.on_trial_recover(0, [trial], trial)
    trial.checkpoint = object()
    printer.on_trial_recover(0, [trial], trial)
    assert capsys.readouterr().out.splitlines() == [
        "[fail] a failed after iteration 1 (unknown error); retrying from the start (no "
        "checkpoint yet) (failure 1)",
        "[fail] a failed after iteration 1 (unknown error); retrying from its last checkpoint "
        "(failure 1)"]

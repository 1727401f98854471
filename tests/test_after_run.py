"""After a tiny tuning run: the report, evaluation of the best agent, and replay of its schedule."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import TINY, compose_config
from mlflow.tracking import MlflowClient

from rl_pbt import evaluate, replay
from rl_pbt.errors import ConfigError
from rl_pbt.resolve import resolve
from rl_pbt.run import execute

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("after_run")
    # synch: the whole population perturbs together, so the bottom half always clones the top
    # half; asynchronous PBT made no exploit at all in one CI run of this tiny experiment.
    cfg = compose_config([*TINY, "seed=11", "scheduler.synch=true",
                          "tracking.experiment_name=after_run"])
    plan = resolve(cfg, out / "run", choices={"env": "cartpole"}, launch_dir=out)
    summary = execute(plan)
    return plan, summary


def test_report_is_written_and_logged_to_the_parent(finished_run):
    plan, summary = finished_run
    for name in ("returns.png", "hyperparameters.png", "report.md", "best_schedule.json",
                 "best_experiment.yaml"):
        assert (plan.output_dir / name).stat().st_size > 0, name
    client = MlflowClient(plan.tracking.tracking_uri)
    logged = {a.path for a in client.list_artifacts(summary["tracking"]["parent_run_id"],
                                                    "report")}
    assert "report/returns.png" in logged and "report/report.md" in logged


def test_evaluate_the_best_agent_with_a_video(finished_run):
    plan, summary = finished_run
    result = evaluate.main([str(plan.output_dir), "episodes=2", "video=true"])
    assert result["episodes"] == 2 and len(result["per_episode"]) == 2
    returns = [e["return"] for e in result["per_episode"]]
    assert result["return_mean"] == pytest.approx(sum(returns) / 2)
    assert returns == [e["length"] for e in result["per_episode"]]  # CartPole: +1 a step
    assert result["checkpoint"] == summary["best"]["checkpoint"]
    gif = plan.output_dir / "evaluation" / "episode.gif"
    assert gif.read_bytes()[:6] == b"GIF89a"
    assert result["file"] == str(plan.output_dir / "evaluation" / "evaluation.json")
    client = MlflowClient(plan.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == summary["tracking"]["parent_run_id"]
    assert run.data.metrics["return_mean"] == pytest.approx(result["return_mean"])
    logged = {a.path for a in client.list_artifacts(result["mlflow_run_id"], "evaluation")}
    assert logged == {"evaluation/evaluation.json", "evaluation/episode.gif"}
    again = evaluate.main([str(plan.output_dir), "episodes=1"])  # no video: no earlier GIF
    logged = {a.path for a in client.list_artifacts(again["mlflow_run_id"], "evaluation")}
    assert logged == {"evaluation/evaluation.json"}


def test_evaluate_in_another_env_or_without_its_tracking_server(finished_run, tmp_path,
                                                                 capsys):
    """An env whose observations do not fit the module failed deep in torch; a run whose
    MLflow server is gone failed after the evaluation was written."""
    plan, _ = finished_run
    with pytest.raises(SystemExit) as stop:
        evaluate.main([str(plan.output_dir), "env=Pendulum-v1", "episodes=1"])
    assert stop.value.code == 2
    assert ("env=Pendulum-v1: its observations (Box of shape (3,)) do not fit the checkpoint's "
            "module, trained on Box of shape (4,)") in capsys.readouterr().err
    copy = tmp_path / "run"
    copy.mkdir()
    summary = json.loads((plan.output_dir / "summary.json").read_text())
    summary["tracking"]["tracking_uri"] = "http://127.0.0.1:9"  # discard port: nothing listens
    (copy / "summary.json").write_text(json.dumps(summary))
    (copy / "run.json").write_text((plan.output_dir / "run.json").read_text())
    result = evaluate.main([str(copy), "episodes=1"])
    assert result["mlflow_run_id"] is None
    assert "MLflow     not logged: tracking.tracking_uri: cannot reach MLflow at " \
           "http://127.0.0.1:9" in capsys.readouterr().out
    assert (copy / "evaluation" / "evaluation.json").is_file()
    gone = tmp_path / "moved" / "mlflow.db"  # a SQLite store moved away: not made anew
    gone.parent.mkdir()
    summary["tracking"]["tracking_uri"] = f"sqlite:///{gone}"
    (copy / "summary.json").write_text(json.dumps(summary))
    assert evaluate.main([str(copy), "episodes=1"])["mlflow_run_id"] is None
    assert f"MLflow     not logged: tracking.tracking_uri: the run's MLflow store {gone} is " \
           "gone" in capsys.readouterr().out
    assert not gone.exists()


def test_replay_of_an_unfinished_run_writes_nothing_into_it(finished_run, tmp_path, capsys):
    plan, _ = finished_run
    copy = tmp_path / "run"
    for name in ("run.json", "trials.jsonl", "exploits.jsonl"):
        (copy / name).parent.mkdir(exist_ok=True)
        (copy / name).write_text((plan.output_dir / name).read_text())
    with pytest.raises(SystemExit) as stop:
        replay.main([str(copy), "seeds=1"])
    assert stop.value.code == 2
    assert "no summary.json (the run did not finish)" in capsys.readouterr().err
    assert sorted(p.name for p in copy.iterdir()) == ["exploits.jsonl", "run.json",
                                                      "trials.jsonl"]


def test_winning_schedule_is_what_the_lineage_trained_with(finished_run):
    """Each stretch after the first starts at an exploit whose new values it trained with
    (checked on every trial's lineage, the best one's included)."""
    from dataclasses import asdict

    from rl_pbt.analysis.lineage import RunRecords, lineage

    plan, _ = finished_run
    records = RunRecords.load(plan.output_dir)
    best = json.loads((plan.output_dir / "best_schedule.json").read_text())
    assert best["lineage"] == [asdict(s) for s in lineage(records, best["trial_id"])]
    pairs = [pair for trial in records.trial_ids()
             for pair in itertools.pairwise([asdict(s) for s in lineage(records, trial)])]
    assert pairs  # the tiny run exploits, so some trial's weights changed hands
    for earlier, later in pairs:
        events = [e for e in records.exploits
                  if e["trial_id"] == later["trial_id"] and e["source_id"] == earlier["trial_id"]
                  and e["new"] == later["hyperparameters"]]
        assert events, (earlier, later)
        after = [r for r in records.rows_of(later["trial_id"])
                 if r["recorded_at"] > events[-1]["wall_time"]]
        first = min(after, key=lambda r: r["recorded_at"])
        assert first["training_iteration"] == later["first_iteration"]
        assert first["hyperparameters"] == later["hyperparameters"]
        assert first["probe"]["lr_first_update"] == pytest.approx(later["hyperparameters"]["lr"])


def test_replay_follows_the_winning_schedule_on_fresh_seeds(finished_run):
    plan, summary = finished_run
    out = replay.main([str(plan.output_dir), "seeds=2"])
    assert len(out["replay_returns"]) == 2
    assert out["original_best_return"] == pytest.approx(summary["best"]["return"])
    schedule = json.loads((plan.output_dir / "best_schedule.json").read_text())["schedule"]
    rows = [json.loads(line) for line in
            (plan.output_dir / "replay").glob("*/trials.jsonl").__next__().read_text().splitlines()]
    for row in rows:
        # the schedule point in force for this iteration
        point = [p for p in schedule if p["iteration"] < row["training_iteration"]][-1]
        assert row["hyperparameters"] == pytest.approx(point["hyperparameters"])
        assert row["probe"]["lr_first_update"] == pytest.approx(point["hyperparameters"]["lr"])
    client = MlflowClient(plan.tracking.tracking_uri)
    replays = client.search_runs(
        [summary["tracking"]["experiment_id"]],
        f"tags.`mlflow.parentRunId` = '{summary['tracking']['parent_run_id']}' "
        "and tags.`rl_pbt.replay_of` != ''")
    assert len(replays) == 1


def test_missing_or_corrupt_checkpoint_is_one_clear_error(tmp_path, capsys):
    broken = tmp_path / "checkpoint_000001" / evaluate.MODULE_PATH
    broken.mkdir(parents=True)
    (broken / "module_state.pkl").write_bytes(b"not a pickle")
    for args, message in (([str(tmp_path / "nothing")], "no such run folder or checkpoint"),
                          ([str(tmp_path)], "not an RLlib checkpoint"),
                          ([str(tmp_path / "checkpoint_000001"), "env=CartPole-v1"],
                           "cannot load the checkpoint")):
        with pytest.raises(SystemExit) as stop:
            evaluate.main(args)
        assert stop.value.code == 2
        assert message in capsys.readouterr().err


def test_a_checkpoint_path_with_equals_signs_is_the_path(tmp_path, monkeypatch):
    """Every Tune trial folder has '=' in its name: such a path is not an option."""
    # A custom env's trial folder: word characters up to the first '=' (no '-' in the name).
    checkpoint = tmp_path / "PBTPPO_rl_pbt_custom_2d537_00000_0_clip_param=0.2,lr=0.0002" / \
        "checkpoint_000004"
    checkpoint.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    relative = str(checkpoint.relative_to(tmp_path))
    for path in (str(checkpoint), relative):
        assert evaluate.parse_options([path, "episodes=3"]) == (
            Path(path), {"episodes": 3, "video": False, "seed": 0, "env": None})
    for args, message in ((["x", "video=maybe"], "video: cannot read 'maybe'; give true or false"),
                          (["x", "episodes=abc"], "episodes: cannot read 'abc'; give an integer")):
        with pytest.raises(ConfigError, match=message):
            evaluate.parse_options(args)


@pytest.mark.parametrize(("module", "option"), [("evaluate", "episodes=..."),
                                                ("replay", "seeds=...")])
def test_help_lists_the_options(module, option, capsys):
    """--help said 'no such run folder or checkpoint' (evaluate) or 'not an rl_pbt run folder'
    (replay), exit 2: the options were only in the source."""
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"rl_pbt.{module}").main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m rl_pbt.{module} ") and option in out

"""Lineage on hand-written records with known answers."""

from __future__ import annotations

import json

import pytest

from rl_pbt.analysis.lineage import RunRecords, Segment, lineage, winning_schedule

STEPS = 1000  # env steps per iteration in these records


def row(trial, iteration, t, lr, ret=0.0):
    return {"trial_id": trial, "training_iteration": iteration, "recorded_at": t,
            "env_steps": iteration * STEPS, "return": ret, "hyperparameters": {"lr": lr}}


def exploit(trial, source, t, old_lr, new_lr, iteration):
    return {"trial_id": trial, "source_id": source, "iteration": iteration,
            "source_iteration": iteration, "old": {"lr": old_lr}, "new": {"lr": new_lr},
            "wall_time": t}


def test_trial_without_exploits_is_one_segment():
    records = RunRecords([row("a", i, i, 0.1) for i in (1, 2, 3)], [])
    assert lineage(records, "a") == [Segment("a", 1, 3, 0.0, 3000.0, {"lr": 0.1})]


def test_chain_of_three_trials():
    """c trained 1-2; b cloned c after 2 and trained 3-4; a cloned b after 4 and trained 5-6."""
    rows = [row("c", 1, 1, 0.3), row("c", 2, 2, 0.3), row("c", 3, 3.5, 0.3),
            row("b", 1, 1, 0.2), row("b", 2, 2, 0.2),
            row("b", 3, 3, 0.25), row("b", 4, 4, 0.25), row("b", 5, 5.5, 0.25),
            row("a", 1, 1, 0.1), row("a", 2, 2, 0.1), row("a", 3, 3, 0.1), row("a", 4, 4, 0.1),
            row("a", 5, 5, 0.22), row("a", 6, 6, 0.22)]
    exploits = [exploit("b", "c", 2.5, 0.2, 0.25, 2), exploit("a", "b", 4.5, 0.1, 0.22, 4)]
    segments = lineage(RunRecords(rows, exploits), "a")
    assert [(s.trial_id, s.first_iteration, s.last_iteration) for s in segments] == [
        ("c", 1, 2), ("b", 3, 4), ("a", 5, 6)]
    assert [s.hyperparameters["lr"] for s in segments] == [0.3, 0.25, 0.22]
    assert [s.start_env_steps for s in segments] == [0, 2000, 4000]
    schedule = winning_schedule(segments)
    assert [(p["iteration"], p["env_steps"], p["hyperparameters"]["lr"]) for p in schedule] == [
        (0, 0, 0.3), (2, 2000, 0.25), (4, 4000, 0.22)]


def test_trial_cloned_twice_keeps_only_the_surviving_branch():
    """a cloned b after 2 (rewinding to b's iteration 2), then b again after 4.

    a's own rows 3-4 after the first exploit were overwritten by the second clone, and b's
    iterations 3-4 carried the weights a ends with."""
    rows = [row("b", i, i, 0.5) for i in (1, 2, 3, 4, 5)]
    rows += [row("a", 1, 1, 0.1), row("a", 2, 2, 0.1),
             row("a", 3, 3, 0.6), row("a", 4, 4, 0.6),
             row("a", 5, 5, 0.4), row("a", 6, 6, 0.4)]
    exploits = [exploit("a", "b", 2.5, 0.1, 0.6, 2), exploit("a", "b", 4.5, 0.6, 0.4, 4)]
    segments = lineage(RunRecords(rows, exploits), "a")
    assert [(s.trial_id, s.first_iteration, s.last_iteration) for s in segments] == [
        ("b", 1, 4), ("a", 5, 6)]
    assert [s.hyperparameters["lr"] for s in segments] == [0.5, 0.4]


def test_clone_from_an_older_checkpoint_rewinds_iterations():
    """a (at iteration 6) clones b whose last checkpoint is from iteration 3: a resumes at 4."""
    rows = [row("b", i, i, 0.5) for i in (1, 2, 3, 4, 5, 6)]
    rows += [row("a", i, i, 0.1) for i in (1, 2, 3, 4, 5, 6)]
    rows += [row("a", 4, 7, 0.6), row("a", 5, 8, 0.6)]
    exploits = [exploit("a", "b", 6.5, 0.1, 0.6, 6)]
    segments = lineage(RunRecords(rows, exploits), "a")
    assert [(s.trial_id, s.first_iteration, s.last_iteration) for s in segments] == [
        ("b", 1, 3), ("a", 4, 5)]


def test_exploit_after_the_last_result_is_ignored():
    rows = [row("b", 1, 1, 0.5), row("a", 1, 1, 0.1), row("a", 2, 2, 0.1)]
    segments = lineage(RunRecords(rows, [exploit("a", "b", 3, 0.1, 0.6, 2)]), "a")
    assert [(s.trial_id, s.first_iteration, s.last_iteration) for s in segments] == [
        ("a", 1, 2)]


def test_records_load_from_a_run_folder(tmp_path):
    (tmp_path / "trials.jsonl").write_text(
        "\n".join(json.dumps(row("a", i, i, 0.1)) for i in (1, 2)) + "\n")
    records = RunRecords.load(tmp_path)
    assert records.trial_ids() == ["a"] and records.exploits == []
    with pytest.raises(KeyError, match="no results for trial 'z'"):
        lineage(records, "z")


def test_last_scored_skips_iterations_without_a_finished_episode():
    """a finished no episode in iteration 3 (a long episode spans iterations): its return is
    iteration 2's. b was exploited after its last scored row: its agent has no return yet."""
    rows = [row("a", 1, 1, 0.1, 20.0), row("a", 2, 2, 0.1, 480.0), row("a", 3, 3, 0.1, None),
            row("b", 1, 1, 0.2, 30.0), row("b", 2, 2, 0.2, None), row("b", 3, 3.5, 0.5, None)]
    records = RunRecords(rows, [exploit("b", "a", 2.5, 0.2, 0.5, 2)])
    assert records.last_scored("a")["training_iteration"] == 2
    assert records.last_scored("b") is None
    assert [r["trial_id"] for r in records.scored_rows()] == ["a"]
    assert records.last_exploit("b")["source_id"] == "a" and records.last_exploit("a") is None

"""PNG plots of a PBT run: returns with exploits marked, and each hyperparameter's schedule.

Both take env steps as the x axis (the agent's experience, comparable across trials) and draw
the best trial's lineage on top in black, so the winning path stands out from the population.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rl_pbt.analysis.lineage import RunRecords, Segment

LINEAGE_STYLE = {"color": "black", "linewidth": 2.6, "zorder": 5}


def trial_stretches(records: RunRecords, trial_id: str) -> list[list[dict[str, Any]]]:
    """A trial's rows in the order they happened, split wherever an exploit replaced its agent."""
    times = sorted(e["wall_time"] for e in records.exploits if e["trial_id"] == trial_id)
    rows = sorted(records.rows_of(trial_id), key=lambda r: r.get("recorded_at", 0.0))
    stretches: list[list[dict[str, Any]]] = [[]]
    for row in rows:
        while times and row.get("recorded_at", 0.0) > times[0]:
            times.pop(0)
            stretches.append([])
        stretches[-1].append(row)
    return [s for s in stretches if s]


def lineage_rows(records: RunRecords, segments: Sequence[Segment]) -> list[dict[str, Any]]:
    """The rows that make up the best agent's history, oldest first."""
    rows: list[dict[str, Any]] = []
    for seg in segments:
        for stretch in trial_stretches(records, seg.trial_id):
            picked = [r for r in stretch
                      if seg.first_iteration <= r["training_iteration"] <= seg.last_iteration]
            if picked and picked[-1]["training_iteration"] == seg.last_iteration:
                rows.extend(picked)
                break
    return rows


def _colors(trial_ids: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(trial_ids) <= 10 else "tab20")
    return {tid: cmap(i % cmap.N) for i, tid in enumerate(trial_ids)}


def _short(trial_id: str) -> str:
    return trial_id.rsplit("_", 1)[-1]


def returns_figure(
    records: RunRecords, segments: Sequence[Segment], info: Mapping[str, Any]
) -> Figure:
    """Episode return against env steps for every trial; exploits marked; lineage in black."""
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = _colors(records.trial_ids())
    for tid in records.trial_ids():
        for i, stretch in enumerate(trial_stretches(records, tid)):
            xs = [r["env_steps"] for r in stretch if r.get("return") is not None]
            ys = [r["return"] for r in stretch if r.get("return") is not None]
            ax.plot(xs, ys, color=colors[tid], alpha=0.75, linewidth=1.3, marker=".",
                    markersize=4, label=f"trial {_short(tid)}" if i == 0 else None)
    _mark_exploits(ax, records, colors)
    best = lineage_rows(records, segments)
    if best:
        ax.plot([r["env_steps"] for r in best if r.get("return") is not None],
                [r["return"] for r in best if r.get("return") is not None],
                label="best agent's lineage", **LINEAGE_STYLE)
    if info.get("target_return") is not None:
        ax.axhline(info["target_return"], color="grey", linestyle=":", linewidth=1,
                   label=f"target {info['target_return']:g}")
    ax.set_title(f"{info.get('name', 'PBT run')}: episode return per trial")
    ax.set_xlabel("env steps (agent's lifetime)")
    ax.set_ylabel("mean episode return")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def _mark_exploits(ax: Axes, records: RunRecords, colors: Mapping[str, Any]) -> None:
    """A triangle where a trial restarted from a clone, labelled ``source→target``; a hollow
    one at the clone's checkpoint for an exploit the run ended before it scored."""
    labelled = False
    for event in records.exploits:
        after = [r for r in records.rows_of(event["trial_id"])
                 if r.get("recorded_at", 0.0) > event["wall_time"] and r.get("return") is not None]
        if not after:
            _mark_unscored(ax, records, event, colors[event["trial_id"]])
            continue
        first = min(after, key=lambda r: r["recorded_at"])
        source = _checkpoint_row(records, event, first["training_iteration"] - 1)
        if source is not None:
            ax.plot([source["env_steps"], first["env_steps"]], [source["return"], first["return"]],
                    color=colors[event["trial_id"]], linestyle="--", linewidth=0.8, alpha=0.8)
        ax.scatter([first["env_steps"]], [first["return"]], marker="v", s=46,
                   color=colors[event["trial_id"]], edgecolor="black", linewidth=0.6, zorder=6,
                   label=None if labelled else "exploit (clone → trial)")
        ax.annotate(f"{_short(event['source_id'])}→{_short(event['trial_id'])}",
                    (first["env_steps"], first["return"]), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=6.5, color="dimgray")
        labelled = True


def _mark_unscored(ax: Axes, records: RunRecords, event: Mapping[str, Any], color: Any) -> None:
    """The exploit of a trial that finished no episode after it (the run ended first)."""
    source = _checkpoint_row(records, event, event.get("source_iteration", event["iteration"]))
    if source is None:
        return
    ax.scatter([source["env_steps"]], [source["return"]], marker="v", s=46, facecolor="none",
               edgecolor=color, linewidth=1.0, zorder=6)
    ax.annotate(f"{_short(event['source_id'])}→{_short(event['trial_id'])} (not scored since)",
                (source["env_steps"], source["return"]), textcoords="offset points",
                xytext=(0, -11), ha="center", fontsize=6.5, color="dimgray")


def _checkpoint_row(
    records: RunRecords, event: Mapping[str, Any], iteration: int
) -> dict[str, Any] | None:
    """The clone's result at the iteration its checkpoint was taken (before the exploit)."""
    rows = [r for r in records.rows_of(event["source_id"])
            if r["training_iteration"] == iteration and r.get("return") is not None
            and r.get("recorded_at", 0.0) < event["wall_time"]]
    return max(rows, key=lambda r: r.get("recorded_at", 0.0)) if rows else None


def hyperparameters_figure(
    records: RunRecords, segments: Sequence[Segment], info: Mapping[str, Any]
) -> Figure:
    """One panel per mutated hyperparameter: value against env steps, winning schedule in black."""
    mutations: Mapping[str, Mapping[str, Any]] = info.get("mutations", {})
    keys = list(mutations) or sorted({k for r in records.rows for k in r["hyperparameters"]})
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 2.4 * len(keys) + 0.8), sharex=True,
                             squeeze=False)
    colors = _colors(records.trial_ids())
    best = lineage_rows(records, segments)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for tid in records.trial_ids():
            for i, stretch in enumerate(trial_stretches(records, tid)):
                ax.step([r["env_steps"] for r in stretch],
                        [r["hyperparameters"].get(key) for r in stretch], where="post",
                        color=colors[tid], alpha=0.7, linewidth=1.2,
                        label=f"trial {_short(tid)}" if i == 0 else None)
        if best:
            ax.step([r["env_steps"] for r in best], [r["hyperparameters"].get(key) for r in best],
                    where="post", label="winning schedule", **LINEAGE_STYLE)
        spec = mutations.get(key, {})
        if spec.get("log"):
            ax.set_yscale("log")
        ax.set_ylabel(key + (" (log)" if spec.get("log") else ""))
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"{info.get('name', 'PBT run')}: hyperparameter schedules")
    axes[-1, 0].set_xlabel("env steps (agent's lifetime)")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

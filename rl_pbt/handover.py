"""The checkpoint an exploit hands over, copied into the exploited trial's own folder.

Ray's PBT points the exploited trial at a checkpoint in the *clone's* folder, which the clone's
checkpoint manager still owns. Two ways that lost the agent here, both between the exploit and
the exploited trial's restore:

* Tune keeps ``num_to_keep`` checkpoints per trial. The exploited trial waited for a turn while
  its clone trained on and saved five more times; Tune pruned the handed-over checkpoint and
  the trial failed ("Could not recover from checkpoint as it does not exist on storage
  anymore") on every retry (CI, default run, 2026-11-29).
* In synchronous PBT the handed-over folder can be a pause-save Tune discards without
  registering; the clone's next save reuses its number and writes over it, and the exploited
  trial restored the clone's later state (iteration 4 instead of 2).

And one way before the exploit: PBT saves a top trial at its own perturbation time and clones
that save when a bottom trial reaches *its* perturbation time. A clone that saves often
(``checkpoint.frequency=1``) and runs ahead had pruned it by then: the copy failed and took the
whole experiment down (3 runs of 3, found by probing the CLI). The clone's newest checkpoint is
handed over instead, as PBT itself does for a paused clone, and its iteration is recorded.

A copy made at the exploit (the save has resolved by then; an RLlib checkpoint of the default
network is about 0.2 MB) belongs to the exploited trial alone: nothing prunes or reuses it.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import pyarrow.fs
from ray.tune import Checkpoint

#: Folder names of handed-over copies in a trial's folder; Tune's own are ``checkpoint_NNNNNN``.
HANDOVER = re.compile(r"exploit_(\d{6})")

#: Copies kept per trial: the newest, and the one before it, which a resumed run may restore
#: when Tune's saved experiment state is older than the last exploit.
KEPT_HANDOVERS = 2


class Handover(NamedTuple):
    """A hand-over's copy, and the clone's iteration it holds when PBT's pick was pruned."""

    path: str
    newer_iteration: int | None = None


def hand_over_checkpoint(trial: Any, clone: Any = None) -> Handover:
    """Copy the checkpoint PBT just gave ``trial`` into ``trial``'s folder and point it there;
    when Tune has pruned it, ``clone``'s newest checkpoint. Older copies beyond
    :data:`KEPT_HANDOVERS` are deleted.
    """
    handed = trial.run_metadata.checkpoint_manager._latest_checkpoint_result
    source: Checkpoint = handed.checkpoint
    newer = clone.latest_checkpoint_result if clone is not None and not _exists(source) else None
    if newer is not None and newer.checkpoint is not None:
        source, handed.metrics = newer.checkpoint, newer.metrics
    filesystem = trial.storage.storage_filesystem
    trial_dir = trial.storage.trial_fs_path
    earlier = _handovers(filesystem, trial_dir)
    number = earlier[-1][0] + 1 if earlier else 0
    destination = f"{trial_dir}/exploit_{number:06d}"
    filesystem.create_dir(destination)  # copy_files writes into an existing folder only
    pyarrow.fs.copy_files(source.path, destination, source_filesystem=source.filesystem,
                          destination_filesystem=filesystem)
    handed.checkpoint = Checkpoint(destination, filesystem=filesystem)
    for _, stale in earlier[: max(0, len(earlier) + 1 - KEPT_HANDOVERS)]:
        filesystem.delete_dir(stale)
    iteration = newer.metrics.get("training_iteration") if newer is not None else None
    return Handover(destination, None if iteration is None else int(iteration))


def _exists(checkpoint: Checkpoint) -> bool:
    info = checkpoint.filesystem.get_file_info(checkpoint.path)
    return info.type != pyarrow.fs.FileType.NotFound


def _handovers(filesystem: pyarrow.fs.FileSystem, trial_dir: str) -> list[tuple[int, str]]:
    """The handed-over copies in ``trial_dir`` as (number, path), oldest first."""
    selector = pyarrow.fs.FileSelector(trial_dir, allow_not_found=True)
    found = []
    for info in filesystem.get_file_info(selector):
        match = HANDOVER.fullmatch(info.base_name)
        if match and info.type == pyarrow.fs.FileType.Directory:
            found.append((int(match[1]), info.path))
    return sorted(found)

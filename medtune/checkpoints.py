"""The checkpoint-<step> folders the Trainer writes into an output_dir (resume, W&B run id, reports), and which of
them are complete.

The Trainer writes a checkpoint folder piece by piece (adapter, optimizer shards of every rank, RNG state per rank,
trainer_state.json) with no atomic rename, so a job killed mid-save leaves a folder that looks complete but is not.
Once every rank has saved, rank 0 writes COMPLETE_MARKER into the folder (medtune.training.preemption); only marked
folders are resumed from, and the marker is removed before a folder is written again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder the Trainer saves the checkpoint of `step` in."""
    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint-<step> folders of output_dir, newest (highest step) first; [] when there are none."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def step_of(checkpoint: str | os.PathLike) -> int:
    return int(_CHECKPOINT.match(Path(checkpoint).name).group(1))


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def find_resume_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest checkpoint-<step> folder of output_dir whose save finished on every rank, or None."""
    return next((str(p) for p in checkpoints(output_dir) if is_complete(p)), None)


def mark_complete(checkpoint: Path, step: int) -> None:
    (checkpoint / COMPLETE_MARKER).write_text(f"{step}\n")


def unmark(checkpoint: Path) -> None:
    """Before a folder is written again: until the new save is marked, it is not a checkpoint to resume from."""
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)


def rotate(output_dir: str | os.PathLike, newest: Path, keep: int | None) -> None:
    """Keep the `keep` newest complete checkpoints up to `newest` (just marked); delete older folders, complete or not.

    Runs after the marker, unlike the Trainer's own `save_total_limit` rotation (which deletes as soon as rank 0 has
    written its part): a job killed in between still has a complete checkpoint. Folders past `newest` (an earlier
    attempt killed mid-save) stay until a later checkpoint passes them.
    """
    if not keep or keep <= 0:
        return
    older = [p for p in checkpoints(output_dir) if step_of(p) <= step_of(newest)]
    kept = [p for p in older if is_complete(p)][:keep]
    for folder in older:
        if folder not in kept:
            logger.info("deleting %s (save_total_limit=%d)", folder, keep)
            shutil.rmtree(folder, ignore_errors=True)

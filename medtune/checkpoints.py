"""The checkpoint-<step> folders the Trainer writes into an output_dir (resume, W&B run id, reports)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint-<step> folders of output_dir, newest (highest step) first; [] when there are none."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]

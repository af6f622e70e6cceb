"""Which held-out rows an evaluation uses: the split to read, and a seeded choice stratified by source.

MedTuned's validation split is the source corpora's dev sets concatenated in blocks, not shuffled, so "the first
N rows" is one corpus. Rows are therefore grouped by source (medtune.data.sources), each group shuffled with the
seed, and taken from every group in turn: at most N per source, and/or N in all spread evenly over the sources.
Written here rather than with `datasets.Dataset.train_test_split(stratify_by_column=...)`: that one allocates in
proportion to group size (a large corpus would crowd out the small ones) and refuses groups of one row.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Mapping, Sequence, TypeVar

from medtune.data.rows import RowReport, hub_splits, is_local, read_rows
from medtune.data.sources import source_of

Row = TypeVar("Row", bound=Mapping)


def load_rows(data: str, split: str | None = None) -> tuple[list[dict], RowReport]:
    """Rows from a local .jsonl/.json/.csv/.parquet file or folder, or a dataset id (split: --split, else the first
    of test/validation/eval/train that exists), and the report of the rows skipped (medtune.data.read_rows)."""
    if split is None and not is_local(data):
        available = hub_splits(data, None)
        split = next((s for s in ("test", "validation", "eval", "train") if s in available), None)
        if split is None:
            raise ValueError(f"{data}: none of the splits test/validation/eval/train exists (has {available})")
    return read_rows(data, split or "train")


def select_rows(rows: Sequence[Row], max_samples: int | None = None, seed: int = 0,
                per_source: int | None = None) -> list[Row]:
    """Up to `per_source` rows of each source, then up to `max_samples` in all, taken round-robin across the
    sources (each in a seeded random order). Without either limit: all rows, in their order."""
    if max_samples is None and per_source is None:
        return list(rows)
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[source_of(row)[0]].append(row)
    rng = random.Random(seed)
    queues = [rng.sample(group, len(group) if per_source is None else min(per_source, len(group)))
              for _, group in sorted(groups.items())]
    if max_samples is None:
        return [row for queue in queues for row in queue]
    picked: list[Row] = []
    for depth in range(max(map(len, queues), default=0)):
        picked += [queue[depth] for queue in queues if depth < len(queue)][:max_samples - len(picked)]
    return picked

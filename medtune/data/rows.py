"""Reading instruction / input / output rows from a hub dataset or local files, keeping count of every bad row.

A 200k-row run must neither crash on one broken row nor lose rows silently: each row is either kept or counted
under a reason, and the first few locations of each reason are kept for the report.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
REQUIRED = ("instruction", "output")
EXAMPLES_PER_REASON = 5


@dataclass
class RowReport:
    """What happened to the rows of one split."""

    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(where)


def local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{source}: no .jsonl/.json/.parquet/.csv files in this folder")
    return files


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def _iter_file(path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
    """(location, raw row) pairs; unparsable JSON lines are counted, not raised."""
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            for i, row in enumerate(json.loads(text)):
                yield f"{path}[{i}]", row
            return
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError:
                report.rows_read += 1
                report.skip("invalid_json", f"{path}:{lineno}")
        return
    import datasets

    table = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
    for i, row in enumerate(table):
        yield f"{path}:row {i}", row


def _iter_hub(name: str, config: str | None, split: str) -> Iterator[tuple[str, object]]:
    import datasets

    table = datasets.load_dataset(name, config, split=split)
    for i, row in enumerate(table):
        yield f"{name}[{split}] row {i}", row


def clean_row(raw: object, where: str, report: RowReport) -> dict[str, str] | None:
    """The row as {instruction, input, output} strings, or None after counting why it was skipped."""
    if not isinstance(raw, dict):
        report.skip("not_an_object", where)
        return None
    for key in REQUIRED:
        if key not in raw or raw[key] is None:
            report.skip(f"missing_{key}", where)
            return None
    row = {"instruction": raw["instruction"], "input": raw.get("input") or "", "output": raw["output"]}
    for key, value in row.items():
        if not isinstance(value, str):
            report.skip(f"non_string_{key}", where)
            return None
    for key in REQUIRED:
        if not row[key].strip():
            report.skip(f"empty_{key}", where)
            return None
    row["where"] = where  # for reporting rows dropped later (too long)
    return row


def read_rows(source: str, split: str, config: str | None = None,
              limit: int | None = None) -> tuple[list[dict], RowReport]:
    """Clean rows of `source` (local file/folder: all rows; hub id: the named split) and the report."""
    report = RowReport()
    if is_local(source):
        pairs = (pair for path in local_files(source) for pair in _iter_file(path, report))
    else:
        pairs = _iter_hub(source, config, split)
    rows = []
    for where, raw in pairs:
        if limit is not None and len(rows) >= limit:
            break
        report.rows_read += 1
        row = clean_row(raw, where, report)
        if row is not None:
            rows.append(row)
    for reason, count in sorted(report.skipped.items()):
        logger.warning("%s: skipped %d row(s): %s (e.g. %s)", source, count, reason, ", ".join(report.examples[reason]))
    return rows, report


def hub_splits(source: str, config: str | None) -> list[str]:
    import datasets

    return list(datasets.get_dataset_split_names(source, config))

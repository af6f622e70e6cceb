"""Reading rows from a hub dataset or local files, in the format each file holds (medtune.data.formats: MedTuned
instruction rows, conversations, prompt/completion), counting every bad row.

A 200k-row run must neither crash on one broken row nor change or lose rows silently: each row is either kept or
counted under a reason, and the first few locations of each reason are kept for the report.
- JSON lines are split on "\\n" only: U+2028, U+2029 and U+0085 are legal inside JSON strings (str.splitlines
  would cut rows there). A UTF-8 byte-order mark is dropped and noted.
- Bytes that are not UTF-8 make their line (or .json file) `invalid_utf8`: never decoded with replacement
  characters. A .json array that does not parse is counted as `invalid_json` under the file's name.
- `input` may be missing or null (the task has no input); any other non-string (0, false, []) is `non_string_input`.
- The `source` column (the dataset's current revision) is kept when it is a string.
- Exact duplicate rows (same instruction, input and output; same messages) are kept, as in the data, and counted.
Each kept row records `index`, its position among the records read (skipped ones included), so that predictions
made elsewhere for the same file line up with it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from medtune.data import formats

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
EXAMPLES_PER_REASON = 5
BOM = b"\xef\xbb\xbf"
_UNREADABLE = object()  # a record that could not be parsed (its reason is already counted)


@dataclass
class RowReport:
    """What happened to the rows of one split."""

    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: Counter = field(default_factory=Counter)  # handled without losing anything, e.g. a byte-order mark
    duplicates: int = 0  # exact repeats of an earlier row of the split, kept
    moved_to_train: int = 0  # rows held out of this split but identical to a row left in it, returned to it
    shared_with_train: int = 0  # eval-split rows identical to a train row, counted only
    formats: dict[str, str] = field(default_factory=dict)  # file (or hub split) -> the row format it holds

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


def _without_bom(data: bytes, path: Path, report: RowReport) -> bytes:
    if data.startswith(BOM):
        report.notes["utf8_bom"] += 1
        logger.info("%s: UTF-8 byte-order mark dropped", path)
        return data[len(BOM):]
    return data


def json_lines(path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
    """(location, parsed record or _UNREADABLE) per non-blank line, split on b"\\n" only."""
    data = _without_bom(path.read_bytes(), path, report)
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            yield where, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            report.skip("invalid_utf8", where)
            yield where, _UNREADABLE
        except json.JSONDecodeError:
            report.skip("invalid_json", where)
            yield where, _UNREADABLE


def _json_array(path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
    data = _without_bom(path.read_bytes(), path, report)
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        report.skip("invalid_utf8", str(path))
        yield str(path), _UNREADABLE
        return
    except json.JSONDecodeError as err:
        logger.warning("%s: not a valid JSON array (%s); the file is skipped", path, err)
        report.skip("invalid_json", str(path))
        yield str(path), _UNREADABLE
        return
    for i, row in enumerate(records):
        yield f"{path}[{i}]", row


def _starts_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.removeprefix(BOM).lstrip().startswith(b"[")


def _iter_file(path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
    if path.suffix == ".json" and _starts_array(path):
        yield from _json_array(path, report)
    elif path.suffix in (".jsonl", ".json"):
        yield from json_lines(path, report)
    else:
        import datasets

        table = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
        for i, row in enumerate(table):
            yield f"{path}:row {i}", row


def _iter_hub(name: str, config: str | None, split: str) -> Iterator[tuple[str, object]]:
    import datasets

    table = datasets.load_dataset(name, config, split=split)
    for i, row in enumerate(table):
        yield f"{name}[{split}] row {i}", row


def clean_row(raw: object, where: str, report: RowReport, fmt: str = formats.INSTRUCTION) -> dict | None:
    """The row in medtune.data.formats' shape, or None after counting why it was skipped."""
    if not isinstance(raw, dict):
        report.skip("not_an_object", where)
        return None
    row, reason = formats.clean(fmt, raw)
    if row is None:
        report.skip(reason, where)
        return None
    row["where"] = where  # for reporting rows dropped later (too long)
    row["format"] = fmt
    return row


def row_key(row: dict) -> tuple:
    """What makes two rows the same row (exact duplicates)."""
    return tuple((m["role"], m["content"]) for m in row["messages"]) + (row["train_from"],)


def _with_formats(pairs: Iterator[tuple[str, object]], name: str,
                  report: RowReport) -> Iterator[tuple[str, object, str]]:
    """The records of one file (or hub split), each with the format of the file's first record."""
    fmt = None
    for where, raw in pairs:
        if fmt is None and raw is not _UNREADABLE:
            fmt = report.formats[name] = formats.detect(raw)
            logger.info("%s: %s", name, formats.DESCRIPTION[fmt])
        yield where, raw, fmt or formats.INSTRUCTION


def read_rows(source: str, split: str, config: str | None = None,
              limit: int | None = None) -> tuple[list[dict], RowReport]:
    """Clean rows of `source` (local file/folder: all rows; hub id: the named split) and the report."""
    report = RowReport()
    if is_local(source):
        records = (record for path in local_files(source)
                   for record in _with_formats(_iter_file(path, report), str(path), report))
    else:
        records = _with_formats(_iter_hub(source, config, split), f"{source}[{split}]", report)
    rows, seen = [], set()
    for where, raw, fmt in records:
        if limit is not None and len(rows) >= limit:
            break
        report.rows_read += 1
        row = None if raw is _UNREADABLE else clean_row(raw, where, report, fmt)
        if row is not None:
            row["index"] = report.rows_read - 1
            key = row_key(row)
            report.duplicates += key in seen
            seen.add(key)
            rows.append(row)
    for reason, count in sorted(report.skipped.items()):
        logger.warning("%s: skipped %d row(s): %s (e.g. %s)", source, count, reason, ", ".join(report.examples[reason]))
    if report.duplicates:
        logger.info("%s: %d exact duplicate row(s), kept", source, report.duplicates)
    return rows, report


def hub_splits(source: str, config: str | None) -> list[str]:
    import datasets

    return list(datasets.get_dataset_split_names(source, config))

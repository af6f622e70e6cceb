"""Reading rows from a hub dataset or local files, in the format each file holds (medtune.data.formats: MedTuned
instruction rows, conversations, prompt/completion), counting every bad row.

A 200k-row run must neither crash on one broken row nor change or lose rows silently: each row is either kept as
written or counted under a reason, and the first few locations of each reason are kept for the report.
- Files: .jsonl, .json, .csv and .parquet; the first three also compressed (.gz, .bz2, .xz, and .zst where a zstd
  module is installed). Another file given alone is an error naming it; in a folder such files are counted
  (`unread_files` in the notes), named in the report and logged.
- JSON lines are split at "\\n", "\\r\\n" and a lone "\\r" (a JSON string cannot hold a raw line break), never at
  U+2028, U+2029 or U+0085, which are legal inside JSON strings (str.splitlines would cut rows there). A UTF-8
  byte-order mark is dropped and noted.
- CSV is read with the csv module: every cell is the text as written. pandas, behind datasets' csv builder, reads
  `None`, `NA`, `N/A`, `null`, `nan`, ... as missing (HoC's "no hallmark" answer is `None`) and numbers as numbers
  unless told otherwise, raises on a row with too many cells and decodes the file as a whole. A row whose cell
  count differs from the header's is `csv_field_count`; CSV that cannot be parsed ends its file as `invalid_csv`.
- Bytes that are not UTF-8 make their line, CSV row (or .json file) `invalid_utf8`: never decoded with replacement
  characters. A .json array that does not parse is counted as `invalid_json` under the file's name.
- `input` may be missing or null (the task has no input); any other non-string (0, false, []) is `non_string_input`.
- The `source` column (the dataset's current revision) is kept when it is a string.
- Exact duplicate rows (same instruction, input and output; same messages) are kept, as in the data, and counted.
Each kept row records `index`, its position among the records read (skipped ones included), so that predictions
made elsewhere for the same file line up with it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import lzma
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from medtune.data import formats

logger = logging.getLogger(__name__)

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # not for .parquet, which compresses inside
FILE_TYPES = ".jsonl, .json, .csv, .parquet; the first three also as .gz, .bz2, .xz or .zst"
EXAMPLES_PER_REASON = 5
BOM = b"\xef\xbb\xbf"
LINE_BREAK = re.compile(rb"\r\n|\r|\n")
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
    unread_files: list[str] = field(default_factory=list)  # files of a folder that are no data file medtune reads
    mixture: list[dict] = field(default_factory=list)  # per dataset of a mixture: what was read, used, skipped

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(where)

    def add(self, other: "RowReport") -> None:
        """Count another read (another file of a mixture, another --data) into this report."""
        self.rows_read += other.rows_read
        self.skipped.update(other.skipped)
        for reason, examples in other.examples.items():
            self.examples[reason] += examples[:EXAMPLES_PER_REASON - len(self.examples[reason])]
        self.notes.update(other.notes)
        self.duplicates += other.duplicates
        self.formats.update(other.formats)
        self.unread_files += other.unread_files


def data_format(path: Path) -> str | None:
    """".jsonl", ".json", ".csv" or ".parquet" for a file medtune reads (compressed or not), else None."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return suffixes[0] if len(suffixes) == 2 and suffixes[0] in FORMATS[:3] else None
    return suffixes[-1] if suffixes and suffixes[-1] in FORMATS else None


def scan_local(source: str) -> tuple[list[Path], list[Path]]:
    """(the data files of a local file or folder, the other files of the folder). A file given alone that is no
    data file medtune reads is an error naming it."""
    path = Path(source).expanduser()
    if not path.is_dir():
        if data_format(path) is None:
            raise ValueError(f"{path}: not a data file medtune reads ({FILE_TYPES})")
        return [path], []
    found = sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in found if data_format(p)]
    if not files:
        raise FileNotFoundError(f"{source}: no data files in this folder ({FILE_TYPES})")
    return files, [p for p in found if not data_format(p)]


def local_files(source: str) -> list[Path]:
    return scan_local(source)[0]


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def _zstd_open(path: Path):
    try:
        from compression import zstd  # Python 3.14

        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard) or "
                         "Python 3.14") from None
    return zstandard.open(path, "rb")


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in .gz, .bz2, .xz or .zst."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _zstd_open}.get(path.suffix.lower())
    if opener is None:
        return path.read_bytes()
    with opener(path) as f:
        return f.read()


def _without_bom(data: bytes, path: Path, report: RowReport) -> bytes:
    if data.startswith(BOM):
        report.notes["utf8_bom"] += 1
        logger.info("%s: UTF-8 byte-order mark dropped", path)
        return data[len(BOM):]
    return data


def readable(record: object) -> bool:
    """False for what json_lines yields for a line it could not parse (already counted in its report)."""
    return record is not _UNREADABLE


def json_lines(path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
    """(location, parsed record or _UNREADABLE) per non-blank line of a JSON-lines file."""
    yield from _json_lines(_without_bom(read_bytes(path), path, report), path, report)


def _json_lines(data: bytes, path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
    for lineno, raw in enumerate(LINE_BREAK.split(data), 1):
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


def _json_array(data: bytes, path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
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


def _csv_rows(data: bytes, path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
    """One {header: cell} record per CSV row, every cell the text as written; located by the row's first line."""
    # Undecodable bytes become lone surrogates, so that only the rows holding them are lost (and counted).
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""))
    header, line = None, 1
    try:
        for cells in reader:
            where, line = f"{path}:{line}", reader.line_num + 1
            if not cells:  # a blank line is no row
                continue
            if header is None:
                header = cells
                continue
            try:
                "".join(cells).encode("utf-8")
            except UnicodeEncodeError:
                report.skip("invalid_utf8", where)
                yield where, _UNREADABLE
                continue
            if len(cells) != len(header):
                report.skip("csv_field_count", where)
                yield where, _UNREADABLE
            else:
                yield where, dict(zip(header, cells))
    except csv.Error as err:
        logger.warning("%s: not valid CSV from line %d on (%s); the rest of the file is skipped", path, line, err)
        report.skip("invalid_csv", f"{path}:{line}")
        yield f"{path}:{line}", _UNREADABLE


def _iter_file(path: Path, report: RowReport) -> Iterator[tuple[str, object]]:
    kind = data_format(path)
    if kind == ".parquet":  # arrow types are kept: a non-string cell is counted by clean_row, never converted
        import datasets

        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        for i, row in enumerate(table):
            yield f"{path}:row {i}", row
        return
    data = _without_bom(read_bytes(path), path, report)
    if kind == ".csv":
        yield from _csv_rows(data, path, report)
    elif kind == ".json" and re.match(rb"\s*\[", data):
        yield from _json_array(data, path, report)
    else:
        yield from _json_lines(data, path, report)


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
    row, reason = formats.clean(fmt, raw, where)
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


def _columns(pairs: Iterator[tuple[str, object]], columns: list[str] | None) -> Iterator[tuple[str, object]]:
    """The records with only `columns` kept (TRL's mixture `columns`: select_columns), before the format is read."""
    for where, raw in pairs:
        yield where, {k: raw[k] for k in columns if k in raw} if columns and isinstance(raw, dict) else raw


def read_rows(source: str, split: str, config: str | None = None, limit: int | None = None,
              columns: list[str] | None = None) -> tuple[list[dict], RowReport]:
    """Clean rows of `source` (local file/folder: all rows; hub id: the named split) and the report; with
    `columns`, only those columns of each record are read."""
    report = RowReport()
    if is_local(source):
        files, unread = scan_local(source)
        if unread:
            report.unread_files = [str(p) for p in unread]
            report.notes["unread_files"] = len(unread)
            logger.warning("%s: %d file(s) not read, not being %s: %s", source, len(unread), FILE_TYPES,
                           ", ".join(report.unread_files))
        records = (record for path in files
                   for record in _with_formats(_columns(_iter_file(path, report), columns), str(path), report))
    else:
        records = _with_formats(_columns(_iter_hub(source, config, split), columns), f"{source}[{split}]", report)
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

"""Dataset mixtures: the recipe keys `datasets:` (train) and `eval_datasets:` (eval), with the entries and the
`fraction` rule of TRL's `DatasetMixtureConfig` (trl/scripts/utils.py `DatasetConfig`, `get_dataset`):

    datasets:
      - path: nlpie/Llama2-MedTuned-Instructions      # a hub id, a local file or a folder
        fraction: 0.7
      - path: data/vignettes/train.jsonl               # vignettes train as consultation conversations
        fraction: 0.2
      - path: my_clinic                                # a folder ...
        data_files: [conversations.jsonl]              # ... and the files in it to read
        columns: [messages]
        fraction: 0.05
      - replay: {prompts: data/prompts/health_questions.jsonl}   # the base model's own replies (medtune.data.replay)
        fraction: 0.05

Entry keys: `path`, `name` (hub configuration), `data_files`, `split` (default train), `columns` (only these columns
of each record are read), `self_distill: {max_new_tokens: N}` (its replies rewritten by the base model where they
keep the answer, medtune.data.self_distill), `fraction`; or, in place of `path`, medtune's
`replay: {prompts: FILE[, max_new_tokens]}`.
Fractions are set on every entry or on none: set, they are normalised to sum
to one and the mixture is the largest that oversamples no dataset (the first round(fraction x N) usable rows of
each, N the largest size every dataset can fill); unset, the datasets are concatenated. Unlike TRL's
`load_dataset`, each entry goes through medtune's own row reading (medtune.data.rows): format detected per file,
bad rows skipped and counted per entry, reported per entry (`mixture` in the data stats: log, run_info.json, W&B).
Written here rather than with TRL's `get_dataset`, which loads with `datasets.load_dataset` (pandas for CSV,
no per-row skipping: one bad row ends the run) and returns one table without per-dataset counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

from medtune.data.rows import RowReport, read_rows

logger = logging.getLogger(__name__)


class MixtureError(ValueError):
    """A mixture entry that cannot be used, named by its key and position."""


@dataclass(frozen=True)
class Entry:
    path: str
    name: str | None = None
    data_files: list[str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None
    replay: dict | None = None  # {prompts, max_new_tokens}: the base model's replies (medtune.data.replay)
    self_distill: dict | None = None  # {max_new_tokens}: replies rewritten by the base (medtune.data.self_distill)

    @property
    def label(self) -> str:
        if self.replay:
            return f"replay of {self.replay['prompts']}"
        return self.path + (f" [{', '.join(self.data_files)}]" if self.data_files else "") + (
            f" ({self.name})" if self.name else "") + (" (self-distilled)" if self.self_distill is not None else "")

    def sources(self) -> list[str]:
        """What to read: `data_files` (inside `path` when it is a local folder), else `path`; a replay's prompts."""
        if self.replay:
            return [self.replay["prompts"]]
        if not self.data_files:
            return [self.path]
        folder = Path(self.path).expanduser()
        return [str(folder / f) if folder.is_dir() else f for f in self.data_files]


KEYS = tuple(f.name for f in fields(Entry))


def parse(entries: object, key: str = "datasets") -> list[Entry]:
    """The recipe's entries as `Entry`s; any problem names the entry and the fix (before anything is read)."""
    if not isinstance(entries, list) or not entries:
        raise MixtureError(f"{key}: a non-empty list of entries ({', '.join(KEYS)}), one per dataset")
    parsed = []
    for i, raw in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(raw, dict):
            raise MixtureError(f"{where}: an entry is a mapping of {', '.join(KEYS)}; got {raw!r}")
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise MixtureError(f"{where}: unknown key(s) {', '.join(unknown)}; an entry has {', '.join(KEYS)}")
        if key != "datasets" and ("replay" in raw or "self_distill" in raw):
            raise MixtureError(f"{where}: replay and self_distill make training rows; they are `datasets` entries")
        replay = raw.get("replay")
        if replay is not None:
            _check_replay(replay, where, raw)
        elif not isinstance(raw.get("path"), str) or not raw["path"]:
            raise MixtureError(f"{where}: `path` (a hub dataset id, a local file or folder) is required")
        files = raw.get("data_files")
        files = [files] if isinstance(files, str) else files
        columns = raw.get("columns")
        fraction = raw.get("fraction")
        if files is not None and not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            raise MixtureError(f"{where}: `data_files` is a file name or a list of them")
        if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
            raise MixtureError(f"{where}: `columns` is a list of column names")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or fraction <= 0):
            raise MixtureError(f"{where}: `fraction` must be a number above 0, got {fraction!r}")
        distill = raw.get("self_distill")
        if distill is not None:
            _check_generation(distill, where, "self_distill", ())
        entry = Entry(raw.get("path", ""), raw.get("name"), files, raw.get("split") or "train", columns, fraction,
                      replay, distill)
        for source in entry.sources():
            path = Path(source).expanduser()
            if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1 or path.suffix):
                raise MixtureError(f"{where}: {source}: no such file or folder")
        parsed.append(entry)
    given = [e.fraction is not None for e in parsed]
    if any(given) and not all(given):
        missing = ", ".join(f"{key}[{i}]" for i, g in enumerate(given) if not g)
        raise MixtureError(f"{key}: `fraction` must be set for either all datasets in the mixture or none of them "
                           f"(as TRL's); not set on {missing}")
    return parsed


def _check_replay(replay: object, where: str, raw: dict) -> None:
    if not isinstance(replay, dict) or not isinstance(replay.get("prompts"), str):
        raise MixtureError(f"{where}: `replay` is {{prompts: FILE[, max_new_tokens: N]}}, FILE JSON lines with a "
                           "string 'prompt'")
    if set(raw) - {"replay", "fraction"}:
        raise MixtureError(f"{where}: a replay entry has `replay: {{prompts, max_new_tokens}}` and `fraction` only")
    _check_generation(replay, where, "replay", ("prompts",))
    if not Path(replay["prompts"]).expanduser().is_file():
        raise MixtureError(f"{where}: replay prompts {replay['prompts']}: no such file")


def _check_generation(settings: object, where: str, key: str, required: tuple[str, ...]) -> None:
    """The settings of the base model's generation for a replay or self-distillation entry."""
    allowed = (*required, "max_new_tokens")
    if not isinstance(settings, dict) or set(settings) - set(allowed):
        raise MixtureError(f"{where}: `{key}` is a mapping of {', '.join(allowed)}, got {settings!r}")
    tokens = settings.get("max_new_tokens", 1)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise MixtureError(f"{where}: {key} max_new_tokens must be a whole number of at least 1, got {tokens!r}")


def _read(entry: Entry, recipe) -> tuple[list[dict], RowReport]:
    if (entry.replay or entry.self_distill is not None) and recipe is None:
        raise MixtureError(f"{entry.label}: replay and self-distillation need the base model (a training recipe)")
    if entry.replay:
        from medtune.data.replay import replay_rows

        return replay_rows(entry.replay, recipe)
    rows, report = [], RowReport()
    for source in entry.sources():
        part, read_report = read_rows(source, entry.split, entry.name, columns=entry.columns)
        rows += part
        report.add(read_report)
    return rows, report


def read(entries: list[Entry], key: str = "datasets", recipe=None) -> tuple[list[dict], RowReport]:
    """(the mixture's rows, one report of everything read and skipped, with one count per entry in `mixture`).
    Replay and self-distillation entries generate with the `recipe`'s base model."""
    parts = [(entry, *_read(entry, recipe)) for entry in entries]
    for i, (entry, rows, _) in enumerate(parts):
        if not rows:
            raise MixtureError(f"{key}[{i}] {entry.label}: no usable rows (check its format and columns)")
    if all(entry.fraction is not None for entry, _, _ in parts):
        weights = [entry.fraction / sum(e.fraction for e in entries) for entry in entries]
        total = min(len(rows) / w for (_, rows, _), w in zip(parts, weights))
        used = [min(len(rows), round(w * total)) for (_, rows, _), w in zip(parts, weights)]
    else:
        used = [len(rows) for _, rows, _ in parts]
    mixed, report, counts = [], RowReport(), []
    for (entry, rows, read_report), n in zip(parts, used):
        if entry.self_distill is not None:  # only the rows the fraction uses are rewritten
            from medtune.data.self_distill import distill

            mixed += distill(rows[:n], entry.self_distill, recipe, read_report)
        else:
            mixed += rows[:n]
        report.add(read_report)
        counts.append({"dataset": entry.label, "fraction": entry.fraction, "rows_read": read_report.rows_read,
                       "rows_usable": len(rows), "rows_used": n, "skipped": dict(read_report.skipped),
                       "notes": dict(read_report.notes), "formats": sorted(set(read_report.formats.values()))})
        logger.info("%s %s: read %d rows, %d usable, %d used%s; skipped %s", key, entry.label,
                    read_report.rows_read, len(rows), n,
                    f" (fraction {entry.fraction})" if entry.fraction is not None else "",
                    dict(read_report.skipped) or "none")
    report.mixture = counts
    return mixed, report

"""eval_predictions.jsonl: every row's reply, appended as it arrives by an endpoint run and read back by --resume.

Each record names its row by `index` (its position in --data, as medtune.data.rows counts it), for a vignette the
`question` asked (medtune.eval.consultation), and `row_hash` (a digest of its messages; for a vignette, the prompt),
so that replies are matched to their rows whatever order they arrived in, and a resume against other data, or a
changed file or system prompt, is refused instead of scoring replies to other questions.
While a run goes on, a record holds one side's reply ({"index", "row_hash", "prediction" | "base_prediction"}), in
arrival order; the report (medtune.eval.report) rewrites the file in row order, one record per row with all its
fields. eval_generation.json, next to it, records what the replies depend on (each side's served model and
max_new_tokens), so that a resume under other settings is refused too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

from medtune.data.rows import RowReport, json_lines, row_key

PREDICTIONS = "eval_predictions.jsonl"
SETTINGS = "eval_generation.json"
SIDES = ("prediction", "base_prediction")  # the tuned model's reply, the baseline's


def key(row: Mapping) -> tuple[int, str | None]:
    """What a reply answers: the row's index in --data, and for a vignette the question (medtune.eval.consultation)."""
    return row["index"], row.get("question")


def row_hash(row: Mapping) -> str:
    return hashlib.blake2b(json.dumps(row_key(row), ensure_ascii=False).encode(), digest_size=8).hexdigest()


def check_settings(out: Path, settings: dict, resume: bool) -> None:
    """Refuse to overwrite a run's predictions without --resume, or to resume one made under other settings; then
    record this run's settings. `settings` = {"max_new_tokens": N, "served_models": {side: name}}."""
    predictions, path = out / PREDICTIONS, out / SETTINGS
    if predictions.exists() and predictions.stat().st_size and not resume:
        raise SystemExit(f"{predictions} already holds predictions: pass --resume to go on with that run, or choose "
                         "another --out")
    if resume and predictions.exists():
        if not path.exists():
            raise SystemExit(f"--resume: {predictions} was not written by medtune-eval --endpoint (no {path.name} "
                             "next to it); choose another --out")
        old = json.loads(path.read_text())
        if old["max_new_tokens"] != settings["max_new_tokens"]:
            raise SystemExit(f"--resume: the replies in {predictions} were made with --max-new-tokens "
                             f"{old['max_new_tokens']}, not {settings['max_new_tokens']}: use the same value")
        for side, name in settings["served_models"].items():
            if old["served_models"].get(side, name) != name:
                raise SystemExit(f"--resume: the {side} replies in {predictions} come from served model "
                                 f"{old['served_models'][side]!r}, not {name!r}: use the same model")
        settings = {**settings, "served_models": {**old["served_models"], **settings["served_models"]}}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def read_done(path: Path, rows_by_key: Mapping[tuple, Mapping]) -> dict[tuple, dict]:
    """{key: {"index", ["question",] "row_hash", side: reply, ...}} of the replies already in `path`, of every side
    (those of a side this run does not ask for are kept for a later one). A record naming a row that --data does
    not have, or with another row's content, stops the run; lines that do not parse (the last one, cut short by an
    interruption) are left out and counted."""
    done: dict[tuple, dict] = {}
    unreadable = RowReport()
    for where, record in json_lines(path, unreadable):
        if not isinstance(record, dict) or not isinstance(record.get("index"), int):
            continue  # json_lines counted it when it did not parse; anything else is no record of ours
        index = record["index"]
        row = rows_by_key.get(key(record))
        if row is None or record.get("row_hash") != row_hash(row):
            found = f"row {index} of --data ({row['where']}) has other content" if row else \
                f"--data has no row {index}"
            raise SystemExit(f"--resume: {where} is a reply to row {index}, but {found}: these predictions were "
                             "made for other data; choose another --out")
        entry = done.setdefault(key(record), {k: record[k] for k in ("index", "question", "row_hash") if k in record})
        entry.update({side: record[side] for side in SIDES if isinstance(record.get(side), str)})
    if unreadable.skipped:
        print(f"--resume: {path}: {sum(unreadable.skipped.values())} unreadable line(s) left out "
              f"({', '.join(w for ws in unreadable.examples.values() for w in ws)})")
    return done


class Journal:
    """Appends each reply to eval_predictions.jsonl as it arrives, flushed at once: an interrupted run keeps every
    reply it received. On opening, the file is rewritten with the records read back (`done`), which drops a line
    an interruption cut short."""

    def __init__(self, path: Path, done: Mapping[int, dict]):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
        os.replace(tmp, path)
        self._file = open(path, "a", encoding="utf-8")

    def add(self, row: Mapping, side: str, reply: str) -> None:
        record = {"index": row["index"], **({"question": row["question"]} if "question" in row else {}),
                  "row_hash": row_hash(row), side: reply}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

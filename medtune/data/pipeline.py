"""Rows -> token ids and loss mask of the model's chat format -> best-fit-decreasing packed rows, cached on disk.

Each row's conversation is encoded by medtune.inference.chat_format (the ids of the tokenizer's apply_chat_template,
the mask on the supervised assistant turns and their end-of-turn tokens); with completion_only_loss false every token is
trained on.

Packing is TRL's `pack_dataset(strategy="bfd")`: whole samples are placed into `max_length` slots and each
packed row keeps `seq_lengths`, from which TRL's padding-free collator rebuilds position_ids that restart at 0 for
every sample. transformers turns restarting position_ids into a block-diagonal attention mask (SDPA / eager) or
varlen kernels (flash attention), so samples packed together never attend to each other.

The result is saved under `data_cache_dir/<fingerprint>/` (medtune.data.fingerprint: the data files' content or
the hub dataset's own fingerprint, the tokenizer, the chat template and stop ids, max_length and the options). The
first row of each source and format is kept for the preflight (medtune.data.preflight). One process
builds it under a file lock while the others wait on the lock, not in a collective, so a long tokenization never
trips a NCCL/gloo timeout; every later run (and every other rank) loads it instantly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from medtune.inference.chat_format import ChatFormat, Encoded, RowError
from medtune.data import preflight
from medtune.data.fingerprint import completion_only, fingerprint
from medtune.data.rows import RowReport
from medtune.data.splits import read_splits

logger = logging.getLogger(__name__)

ENCODE_BATCH = 1000
STATS = "stats.json"
EVAL_ROWS = "eval_rows.jsonl"  # the eval split's MedTuned rows, for the generation eval after training
EVAL_COLUMNS = ("instruction", "input", "output", "source")


@dataclass
class DataStats:
    """Counts for one split, reported in the console, W&B and stats.json."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    moved_to_train: int = 0
    shared_with_train: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    packed_rows: int = 0
    packing_efficiency: float = 0.0
    fingerprint: str = ""
    formats: dict[str, str] = field(default_factory=dict)  # file -> row format (medtune.data.formats)
    mixture: list[dict] = field(default_factory=list)  # per dataset of a mixture (medtune.data.mixture)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self, name: str) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        extra = [f"{v} {k.replace('_', ' ')}" for k, v in (("duplicates", self.duplicates),
                 ("moved_to_train", self.moved_to_train), ("shared_with_train", self.shared_with_train)) if v]
        extra += [f"{k}: {v}" for k, v in sorted(self.notes.items())]
        extra += [f"{Path(k).name}: {v}" for k, v in sorted(self.formats.items())]
        extra += [f"{m['dataset']}: {m['rows_used']} of {m['rows_usable']} usable rows used" for m in self.mixture]
        return (
            f"{name}: read {self.rows_read} rows, kept {self.rows_kept}, skipped {sum(self.skipped.values())} "
            f"({skipped}), truncated {self.truncated}; {self.tokens} tokens ({self.loss_tokens} in the loss) packed "
            f"into {self.packed_rows} rows, packing efficiency {self.packing_efficiency:.3f}"
            + (f" ({'; '.join(extra)})" if extra else "")
        )


@dataclass
class PreparedData:
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    stats: DataStats
    eval_stats: DataStats | None
    cache_dir: Path

    def eval_rows(self) -> list[dict] | None:
        """The eval split's MedTuned rows as read (for scoring generated replies), None without an eval split."""
        from medtune.data.select import load_rows

        path = self.cache_dir / EVAL_ROWS
        return load_rows(str(path))[0] if path.exists() else None


def fit(encoded: Encoded, max_length: int) -> tuple[list[int], list[int]] | None:
    """Cut an over-long encoded row to max_length, or None when nothing useful is left.

    The supervised part keeps at least a quarter of max_length (or all of it, if shorter): the tail of the last
    user-side content before it (the end of the input text) is cut first when the prompt alone is too long, then
    the tail of the row. The template's own tokens before the cut (BOS, role prefixes, end-of-turn ids) stay.
    """
    ids, mask = encoded.input_ids, encoded.mask
    prompt_len = mask.index(1)
    reserve = min(len(ids) - prompt_len, max_length // 4)
    excess = prompt_len + reserve - max_length
    if excess > 0:
        if encoded.prompt_cut is None:
            return None
        start, end = encoded.prompt_cut
        if end - excess - start <= (end - start) // 4:  # most of that content would go: not a sample
            return None
        ids, mask = ids[:end - excess] + ids[end:], mask[:end - excess] + mask[end:]
    return ids[:max_length], mask[:max_length]


def encode_rows(rows: list[dict], fmt: ChatFormat, max_length: int, overlong: str, completion_only_loss: bool,
                stats: DataStats, report: RowReport) -> Iterator[tuple[dict, list[int], list[int], bool]]:
    """(row, input_ids, labels, truncated) of each row that fits or was truncated; labels are -100 where not trained
    on."""
    for start in range(0, len(rows), ENCODE_BATCH):
        batch = rows[start:start + ENCODE_BATCH]
        for row, encoded in zip(batch, fmt.encode([r["messages"] for r in batch], [r["train_from"] for r in batch])):
            if isinstance(encoded, RowError):
                report.skip(encoded.reason, row["where"])
                continue
            ids, mask = encoded.input_ids, encoded.mask
            if 1 not in mask:
                raise preflight.PreflightError(f"{row['where']}: no token of this row is trained on; check the chat "
                                               "template and the row's roles")
            truncated = len(ids) > max_length
            if truncated:
                cut = fit(encoded, max_length) if overlong == "truncate" else None
                if cut is None:
                    report.skip("too_long" if overlong == "drop" else "prompt_too_long", row["where"])
                    continue
                ids, mask = cut
                stats.truncated += 1
            labels = [i if m or not completion_only_loss else -100 for i, m in zip(ids, mask)]
            stats.tokens += len(ids)
            stats.loss_tokens += len(ids) - labels.count(-100)
            yield row, ids, labels, truncated


def build_split(rows: list[dict], report: RowReport, fmt: ChatFormat, max_length: int, overlong: str,
                completion_only_loss: bool, packing: bool, fingerprint: str):
    """(the packed dataset, its stats, its preflight rows: the first of each source and format)."""
    import datasets
    import pyarrow as pa
    from trl import pack_dataset

    stats = DataStats(rows_read=report.rows_read, fingerprint=fingerprint, notes=dict(report.notes),
                      duplicates=report.duplicates, moved_to_train=report.moved_to_train,
                      shared_with_train=report.shared_with_train, formats=dict(report.formats),
                      mixture=list(report.mixture))
    input_ids, labels, samples = [], [], {}
    for row, ids, row_labels, cut in encode_rows(rows, fmt, max_length, overlong, completion_only_loss, stats, report):
        input_ids.append(ids)
        labels.append(row_labels)
        samples.setdefault(preflight.kind(row), preflight.sample(row, ids, row_labels, cut))
    stats.rows_kept = len(input_ids)
    stats.skipped = dict(report.skipped)
    stats.skipped_examples = {k: list(v) for k, v in report.examples.items()}
    if stats.rows_kept == 0:
        raise ValueError(f"no usable rows: {stats.summary('data')}; check the file's columns (instruction, input, "
                         "output; or messages; or prompt and completion)")
    # Typed Arrow columns: datasets' from_dict infers the types row by row, 3x slower on ~200k rows.
    dataset = datasets.Dataset(pa.table({"input_ids": pa.array(input_ids, pa.list_(pa.int32())),
                                         "labels": pa.array(labels, pa.list_(pa.int64()))}))
    if packing:
        dataset = pack_dataset(dataset, max_length, strategy="bfd")
    else:
        dataset = dataset.map(lambda ex: {"seq_lengths": [len(ex["input_ids"])]})
    stats.packed_rows = len(dataset)
    stats.packing_efficiency = stats.tokens / (stats.packed_rows * max_length)
    return dataset, stats, list(samples.values())


def _load_cached(path: Path) -> PreparedData:
    import datasets

    meta = json.loads((path / STATS).read_text())
    eval_stats = DataStats(**meta["eval"]) if meta["eval"] else None
    return PreparedData(
        train=datasets.load_from_disk(str(path / "train")),
        eval=datasets.load_from_disk(str(path / "eval")) if eval_stats else None,
        stats=DataStats(**meta["train"]),
        eval_stats=eval_stats,
        cache_dir=path,
    )


def prepare_dataset(recipe, fmt: ChatFormat) -> PreparedData:
    """Tokenized + packed train/eval datasets for `recipe`, from the on-disk cache when it is there; the preflight
    (medtune.data.preflight) runs on every call, from the cache."""
    from filelock import FileLock

    fp = fingerprint(recipe, fmt)
    root = Path(recipe.data.data_cache_dir).expanduser()
    path = root / fp
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{fp}.lock")):
        if (path / STATS).exists():
            prepared = _load_cached(path)
            logger.info("data cache hit: %s", path)
        else:
            start = time.perf_counter()
            t = recipe.training
            train_rows, train_report, eval_rows, eval_report = read_splits(recipe)
            opts = dict(fmt=fmt, max_length=t.max_length, overlong=recipe.data.overlong,
                        completion_only_loss=completion_only(recipe), packing=t.packing, fingerprint=fp)
            train, train_stats, samples = build_split(train_rows, train_report, **opts)
            evald, eval_stats, _ = build_split(eval_rows, eval_report, **opts) if eval_rows else (None, None, None)
            # Write to a temporary folder and rename: a killed run never leaves a half-written cache behind.
            tmp = root / f".{fp}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            train.save_to_disk(str(tmp / "train"))
            if evald is not None:
                evald.save_to_disk(str(tmp / "eval"))
                # Raw eval rows too, for the generation-based evaluation at the end of training.
                with open(tmp / EVAL_ROWS, "w") as f:
                    f.writelines(json.dumps({k: r[k] for k in EVAL_COLUMNS if k in r}) + "\n"
                                 for r in eval_rows if "instruction" in r)
            meta = {"train": train_stats.as_dict(), "eval": eval_stats.as_dict() if eval_stats else None}
            (tmp / preflight.SAMPLES).write_text(json.dumps(samples, indent=1))
            (tmp / STATS).write_text(json.dumps(meta, indent=2))
            os.replace(tmp, path)
            prepared = _load_cached(path)
            logger.info("data prepared in %.1fs, cached at %s", time.perf_counter() - start, path)
    logger.info(prepared.stats.summary("train"))
    if prepared.eval_stats:
        logger.info(prepared.eval_stats.summary("eval"))
    preflight.run(fmt, json.loads((prepared.cache_dir / preflight.SAMPLES).read_text()))
    return prepared

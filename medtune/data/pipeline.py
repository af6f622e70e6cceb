"""Rows -> token ids with a completion-only label mask -> best-fit-decreasing packed rows, cached on disk.

Packing is TRL's `pack_dataset(strategy="bfd")`: whole samples are placed into `max_length` slots and each
packed row keeps `seq_lengths`, from which TRL's padding-free collator rebuilds position_ids that restart at 0 for
every sample. transformers turns restarting position_ids into a block-diagonal attention mask (SDPA / eager) or
varlen kernels (flash attention), so samples packed together never attend to each other.

The result is saved under `data_cache_dir/<fingerprint>/` (medtune.data.fingerprint: the data files' content or
the hub dataset's own fingerprint, the tokenizer, the chat template, max_length and the options). One process
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

from medtune import chat_format
from medtune.data.fingerprint import completion_only, fingerprint
from medtune.data.rows import RowReport
from medtune.data.splits import read_splits

logger = logging.getLogger(__name__)

ENCODE_BATCH = 1000
EVAL_ROWS = "eval_rows.jsonl"
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

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self, name: str) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        extra = [f"{v} {k.replace('_', ' ')}" for k, v in (("duplicates", self.duplicates),
                 ("moved_to_train", self.moved_to_train), ("shared_with_train", self.shared_with_train)) if v]
        extra += [f"{k}: {v}" for k, v in sorted(self.notes.items())]
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


def fit(ids: list[int], mask: list[int], max_length: int, eot_id: int) -> tuple[list[int], list[int]] | None:
    """Cut an over-long encoded row to max_length, or None when nothing useful is left.

    The reply keeps at least a quarter of max_length (or all of it, if shorter): the tail of the user turn (the
    end of the input text) is cut first when the prompt alone is too long, then the tail of the reply. The
    template tokens (BOS, role prefixes, the end-of-turn ids) always stay.
    """
    prompt_len = mask.index(1)
    reserve = min(len(ids) - prompt_len, max_length // 4)
    excess = prompt_len + reserve - max_length
    if excess > 0:
        user_end = ids.index(eot_id)  # the user turn's end; typed text never encodes to this id
        if user_end - excess <= user_end // 4:  # most of the user turn would go: not a sample
            return None
        ids, mask = ids[:user_end - excess] + ids[user_end:], mask[:user_end - excess] + mask[user_end:]
    return ids[:max_length], mask[:max_length]


def encode_rows(rows: list[dict], tokenizer, max_length: int, overlong: str, completion_only_loss: bool,
                stats: DataStats, report: RowReport) -> dict[str, list]:
    """input_ids + labels (-100 outside the reply when completion_only_loss) for rows that fit or were truncated."""
    eot_id = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN)
    out = {"input_ids": [], "labels": []}
    for start in range(0, len(rows), ENCODE_BATCH):
        batch = rows[start:start + ENCODE_BATCH]
        for row, (ids, mask) in zip(batch, chat_format.encode_examples(tokenizer, batch)):
            if len(ids) > max_length:
                cut = fit(ids, mask, max_length, eot_id) if overlong == "truncate" else None
                if cut is None:
                    report.skip("too_long" if overlong == "drop" else "prompt_too_long", row["where"])
                    continue
                ids, mask = cut
                stats.truncated += 1
            prompt_len = mask.index(1) if completion_only_loss else 0  # the mask is 0s (prompt) then 1s (reply)
            out["input_ids"].append(ids)
            out["labels"].append([-100] * prompt_len + ids[prompt_len:])
            stats.tokens += len(ids)
            stats.loss_tokens += len(ids) - prompt_len
    return out


def build_split(rows: list[dict], report: RowReport, tokenizer, max_length: int, overlong: str,
                completion_only_loss: bool, packing: bool, fingerprint: str):
    import datasets
    import pyarrow as pa
    from trl import pack_dataset

    stats = DataStats(rows_read=report.rows_read, fingerprint=fingerprint, notes=dict(report.notes),
                      duplicates=report.duplicates, moved_to_train=report.moved_to_train,
                      shared_with_train=report.shared_with_train)
    encoded = encode_rows(rows, tokenizer, max_length, overlong, completion_only_loss, stats, report)
    stats.rows_kept = len(encoded["input_ids"])
    stats.skipped = dict(report.skipped)
    stats.skipped_examples = {k: list(v) for k, v in report.examples.items()}
    if stats.rows_kept == 0:
        raise ValueError(f"no usable rows: {stats.summary('data')}; "
                         "check the file's columns (instruction, input, output)")
    # Typed Arrow columns: datasets' from_dict infers the types row by row, 3x slower on ~200k rows.
    dataset = datasets.Dataset(pa.table({"input_ids": pa.array(encoded["input_ids"], pa.list_(pa.int32())),
                                         "labels": pa.array(encoded["labels"], pa.list_(pa.int64()))}))
    if packing:
        dataset = pack_dataset(dataset, max_length, strategy="bfd")
    else:
        dataset = dataset.map(lambda ex: {"seq_lengths": [len(ex["input_ids"])]})
    stats.packed_rows = len(dataset)
    stats.packing_efficiency = stats.tokens / (stats.packed_rows * max_length)
    return dataset, stats


def _load_cached(path: Path) -> PreparedData:
    import datasets

    meta = json.loads((path / "stats.json").read_text())
    eval_stats = DataStats(**meta["eval"]) if meta["eval"] else None
    return PreparedData(
        train=datasets.load_from_disk(str(path / "train")),
        eval=datasets.load_from_disk(str(path / "eval")) if eval_stats else None,
        stats=DataStats(**meta["train"]),
        eval_stats=eval_stats,
        cache_dir=path,
    )


def prepare_dataset(recipe, tokenizer) -> PreparedData:
    """Tokenized + packed train/eval datasets for `recipe`, from the on-disk cache when it is there."""
    from filelock import FileLock

    fp = fingerprint(recipe, tokenizer)
    root = Path(recipe.data.data_cache_dir).expanduser()
    path = root / fp
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{fp}.lock")):
        if (path / "stats.json").exists():
            prepared = _load_cached(path)
            logger.info("data cache hit: %s", path)
        else:
            start = time.perf_counter()
            t = recipe.training
            train_rows, train_report, eval_rows, eval_report = read_splits(recipe)
            opts = dict(tokenizer=tokenizer, max_length=t.max_length, overlong=recipe.data.overlong,
                        completion_only_loss=completion_only(recipe), packing=t.packing, fingerprint=fp)
            train, train_stats = build_split(train_rows, train_report, **opts)
            evald, eval_stats = build_split(eval_rows, eval_report, **opts) if eval_rows else (None, None)
            # Write to a temporary folder and rename: a killed run never leaves a half-written cache behind.
            tmp = root / f".{fp}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            train.save_to_disk(str(tmp / "train"))
            if evald is not None:
                evald.save_to_disk(str(tmp / "eval"))
                # Raw eval rows too, for the generation-based evaluation at the end of training.
                with open(tmp / EVAL_ROWS, "w") as f:
                    f.writelines(json.dumps({k: r[k] for k in EVAL_COLUMNS if k in r}) + "\n" for r in eval_rows)
            meta = {"train": train_stats.as_dict(), "eval": eval_stats.as_dict() if eval_stats else None}
            (tmp / "stats.json").write_text(json.dumps(meta, indent=2))
            os.replace(tmp, path)
            prepared = _load_cached(path)
            logger.info("data prepared in %.1fs, cached at %s", time.perf_counter() - start, path)
    logger.info(prepared.stats.summary("train"))
    if prepared.eval_stats:
        logger.info(prepared.eval_stats.summary("eval"))
    return prepared

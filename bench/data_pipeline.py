"""Data benchmark: tokenize + pack a MedTuned-shaped dataset, medtune vs the tutorial's pipeline, same invocation.

Sides (each starts from the same JSONL file, cold: fresh caches every repeat; all single-process):
  medtune       medtune.data.prepare_dataset: batched chat-format encoding with a completion mask, TRL BFD
                packing into max_length slots, saved to the on-disk cache.
  baseline      the tutorial: load_dataset("json") -> map(formatting func -> `text`) -> map(tokenizer,
                padding="max_length", truncation, max_length) -- every row occupies a full slot.
  trl_packed    the tutorial text, tokenized unpadded, then TRL's pack_dataset(strategy="bfd") -- what
                SFTTrainer(packing=True) does with a text field (TRL 1.16's default packing strategy).
  medtune_cache_hit  a second prepare_dataset call on the same inputs (the start-up cost of every later run).

medtune fits over-long rows by cutting the end of the input text first (the reply keeps at least a quarter of
max_length), then the reply's end, and skips (counts) rows that would lose most of their prompt; the tutorial
pipelines cut every row at max_length, answer included. rows/s counts input rows on every side.
Reports rows/s, real tokens/s and packing efficiency (real tokens / (rows after packing x max_length)), median
over --repeats, and each side's ratio to the baseline. The machine is shared: besides wall time each side's CPU
time (`time.process_time`, all of the process's threads) is reported, and `ratio_cpu` (baseline CPU seconds / the
side's) compares the work done, which other users' load does not change.

    python -m bench.data_pipeline --rows 200000 --repeats 3 --json .cache/bench/data.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import synthetic
from bench._common import TINY_DIR, interleave, machine, median, medtune_recipe, print_table, tutorial_text, write_json


def _real_tokens(dataset, column: str = "input_ids") -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(dataset.data.column(column))).as_py())


def run_medtune(data_file: Path, fmt, max_length: int, rows: int) -> tuple[dict, dict]:
    from medtune.data import prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        recipe = medtune_recipe(data_file, TINY_DIR, Path(tmp), Path(tmp) / "out", max_length)
        start, cpu = time.perf_counter(), time.process_time()
        prepared = prepare_dataset(recipe, fmt)
        cold, cpu = time.perf_counter() - start, time.process_time() - cpu
        start = time.perf_counter()
        again = prepare_dataset(recipe, fmt)
        hit = time.perf_counter() - start
        assert len(again.train) == len(prepared.train)
        tokens, slots = prepared.stats.tokens, len(prepared.train) * max_length
        kept = prepared.stats.rows_kept
    result = {"seconds": cold, "cpu_seconds": cpu, "rows_per_s": rows / cold, "tokens_per_s": tokens / cold,
              "real_tokens": tokens, "rows_kept": kept, "packed_rows": slots // max_length,
              "efficiency": tokens / slots}
    return result, {"seconds": hit}


def run_baseline(data_file: Path, tokenizer, max_length: int, rows: int) -> dict:
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        ds = datasets.load_dataset("json", data_files=str(data_file), split="train", cache_dir=tmp)
        ds = ds.map(lambda ex: {"text": tutorial_text(ex)}, remove_columns=ds.column_names)
        ds = ds.map(lambda b: tokenizer(b["text"], padding="max_length", truncation=True, max_length=max_length),
                    batched=True, remove_columns=["text"])
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        import pyarrow.compute as pc

        real = int(pc.sum(pc.list_flatten(ds.data.column("attention_mask"))).as_py())
        slots = len(ds) * max_length
    return {"seconds": seconds, "cpu_seconds": cpu, "rows_per_s": rows / seconds, "tokens_per_s": real / seconds,
            "real_tokens": real, "rows_kept": len(ds), "packed_rows": len(ds), "efficiency": real / slots}


def run_trl_packed(data_file: Path, tokenizer, max_length: int, rows: int) -> dict:
    import datasets
    from trl import pack_dataset

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        ds = datasets.load_dataset("json", data_files=str(data_file), split="train", cache_dir=tmp)
        ds = ds.map(lambda ex: {"text": tutorial_text(ex)}, remove_columns=ds.column_names)
        ds = ds.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
        ds = pack_dataset(ds.select_columns(["input_ids"]), max_length, strategy="bfd")
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        real = _real_tokens(ds)
    return {"seconds": seconds, "cpu_seconds": cpu, "rows_per_s": rows / seconds, "tokens_per_s": real / seconds,
            "real_tokens": real, "rows_kept": rows, "packed_rows": len(ds), "efficiency": real / (len(ds) * max_length)}


def length_percentiles(data_file: Path, tokenizer, sample: int = 5000) -> dict:
    """Tokens per row (tutorial text) over a sample: the distribution the doc records."""
    import json

    import numpy as np

    rows = [json.loads(line) for _, line in zip(range(sample), data_file.open())]
    lengths = np.array([len(ids) for ids in tokenizer([tutorial_text(r) for r in rows])["input_ids"]])
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (10, 50, 90, 99)} | {"mean": float(lengths.mean())}


def run(rows: int, repeats: int, max_length: int, seed: int = 0) -> dict:
    import datasets

    from medtune.inference.chat_format import ChatFormat
    from medtune.inference.load import load_tokenizer
    from medtune.tiny import build_tiny_model

    datasets.disable_caching()  # every repeat must pay for its own map()s
    datasets.disable_progress_bars()
    build_tiny_model(TINY_DIR)
    # One tokenizer per pipeline, as in real runs: the tutorial's padding/truncation calls change the backend
    # tokenizer's state, which must not leak into medtune's side.
    tokenizer, medtune_format = load_tokenizer(str(TINY_DIR)), ChatFormat(load_tokenizer(str(TINY_DIR)))
    data_file = synthetic.write_jsonl(rows, synthetic.default_path(rows, seed), seed)
    hits: list[dict] = []

    def medtune_side() -> dict:
        result, hit = run_medtune(data_file, medtune_format, max_length, rows)
        hits.append(hit)
        return result

    results = interleave({
        "baseline": lambda: run_baseline(data_file, tokenizer, max_length, rows),
        "medtune": medtune_side,
        "trl_packed": lambda: run_trl_packed(data_file, tokenizer, max_length, rows),
    }, repeats)
    base, base_rows = median(results["baseline"], "tokens_per_s"), median(results["baseline"], "rows_per_s")
    base_cpu = median(results["baseline"], "cpu_seconds")
    table = []
    for name, res in results.items():
        row = {"side": name, "seconds": median(res, "seconds"), "cpu_seconds": median(res, "cpu_seconds"),
               "rows_per_s": median(res, "rows_per_s"),
               "tokens_per_s": median(res, "tokens_per_s"), "efficiency": res[0]["efficiency"],
               "rows_kept": res[0]["rows_kept"], "packed_rows": res[0]["packed_rows"],
               "real_tokens": res[0]["real_tokens"]}
        row["ratio_rows_per_s"] = row["rows_per_s"] / base_rows
        row["ratio_tokens_per_s"] = row["tokens_per_s"] / base
        row["ratio_cpu"] = base_cpu / row["cpu_seconds"]
        table.append(row)
    table.append({"side": "medtune_cache_hit", "seconds": median(hits, "seconds")})
    return {"benchmark": "data_pipeline", "rows": rows, "repeats": repeats, "max_length": max_length,
            "machine": machine(), "lengths": length_percentiles(data_file, tokenizer), "table": table,
            "raw": results, "cache_hit_raw": hits}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Tokenize + pack benchmark: medtune vs the tutorial pipeline.")
    p.add_argument("--rows", type=int, default=200_000, help="synthetic rows (shrink for a smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    out = run(args.rows, args.repeats, args.max_length, args.seed)
    print(f"machine: {out['machine']}")
    print(f"rows: {args.rows}, repeats: {args.repeats} (median), max_length: {args.max_length}, "
          f"tokens/row: {out['lengths']}")
    print_table(out["table"], ["side", "seconds", "cpu_seconds", "ratio_cpu", "rows_per_s", "ratio_rows_per_s",
                               "tokens_per_s", "ratio_tokens_per_s", "efficiency", "rows_kept", "packed_rows",
                               "real_tokens"])
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

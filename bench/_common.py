"""Shared by the benchmarks: the tutorial baseline's text format, interleaved repeats, the machine line, tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

TINY_DIR = ROOT / ".cache" / "bench" / "tiny-starling"  # own copy: other runs rebuild .cache/tiny-starling


def tutorial_text(row: dict) -> str:
    """The reference tutorial's formatting function: one `text` field per row, special tokens written inline."""
    return (f"GPT4 Correct User: {row['instruction']}\n\n{row['input']}<|end_of_turn|>"
            f"GPT4 Correct Assistant: {row['output']}<|end_of_turn|>")


def medtune_recipe(data_file: Path, model_dir: str | Path, cache_dir: Path, output_dir: Path, max_length: int,
                   *overrides: str):
    """medtune's side: configs/recipes/tiny.yaml's QLoRA settings over `data_file`, train split only (the
    baselines have no eval either), `overrides` as on the training command line."""
    from medtune.training.config import parse_recipe

    return parse_recipe([
        "--config", str(ROOT / "configs/recipes/tiny.yaml"), "--model_name_or_path", str(model_dir),
        "--dataset_name", str(data_file), "--data_cache_dir", str(cache_dir), "--output_dir", str(output_dir),
        "--max_length", str(max_length), *overrides,
    ], replace={"eval_dataset_name": None, "eval_split": "none"})


def interleave(sides: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run every side `repeats` times, alternating and rotating the order each round, so that load from other
    users of the machine lands on both sides alike; the ratio of medians is what the benchmark reports."""
    names = list(sides)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(sides[name]())
    return results


def guarded(run: Callable[[], dict]) -> Callable[[], dict]:
    """One side failing (out of memory, a kernel that does not install) is a result, not the end of the run: the
    other sides' numbers still come out, and the error is reported in its row."""
    def call() -> dict:
        try:
            return run()
        except Exception as err:  # noqa: BLE001 - whatever stops one side is reported in its row
            import traceback

            traceback.print_exc()
            return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
    return call


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def machine() -> dict:
    """CPU model, cores, RAM and load: the context every number in docs/BENCHMARKS.md needs."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    import torch
    import transformers
    import trl

    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))

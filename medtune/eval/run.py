"""`medtune-eval`: held-out MedTuned metrics per task family and per source corpus, in one command.

    medtune-eval --model outputs/starling-medtuned --baseline --data nlpie/Llama2-MedTuned-Instructions \\
        --split validation --max-samples-per-source 200 --out outputs/eval
    medtune-eval --data rows.jsonl --predictions preds.jsonl --out outputs/eval     # replies made elsewhere

With --model, every row's reply is generated (greedy, batched, stops at the model's stop ids) from the user turn
`chat_format.user_message(instruction, input)` in the model's chat format, and the teacher-forced loss on the gold
reply gives the perplexity; --baseline adds a second model side by side. With --predictions, the replies come from
a file with one {"prediction": "..."} per row of --data, in its order (vLLM, another server). Either way the replies
are scored per family and source (medtune.data.sources, medtune.eval.scorers) into eval.json, eval.md and
eval_predictions.jsonl in --out (medtune.eval.report), and optionally W&B.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

from medtune import adapters
from medtune.command_line import add_runtime_arguments
from medtune.data.rows import RowReport, is_local, json_lines
from medtune.eval.report import log_wandb, write_report
from medtune.eval.score import score
from medtune.data.select import load_rows, select_rows

AUTO = "auto"


def read_predictions(path: str, expected: int) -> tuple[list[str], int]:
    """(one reply per record of --data, how many records had no usable reply and score as empty). A count that does
    not match the records of --data stops here: the replies could not be lined up with their rows."""
    if not is_local(path):
        raise SystemExit(f"--predictions {path}: no such file")
    replies, bad = [], []
    for where, record in json_lines(Path(path), RowReport()):
        ok = isinstance(record, dict) and isinstance(record.get("prediction"), str)
        bad += [] if ok else [where]
        replies.append(record["prediction"] if ok else "")
    if len(replies) != expected:
        raise SystemExit(f"--predictions {path} has {len(replies)} records but --data has {expected} rows (skipped "
                         "rows included); write one {\"prediction\": ...} line per row of --data, in its order")
    if bad and len(bad) == len(replies):
        raise SystemExit(f"--predictions {path}: none of its {len(bad)} records has a string 'prediction' (first: "
                         f"{bad[0]}): nothing to score")
    if bad:
        print(f"{path}: {len(bad)} record(s) without a string 'prediction' (first: {bad[0]}), scored as empty replies")
    return replies, len(bad)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medtune-eval", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="base or merged model folder/hub id, or a LoRA adapter folder")
    which.add_argument("--predictions", help="score these replies instead of generating: a .jsonl file with one "
                       '{"prediction": "..."} per row of --data, in its order')
    p.add_argument("--baseline", nargs="?", const=AUTO, default=None,
                   help="also evaluate this model and report side by side; without a value: the base model "
                        "recorded in the adapter's adapter_config.json (evaluated with the adapter disabled)")
    p.add_argument("--data", required=True, help="held-out rows: .jsonl/.json/.csv/.parquet file or dataset id")
    p.add_argument("--split", default=None, help="dataset split (default: first of test/validation/eval/train)")
    p.add_argument("--max-samples-per-source", type=int, default=None,
                   help="at most N rows of each source corpus, seeded random")
    p.add_argument("--max-samples", type=int, default=None, help="at most N rows in all, spread evenly over sources")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", "--output", dest="out", default="outputs/eval", help="report folder (default: %(default)s)")
    add_runtime_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the row selection")
    p.add_argument("--wandb", action="store_true", help="log the table to W&B (offline unless configured)")
    p.add_argument("--wandb-project", default="medtune")
    args = p.parse_args(argv)
    if args.baseline is not None and args.model is None:
        p.error("--baseline compares two models: it needs --model")
    return args


def _evaluate_models(args, rows: list[dict]) -> tuple[dict, list[str], dict | None, list[str] | None, str | None]:
    import torch

    from medtune import inference
    from medtune.eval.generate import evaluate_model

    adapter = adapters.is_adapter(args.model)
    model, fmt = inference.load_for_inference(args.model, device=args.device, dtype=args.dtype)
    baseline = adapters.adapter_base(args.model) if args.baseline == AUTO else args.baseline
    print(f"evaluating {args.model} on {len(rows)} rows")
    results, replies = evaluate_model(model, fmt, rows, args.max_new_tokens, args.batch_size)
    if baseline is None:
        return results, replies, None, None, None
    print(f"evaluating baseline {baseline}")
    if adapter and baseline == adapters.adapter_base(args.model):
        context = model.disable_adapter()  # the same weights without the adapter: no second load
    else:  # another model: free the tuned one first (two 7B models rarely fit together)
        del model
        torch.cuda.empty_cache()
        model, fmt = inference.load_for_inference(baseline, device=args.device, dtype=args.dtype)
        context = nullcontext()
    with context:
        base, base_replies = evaluate_model(model, fmt, rows, args.max_new_tokens, args.batch_size)
    return results, replies, base, base_replies, baseline


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.baseline == AUTO:
        if not adapters.is_adapter(args.model):
            raise SystemExit("--baseline without a value needs --model to be a LoRA adapter folder; "
                             "pass the base model path explicitly")
    rows, read = load_rows(args.data, args.split)
    bad_predictions = 0
    if args.predictions:
        replies, bad_predictions = read_predictions(args.predictions, read.rows_read)
        rows = [{**row, "prediction": replies[row["index"]]} for row in rows]
    rows = select_rows(rows, args.max_samples, args.seed, args.max_samples_per_source)
    if not rows:
        raise SystemExit(f"no usable rows in {args.data} (skipped: {dict(read.skipped) or 'none'})")
    header = {"model": args.model, "predictions": args.predictions, "data": args.data,
              "split": args.split or "default", "rows": len(rows), "seed": args.seed,
              "max_samples": args.max_samples, "max_samples_per_source": args.max_samples_per_source}
    base = base_replies = None
    if args.predictions:
        replies = [row["prediction"] for row in rows]
        results = score(rows, replies)
    else:
        results, replies, base, base_replies, baseline = _evaluate_models(args, rows)
        header |= {"baseline": baseline, "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}
    results["rows"] = {"read": read.rows_read, "skipped": dict(read.skipped), "duplicates": read.duplicates,
                       "notes": dict(read.notes), "unusable_predictions": bad_predictions}
    table = write_report(args.out, header, rows, replies, results, base, base_replies)
    if args.wandb:
        log_wandb(table, header, args.wandb_project)
    print((Path(args.out) / "eval.md").read_text())


if __name__ == "__main__":
    main()

"""`medtune-eval`: held-out MedTuned metrics per task family and per source corpus, in one command.

    medtune-eval --model outputs/starling-medtuned --baseline --data nlpie/Llama2-MedTuned-Instructions \\
        --split validation --max-samples-per-source 200 --out outputs/eval
    medtune-eval --data rows.jsonl --predictions preds.jsonl --out outputs/eval     # replies made elsewhere
    medtune-eval --endpoint http://gpu-node:8000/v1 --served-model adjusted_model --concurrency 64 \\
        --baseline-served-model berkeley-nest/Starling-LM-7B-alpha --data ... --out outputs/eval [--resume]

With --model, every row's reply is generated (greedy, batched, stops at the model's stop ids) from the user turn
`chat_format.user_message(instruction, input)` in the model's chat format, and the teacher-forced loss on the gold
reply gives the perplexity; --baseline adds a second model side by side. With --endpoint, each reply comes from an
OpenAI-compatible server (vLLM, medtune-serve), asked for the same greedy reply to the same messages, N rows at a
time, resumably (medtune.eval.endpoint). With --predictions, the replies come from a file with one
{"prediction": "..."} per row of --data, in its order. Either way the replies are scored per family and source
(medtune.data.sources, medtune.eval.scorers) into eval.json, eval.md and
eval_predictions.jsonl in --out (medtune.eval.report), and optionally W&B.
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

from medtune import adapters
from medtune.command_line import add_runtime_arguments
from medtune.data.rows import RowReport, is_local, json_lines
from medtune.eval.report import headline_table, log_wandb, write_report
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
    which.add_argument("--endpoint", metavar="URL", help="generate through this OpenAI-compatible API (vLLM, "
                       "medtune-serve), e.g. http://127.0.0.1:8000/v1")
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
    remote = p.add_argument_group("--endpoint")
    remote.add_argument("--api-key", default=os.environ.get("MEDTUNE_EVAL_API_KEY"),
                        help="the endpoint's key, sent to --baseline-endpoint too (default: $MEDTUNE_EVAL_API_KEY)")
    remote.add_argument("--served-model", metavar="NAME",
                        help="the model name to ask for (default: the only one the endpoint serves)")
    remote.add_argument("--baseline-endpoint", metavar="URL", help="also evaluate the base model there "
                        "(default with --baseline-served-model: --endpoint)")
    remote.add_argument("--baseline-served-model", metavar="NAME",
                        help="the base model's name there (vLLM --enable-lora serves base and adapter together)")
    remote.add_argument("--concurrency", type=int, default=16,
                        help="requests in flight (default: %(default)s; about twice medtune-serve's --max-batch-size "
                             "keeps its batches full, vLLM takes more)")
    remote.add_argument("--max-attempts", type=int, default=6,
                        help="a row that fails this many times is recorded as failed (default: %(default)s)")
    remote.add_argument("--resume", action="store_true",
                        help="skip the rows already in --out's eval_predictions.jsonl (an interrupted run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row selection")
    p.add_argument("--wandb", action="store_true", help="log the table to W&B (offline unless configured)")
    p.add_argument("--wandb-project", default="medtune")
    args = p.parse_args(argv)
    if args.baseline is not None and args.model is None:
        p.error("--baseline compares two models: it needs --model (with --endpoint: --baseline-endpoint or "
                "--baseline-served-model)")
    remote_only = [f for f, v in (("--baseline-endpoint", args.baseline_endpoint), ("--resume", args.resume),
                                  ("--served-model", args.served_model),
                                  ("--baseline-served-model", args.baseline_served_model)) if v]
    if remote_only and args.endpoint is None:
        p.error(f"{remote_only[0]} goes with --endpoint")
    for flag, value in (("--concurrency", args.concurrency), ("--max-attempts", args.max_attempts),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    return args


def _evaluate_models(args, rows: list[dict]) -> tuple[dict, list[str], dict | None, list[str] | None, str | None]:
    import torch

    from medtune import inference
    from medtune.eval.generate import evaluate_model

    adapter = adapters.is_adapter(args.model)
    as_trained = args.adapter_base == "as-trained"
    model, fmt = inference.load_for_inference(args.model, device=args.device, dtype=args.dtype, as_trained=as_trained)
    baseline = adapters.adapter_base(args.model) if args.baseline == AUTO else args.baseline
    print(f"evaluating {args.model} on {len(rows)} rows")
    results, replies = evaluate_model(model, fmt, rows, args.max_new_tokens, args.batch_size)
    if baseline is None:
        return results, replies, None, None, None
    print(f"evaluating baseline {baseline}")
    # The base as it is, never its quantised round trip: the adapter disabled only when it runs on those weights.
    if adapter and baseline == adapters.adapter_base(args.model) and not (
            as_trained and adapters.trained_quantization(args.model)):
        context = model.disable_adapter()  # the same weights without the adapter: no second load
    else:  # another model: free the tuned one first (two 7B models rarely fit together)
        del model
        torch.cuda.empty_cache()
        model, fmt = inference.load_for_inference(baseline, device=args.device, dtype=args.dtype)
        context = nullcontext()
    with context:
        base, base_replies = evaluate_model(model, fmt, rows, args.max_new_tokens, args.batch_size)
    return results, replies, base, base_replies, baseline


def _evaluate_endpoints(args, rows: list[dict], all_rows: list[dict]):
    """(rows with a reply from every side, replies, results, base replies, base results, header fields, failed)."""
    from medtune.eval import endpoint

    sides = {"prediction": endpoint.connect(args.endpoint, args.api_key, args.served_model)}
    if args.baseline_endpoint or args.baseline_served_model:
        sides["base_prediction"] = endpoint.connect(args.baseline_endpoint or args.endpoint, args.api_key,
                                                    args.baseline_served_model, "--baseline-endpoint")
    outcome = endpoint.generate(sides, rows, all_rows, args.out, args.concurrency, args.max_new_tokens,
                                args.max_attempts, args.resume)
    rows = [row for row in rows if row["index"] not in outcome.failed]  # failed rows are counted, not scored
    replies = {side: [outcome.replies[side][row["index"]] for row in rows] for side in sides}
    header = {"endpoint": sides["prediction"].url, "served_model": sides["prediction"].model,
              "concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}
    base = base_replies = None
    if "base_prediction" in sides:
        header |= {"baseline_endpoint": sides["base_prediction"].url,
                   "baseline_served_model": sides["base_prediction"].model}
        base_replies = replies["base_prediction"]
        base = score(rows, base_replies)
    results = score(rows, replies["prediction"])
    results["requests"] = outcome.requests
    failed = [outcome.failed[i] for i in sorted(outcome.failed)]
    return rows, replies["prediction"], results, base_replies, base, header, failed


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.baseline == AUTO:
        if not adapters.is_adapter(args.model):
            raise SystemExit("--baseline without a value needs --model to be a LoRA adapter folder; "
                             "pass the base model path explicitly")
    all_rows, read = load_rows(args.data, args.split)
    rows = all_rows
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
    failed: list[str] = []
    if args.predictions:
        replies = [row["prediction"] for row in rows]
        results = score(rows, replies)
    elif args.endpoint:
        rows, replies, results, base_replies, base, remote, failed = _evaluate_endpoints(args, rows, all_rows)
        header |= remote
    else:
        results, replies, base, base_replies, baseline = _evaluate_models(args, rows)
        header |= {"baseline": baseline, "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}
        if adapters.is_adapter(args.model):  # which base weights the adapter ran on (medtune.inference.load_base)
            header["adapter_base"] = args.adapter_base if adapters.trained_quantization(args.model) else "original"
    results["rows"] = {"read": read.rows_read, "skipped": dict(read.skipped), "duplicates": read.duplicates,
                       "notes": dict(read.notes), "unusable_predictions": bad_predictions}
    if args.endpoint:
        results["rows"] |= {"failed": len(failed), "failed_examples": failed[:5]}
    table = write_report(args.out, header, rows, replies, results, base, base_replies)
    if args.wandb:
        log_wandb(table, header, args.wandb_project)
    print(f"{len(rows)} rows of {args.data}:")
    print(headline_table(results, base))
    out = Path(args.out)
    print(f"every metric, per family and source: {out / 'eval.md'}; the report: {out / 'eval.json'}")
    if failed:
        raise SystemExit(f"{len(failed)} row(s) got no reply and are not scored (first: {failed[0]}); eval.json "
                         "counts them under rows.failed; run the same command with --resume to retry them")


if __name__ == "__main__":
    main()

"""`medtune-eval`: held-out MedTuned metrics per task family and per source corpus, and the symptom consultation
(triage safety and diagnosis on patient vignettes), in one command.

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

A --data file of patient vignettes (detected per file, medtune.data.vignettes) is the `consultation` family: each
vignette is asked the questions of medtune.eval.consultation, with medtune-serve's system prompt unless
--system-prompt says otherwise, and scored for triage safety and diagnosis; --judge-endpoint adds an LLM judge's
reading beside the deterministic one (medtune.eval.judge). --data takes several files:

    medtune-eval --model outputs/demo --baseline --data data/sample/medtuned_sample_eval.jsonl \
        data/vignettes/heldout.jsonl --out outputs/demo
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from medtune import adapters
from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT
from medtune.command_line import add_runtime_arguments
from medtune.data.rows import RowReport, is_local, json_lines
from medtune.data.select import load_rows, select_rows
from medtune.eval import consultation
from medtune.eval.report import consultation_table, headline_table, log_wandb, write_report
from medtune.eval.score import score
from medtune.eval.scorers.consultation import Matcher
from medtune.inference.gguf import GGUFError

AUTO = "auto"


@dataclass
class Side:
    """One model's replies: to the MedTuned rows (in row order, with their scores) and to the consultation."""

    results: dict
    replies: list[str]
    consult: dict = field(default_factory=dict)  # (vignette index, question) -> reply
    likelihood: dict | None = None  # vignette index -> level (local models only)
    read: list[dict] = field(default_factory=list)  # per vignette what its replies say (consultation.read)


def no_rows() -> dict:
    return {"families": {}, "sources": {}, "overall": {"n": 0}, "unknown_sources": {}}


def load_data(paths: Sequence[str], split: str | None) -> tuple[list[dict], RowReport]:
    """The rows of every --data, indexed as one sequence of records (so that --predictions and --resume line up with
    them), and one report of what was read and skipped."""
    rows, report = [], RowReport()
    for path in paths:
        part, read = load_rows(path, split)
        rows += [{**row, "index": report.rows_read + row["index"]} for row in part]
        report.add(read)
    return rows, report


def read_predictions(path: str, rows: Sequence[dict], expected: int) -> tuple[dict[int, dict], int]:
    """({row index: its record}, how many rows have no usable reply and score as empty). A MedTuned row's record has
    a string `prediction`; a vignette's has a string under each question asked (`consult`, `triage`,
    `differential`). A count that does not match the records of --data stops here: the replies could not be lined
    up with their rows."""
    if not is_local(path):
        raise SystemExit(f"--predictions {path}: no such file")
    records = list(json_lines(Path(path), RowReport()))
    if len(records) != expected:
        raise SystemExit(f"--predictions {path} has {len(records)} records but --data has {expected} rows (skipped "
                         "rows included); write one {\"prediction\": ...} line per row of --data (for a vignette "
                         "{\"consult\": ..., \"triage\": ..., \"differential\": ...}), in its order")
    usable, bad = {}, []
    for row in rows:
        where, record = records[row["index"]]
        keys = consultation.questions(row) if consultation.is_vignette(row) else ["prediction"]
        record = record if isinstance(record, dict) else {}
        usable[row["index"]] = {k: record[k] if isinstance(record.get(k), str) else "" for k in keys}
        bad += [] if all(isinstance(record.get(k), str) for k in keys) else [where]
    if bad and len(bad) == len(rows):
        raise SystemExit(f"--predictions {path}: none of its {len(bad)} records has a string 'prediction' (for a "
                         f"vignette: its questions' replies) (first: {bad[0]}): nothing to score")
    if bad:
        print(f"{path}: {len(bad)} record(s) without a string 'prediction' (or a vignette's replies) (first: "
              f"{bad[0]}), scored as empty replies")
    return usable, len(bad)


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
    p.add_argument("--data", required=True, nargs="+", help="held-out rows: .jsonl/.json/.csv/.parquet files or a "
                   "dataset id; MedTuned rows, and patient vignettes for the consultation")
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
    consult = p.add_argument_group("consultation (vignette files in --data)")
    consult.add_argument("--system-prompt", default=None, help="the system prompt the vignettes are asked under "
                         "(default: medtune-serve's, so that the page's behaviour is measured; '' for none)")
    consult.add_argument("--aliases", action="append", default=[], metavar="FILE",
                         help="more diagnosis alias groups (YAML `groups:` of name lists), added to medtune's")
    consult.add_argument("--judge-endpoint", metavar="URL", help="also have the replies read by an LLM judge behind "
                         "this OpenAI-compatible API; reported beside the deterministic numbers, never mixed in")
    consult.add_argument("--judge-model", metavar="NAME", help="the judge's served model (default: the only one)")
    consult.add_argument("--judge-api-key", default=os.environ.get("MEDTUNE_JUDGE_API_KEY"),
                         help="the judge endpoint's key (default: $MEDTUNE_JUDGE_API_KEY)")
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
    if args.judge_model and not args.judge_endpoint:
        p.error("--judge-model goes with --judge-endpoint")
    if args.predictions and len(args.data) > 1:
        p.error("--predictions lines its records up with one --data file: give one")
    for flag, value in (("--concurrency", args.concurrency), ("--max-attempts", args.max_attempts),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    return args


def _run_model(model, fmt, rows: list[dict], vignettes: list[dict], args, system_prompt: str) -> Side:
    from medtune.eval.generate import consultation_replies, evaluate_model

    results, replies = evaluate_model(model, fmt, rows, args.max_new_tokens, args.batch_size) if rows else (
        no_rows(), [])
    side = Side(results, replies)
    if vignettes:
        side.consult, side.likelihood = consultation_replies(model, fmt, vignettes, system_prompt,
                                                             args.max_new_tokens, args.batch_size)
    return side


def _evaluate_models(args, rows: list[dict], vignettes: list[dict],
                     system_prompt: str) -> tuple[Side, Side | None, str | None]:
    import torch

    from medtune.inference.load import load_for_inference

    adapter = adapters.is_adapter(args.model)
    as_trained = args.adapter_base == "as-trained"
    model, fmt = load_for_inference(args.model, device=args.device, dtype=args.dtype, as_trained=as_trained,
                                              engine=args.engine, max_sequences=args.batch_size)
    baseline = adapters.adapter_base(args.model) if args.baseline == AUTO else args.baseline
    print(f"evaluating {args.model} on {len(rows)} rows and {len(vignettes)} vignettes")
    tuned = _run_model(model, fmt, rows, vignettes, args, system_prompt)
    if baseline is None:
        return tuned, None, None
    print(f"evaluating baseline {baseline}")
    # The base as it is, never its quantised round trip: the adapter disabled only when it runs on those weights.
    if adapter and baseline == adapters.adapter_base(args.model) and not (
            as_trained and adapters.trained_quantization(args.model)):
        context = model.disable_adapter()  # the same weights without the adapter: no second load
    else:  # another model: free the tuned one first (two 7B models rarely fit together)
        del model
        torch.cuda.empty_cache()
        model, fmt = load_for_inference(baseline, device=args.device, dtype=args.dtype, engine=args.engine,
                                                  max_sequences=args.batch_size)
        context = nullcontext()
    with context:
        base = _run_model(model, fmt, rows, vignettes, args, system_prompt)
    return tuned, base, baseline


def _evaluate_endpoints(args, rows: list[dict], vignettes: list[dict], all_rows: list[dict], system_prompt: str):
    """(MedTuned rows with a reply from every side, tuned Side, base Side or None, header fields, failed)."""
    from medtune.eval import endpoint
    from medtune.eval.predictions import key

    sides = {"prediction": endpoint.connect(args.endpoint, args.api_key, args.served_model)}
    if args.baseline_endpoint or args.baseline_served_model:
        sides["base_prediction"] = endpoint.connect(args.baseline_endpoint or args.endpoint, args.api_key,
                                                    args.baseline_served_model, "--baseline-endpoint")
    asks = consultation.requests(vignettes, system_prompt, args.max_new_tokens)
    all_medtuned = [row for row in all_rows if not consultation.is_vignette(row)]
    outcome = endpoint.generate(sides, rows + asks, all_medtuned + asks, args.out, args.concurrency,
                                args.max_new_tokens, args.max_attempts, args.resume)
    rows = [row for row in rows if key(row) not in outcome.failed]  # failed rows are counted, not scored
    header = {"endpoint": sides["prediction"].url, "served_model": sides["prediction"].model,
              "concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}
    result = {}
    for name in sides:
        got = outcome.replies[name]
        replies = [got[key(row)] for row in rows]
        side = Side(score(rows, replies) if rows else no_rows(), replies)
        side.consult = {key(a): got[key(a)] for a in asks if key(a) in got}
        result[name] = side
    result["prediction"].results["requests"] = outcome.requests
    if "base_prediction" in sides:
        header |= {"baseline_endpoint": sides["base_prediction"].url,
                   "baseline_served_model": sides["base_prediction"].model}
    failed = [outcome.failed[k] for k in sorted(outcome.failed, key=lambda k: (k[0], k[1] or ""))]
    return rows, result["prediction"], result.get("base_prediction"), header, failed


def _from_predictions(rows: list[dict], vignettes: list[dict], records: dict[int, dict]) -> Side:
    replies = [records[row["index"]]["prediction"] for row in rows]
    side = Side(score(rows, replies) if rows else no_rows(), replies)
    side.consult = {(v["index"], q): reply for v in vignettes for q, reply in records[v["index"]].items()}
    return side


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.baseline == AUTO:
        if not adapters.is_adapter(args.model):
            raise SystemExit("--baseline without a value needs --model to be a LoRA adapter folder; "
                             "pass the base model path explicitly")
    matcher = Matcher(args.aliases)  # a bad alias file stops here, before any model loads
    judge_endpoint = None
    if args.judge_endpoint:  # so does a judge that cannot be reached; one that fails later only loses its rows
        from medtune.eval import judge

        judge_endpoint = judge.connect(args.judge_endpoint, args.judge_api_key, args.judge_model)
    all_rows, read = load_data(args.data, args.split)
    vignettes = [row for row in all_rows if consultation.is_vignette(row)]
    rows = [row for row in all_rows if not consultation.is_vignette(row)]
    bad_predictions = 0
    if args.predictions:
        records, bad_predictions = read_predictions(args.predictions, all_rows, read.rows_read)
    rows = select_rows(rows, args.max_samples, args.seed, args.max_samples_per_source)
    if not rows and not vignettes:
        raise SystemExit(f"no usable rows in {' '.join(args.data)} (skipped: {dict(read.skipped) or 'none'})")
    system_prompt = DEFAULT_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt
    header = {"model": args.model, "predictions": args.predictions,
              "data": args.data[0] if len(args.data) == 1 else args.data,
              "split": args.split or "default", "rows": len(rows), "seed": args.seed,
              "max_samples": args.max_samples, "max_samples_per_source": args.max_samples_per_source}
    if vignettes:
        header |= {"vignettes": len(vignettes), "system_prompt": system_prompt}
    base = None
    failed: list[str] = []
    if args.predictions:
        tuned = _from_predictions(rows, vignettes, records)
    elif args.endpoint:
        rows, tuned, base, remote, failed = _evaluate_endpoints(args, rows, vignettes, all_rows, system_prompt)
        header |= remote
    else:
        from medtune.inference.load import pick_engine

        try:
            tuned, base, baseline = _evaluate_models(args, rows, vignettes, system_prompt)
        except (GGUFError, OSError) as err:  # a missing or damaged .gguf
            raise SystemExit(f"medtune-eval: {err}") from None
        header |= {"baseline": baseline, "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
                   "engine": pick_engine(args.model, args.engine)}
        if adapters.is_adapter(args.model):  # which base weights the adapter ran on (medtune.inference.load.load_base)
            header["adapter_base"] = args.adapter_base if adapters.trained_quantization(args.model) else "original"
    sides = [tuned] + ([base] if base else [])
    comparison = None
    if vignettes:
        for side in sides:
            side.read = consultation.read(vignettes, side.consult, matcher, side.likelihood)
            side.results["families"]["consultation"] = consultation.score(vignettes, side.read)
        if base:
            comparison = consultation.compare(vignettes, tuned.read, base.read)
            tuned.results["families"]["consultation"]["compared"] = comparison["mcnemar"]
        for side in sides if judge_endpoint else ():
            side.results["families"]["consultation"]["judge"] = judge.judge(judge_endpoint, vignettes, side.consult,
                                                                           args.concurrency)
    results = tuned.results
    results["rows"] = {"read": read.rows_read, "skipped": dict(read.skipped), "duplicates": read.duplicates,
                       "notes": dict(read.notes), "unusable_predictions": bad_predictions}
    if args.endpoint:
        results["rows"] |= {"failed": len(failed), "failed_examples": failed[:5]}
    table = write_report(args.out, header, rows, tuned.replies, results, base and base.results,
                         base and base.replies, vignettes, tuned.read, base and base.read, comparison)
    if args.wandb:
        log_wandb(table, header, args.wandb_project)
    if rows:
        print(f"{len(rows)} MedTuned rows:")
        print(headline_table(results, base and base.results))
    if vignettes:
        print(f"consultation, {len(vignettes)} vignettes (system prompt: "
              f"{'medtune-serve' if system_prompt == DEFAULT_SYSTEM_PROMPT else repr(system_prompt[:60])}):")
        print(consultation_table(results, base and base.results))
    out = Path(args.out)
    print(f"every metric, per family and source: {out / 'eval.md'}; the report: {out / 'eval.json'}")
    if args.model and adapters.is_adapter(args.model) and out.resolve() in (Path(args.model).resolve(),
                                                                            Path(args.model).resolve().parent):
        from medtune.export.model_card import write_adapter_card

        print(f"model card with these results: {write_adapter_card(args.model)}")
    if failed:
        raise SystemExit(f"{len(failed)} row(s) got no reply and are not scored (first: {failed[0]}); eval.json "
                         "counts them under rows.failed; run the same command with --resume to retry them")


if __name__ == "__main__":
    main()

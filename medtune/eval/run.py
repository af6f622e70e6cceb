"""`medtune-eval`: held-out MedTuned metrics per task family, tuned model vs its base, in one command.

    medtune-eval --model outputs/starling-medtuned --baseline --data data/sample/medtuned_sample_eval.jsonl

For every row the reply is generated (greedy, batched, stops at <|end_of_turn|>) from the user turn
`chat_format.user_message(instruction, input)` and scored by its task family (`tasks.detect_family`,
`scorers.SCORERS`); the teacher-forced loss on the reply tokens (`chat_format.encode_example`) gives the
perplexity. Writes eval_results.json, eval_results.md (family | n | metric | base | tuned | delta) and
eval_predictions.jsonl to --output, and optionally the same table to W&B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Mapping, Sequence

import torch

from medtune import inference
from medtune.chat_format import encode_example, user_message
from medtune.data.rows import hub_splits, is_local, read_rows
from medtune.eval.scorers import SCORERS
from medtune.eval.tasks import FAMILIES, detect_family

Row = Mapping[str, str]
Results = dict[str, dict[str, float]]  # family (and "all") -> metric -> value
COLUMNS = ("family", "n", "metric", "base", "tuned", "delta")
AUTO = "auto"
# Metrics computed on a subset of a family's rows: the table's n is that subset's size.
_SUBSET_N = {"qa": {"yes_no_maybe_accuracy": "n_yes_no_maybe", "rougeL_f": "n_free_text", "token_f1": "n_free_text"}}


# -- data ----------------------------------------------------------------------------------------------------

def load_rows(data: str, split: str | None = None) -> list[dict[str, str]]:
    """instruction/input/output rows from a local .jsonl/.json/.csv/.parquet file or folder, or a dataset id
    (split: --split, else the first of test/validation/eval/train that exists). Bad rows are skipped and counted
    by medtune.data.read_rows, as in training."""
    if split is None and not is_local(data):
        available = hub_splits(data, None)
        split = next((s for s in ("test", "validation", "eval", "train") if s in available), None)
        if split is None:
            raise ValueError(f"{data}: none of the splits test/validation/eval/train exists (has {available})")
    rows, _ = read_rows(data, split or "train")
    return rows


def select_rows(rows: Sequence[Row], max_samples: int | None, seed: int = 0) -> list[Row]:
    """Up to max_samples rows, taken round-robin across task families (each family in a seeded random order)
    so that a small sample of a family-sorted split still covers every family."""
    if max_samples is None or max_samples >= len(rows):
        return list(rows)
    by_family: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_family[detect_family(row["instruction"])].append(row)
    rng = random.Random(seed)
    queues = [rng.sample(group, len(group)) for _, group in sorted(by_family.items())]
    picked: list[Row] = []
    while len(picked) < max_samples:
        for queue in queues:
            if queue and len(picked) < max_samples:
                picked.append(queue.pop())
    return picked


# -- model passes --------------------------------------------------------------------------------------------

def _batches(indices: Sequence[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def generate_replies(model, tokenizer, rows: Sequence[Row], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies, batched by similar prompt length (less padding), returned in row order."""
    prompts = [user_message(r["instruction"], r.get("input") or "") for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(rows)
    for idx in _batches(order, batch_size):
        conversations = [[{"role": "user", "content": prompts[i]}] for i in idx]
        for i, reply in zip(idx, inference.generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens)):
            replies[i] = reply
    return replies


@torch.inference_mode()
def reply_losses(model, tokenizer, rows: Sequence[Row], batch_size: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each gold reply (incl. its <|end_of_turn|>), teacher-forced."""
    encoded = [encode_example(tokenizer, r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for idx in _batches(order, batch_size):
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        reply = torch.zeros_like(ids, dtype=torch.bool)
        for b, i in enumerate(idx):  # right padding: positions stay 0..n-1
            seq, mask = encoded[i]
            ids[b, :len(seq)], attention[b, :len(seq)] = torch.tensor(seq), 1
            reply[b, :len(seq)] = torch.tensor(mask, dtype=torch.bool)
        ids, attention, reply = ids.to(model.device), attention.to(model.device), reply.to(model.device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll = (nll * reply[:, 1:]).sum(1)
        for b, i in enumerate(idx):
            out[i] = (nll[b].item(), int(reply[b].sum()))
    return out


def score(rows: Sequence[Row], replies: Sequence[str], losses: Sequence[tuple[float, int]]) -> Results:
    """Per-family metrics plus reply loss, and an "all" entry with the overall loss and perplexity."""
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_family[detect_family(row["instruction"])].append(i)

    def loss_of(idx: Sequence[int]) -> float:
        return sum(losses[i][0] for i in idx) / max(1, sum(losses[i][1] for i in idx))

    results: Results = {}
    for family in (f for f in FAMILIES if f in by_family):
        idx = by_family[family]
        metrics = SCORERS[family]([rows[i]["output"] for i in idx], [replies[i] for i in idx])
        results[family] = {"n": len(idx), **metrics, "loss": loss_of(idx)}
    overall = loss_of(range(len(rows)))
    results["all"] = {"n": len(rows), "loss": overall, "perplexity": math.exp(overall)}
    return results


def evaluate_model(model, tokenizer, rows: Sequence[Row], max_new_tokens: int = 256,
                   batch_size: int = 8) -> tuple[Results, list[str]]:
    """(per-family results, replies) for one model; restores the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        replies = generate_replies(model, tokenizer, rows, max_new_tokens, batch_size)
        losses = reply_losses(model, tokenizer, rows, batch_size)
    finally:
        model.train(was_training)
    return score(rows, replies, losses), replies


def evaluate_generation(model, tokenizer, rows: Sequence[Row], max_new_tokens: int = 128,
                        batch_size: int = 8) -> dict[str, float]:
    """End-of-training generation eval: flat {"eval_gen_<family>_<metric>": value}, ready for `trainer.log`
    (the "eval_" prefix puts them under eval/ in W&B and TensorBoard)."""
    results, _ = evaluate_model(model, tokenizer, rows, max_new_tokens, batch_size)
    return {f"eval_gen_{family}_{metric}": float(value)
            for family, metrics in results.items() for metric, value in metrics.items()}


# -- report --------------------------------------------------------------------------------------------------

def table_rows(tuned: Results, base: Results | None = None) -> list[dict]:
    """One row per (family, metric): family, n, metric, base, tuned, delta (base and delta None without base)."""
    rows = []
    for family, metrics in tuned.items():
        for metric, value in metrics.items():
            if metric == "n" or metric.startswith("n_"):
                continue
            n = metrics.get(_SUBSET_N.get(family, {}).get(metric, "n"))
            before = base.get(family, {}).get(metric) if base else None
            rows.append({"family": family, "n": int(n), "metric": metric, "base": before, "tuned": value,
                         "delta": None if before is None else value - before})
    return rows


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[dict], header: Mapping[str, object]) -> str:
    lines = ["# Evaluation results", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "Rates are in [0, 1], higher is better; loss and perplexity (reply tokens only, teacher-forced): "
              "lower is better; answer_words: mean reply length in words. n: rows the metric is computed on.",
              "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, header: dict, rows: Sequence[Row], tuned: Results,
                 tuned_replies: Sequence[str], base: Results | None = None,
                 base_replies: Sequence[str] | None = None) -> list[dict]:
    """eval_results.json, eval_results.md and eval_predictions.jsonl in out_dir; returns the table rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = table_rows(tuned, base)
    results = {"tuned": tuned, **({"base": base} if base is not None else {})}
    (out / "eval_results.json").write_text(json.dumps({**header, "results": results, "table": table}, indent=2))
    (out / "eval_results.md").write_text(markdown(table, header))
    with open(out / "eval_predictions.jsonl", "w") as f:
        for i, row in enumerate(rows):
            record = {"family": detect_family(row["instruction"]), **row, "tuned": tuned_replies[i]}
            if base_replies is not None:
                record["base"] = base_replies[i]
            f.write(json.dumps(record) + "\n")
    return table


def log_wandb(table: Sequence[dict], config: dict, project: str) -> None:
    """Log the results table (wandb.Table) and tuned/base/delta summary values; offline unless W&B is set up
    (WANDB_MODE or WANDB_API_KEY), so it never needs the network. Reuses an active run (e.g. the trainer's)."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    started = wandb.run is None
    run = wandb.run or wandb.init(project=project, job_type="eval", config=config, mode=mode)
    run.log({"eval/results": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in table])})
    for r in table:
        for which in ("tuned", "base", "delta"):
            if r[which] is not None:
                run.summary[f"eval/{r['family']}/{r['metric']}/{which}"] = r[which]
    if started:
        run.finish()


# -- CLI -----------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medtune-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="base or merged model folder/hub id, or a LoRA adapter folder")
    p.add_argument("--baseline", nargs="?", const=AUTO, default=None,
                   help="also evaluate this model and report side by side; without a value: the base model "
                        "recorded in the adapter's adapter_config.json (evaluated with the adapter disabled)")
    p.add_argument("--data", required=True, help="eval split: .jsonl/.json/.csv/.parquet file or dataset id")
    p.add_argument("--split", default=None, help="dataset split (default: first of test/validation/eval/train)")
    p.add_argument("--max-samples", type=int, default=None, help="at most N rows, balanced across families")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default="outputs/eval", help="report folder (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-samples selection")
    p.add_argument("--wandb", action="store_true", help="log the table to W&B (offline unless configured)")
    p.add_argument("--wandb-project", default="medtune")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    adapter = inference.is_adapter(args.model)
    if args.baseline == AUTO and not adapter:
        raise SystemExit("--baseline without a value needs --model to be a LoRA adapter folder; "
                         "pass the base model path explicitly")
    rows = select_rows(load_rows(args.data, args.split), args.max_samples, args.seed)
    if not rows:
        raise SystemExit(f"no rows in {args.data}")
    model, tokenizer = inference.load_model(args.model, device=args.device)
    baseline = inference.adapter_base(args.model) if args.baseline == AUTO else args.baseline
    print(f"evaluating {args.model} on {len(rows)} rows")
    tuned, tuned_replies = evaluate_model(model, tokenizer, rows, args.max_new_tokens, args.batch_size)
    base = base_replies = None
    if baseline is not None:
        print(f"evaluating baseline {baseline}")
        if adapter and baseline == inference.adapter_base(args.model):
            context = model.disable_adapter()  # the same weights without the adapter: no second load
        else:  # another model: free the tuned one first (two 7B models rarely fit together)
            del model
            torch.cuda.empty_cache()
            model, tokenizer = inference.load_model(baseline, device=args.device)
            context = nullcontext()
        with context:
            base, base_replies = evaluate_model(model, tokenizer, rows, args.max_new_tokens, args.batch_size)
    header = {"model": args.model, "baseline": baseline, "data": args.data, "split": args.split or "default",
              "rows": len(rows), "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}
    table = write_report(args.output, header, rows, tuned, tuned_replies, base, base_replies)
    if args.wandb:
        log_wandb(table, header, args.wandb_project)
    print((Path(args.output) / "eval_results.md").read_text())


if __name__ == "__main__":
    main()

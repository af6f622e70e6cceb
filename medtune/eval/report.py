"""The evaluation report: eval.json, eval.md (one table), eval_predictions.jsonl, and optionally W&B.

eval.json = {header..., "families": {family: {"n", "primary", metric: value, ...}}, "sources": {source: same},
"overall": {"n"[, "loss", "perplexity"]}, "unknown_sources": {name: rows}, "rows": {what was read and skipped},
"baseline": {the same three for the baseline model, when there is one}, "table": [the Markdown table's rows]}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from medtune.data.sources import source_of
from medtune.eval.predictions import PREDICTIONS, row_hash

COLUMNS = ("scope", "name", "n", "metric", "base", "value", "delta")
# Counts shown in the table although named n_*: NER reply lines that are wrong for their position, or extra.
LINE_COUNTS = ("n_misaligned_lines", "n_extra_lines")
# Metrics computed on a subset of the rows: the table's n is that subset's size.
# (Dialogue's rougeL_f has no n_rougeL: all its rows count.)
SUBSET_N = {"medmcqa_accuracy": ("n_medmcqa",), "pubmedqa_accuracy": ("n_pubmedqa",),
            "answer_accuracy": ("n_medmcqa", "n_pubmedqa"), "rougeL_f": ("n_rougeL",)}


def _n(metrics: Mapping, metric: str) -> int:
    subset = SUBSET_N.get(metric, ())
    return int(sum(metrics[k] for k in subset) if subset and all(k in metrics for k in subset) else metrics["n"])


def table_rows(results: Mapping, base: Mapping | None = None) -> list[dict]:
    """One row per (family or source, metric) and the overall loss/perplexity; base and delta are None without
    a baseline. `primary` marks each group's headline metric."""
    rows = []
    for scope, key in (("family", "families"), ("source", "sources"), ("all", "overall")):
        group = {"all": results[key]} if scope == "all" else results[key]
        base_group = ({"all": base[key]} if scope == "all" else base[key]) if base else {}
        for name, metrics in group.items():
            for metric, value in metrics.items():
                if metric in ("n", "primary") or (metric.startswith("n_") and metric not in LINE_COUNTS):
                    continue
                before = base_group.get(name, {}).get(metric)
                rows.append({"scope": scope, "name": name, "n": _n(metrics, metric), "metric": metric,
                             "primary": metric == metrics.get("primary"), "base": before, "value": value,
                             "delta": None if before is None else value - before})
    return rows


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[dict], header: Mapping[str, object]) -> str:
    lines = ["# Evaluation results", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "Rates are in [0, 1], higher is better; `*` marks each group's headline metric (docs/EVAL.md). "
              "loss and perplexity (reply tokens only, teacher-forced): lower is better; answer_words: mean reply "
              "length in words; n_misaligned_lines / n_extra_lines: NER reply lines naming another token than the "
              "gold's at their position, or beyond the gold's last line (both scored as wrong). n: rows the metric "
              "is computed on.",
              "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = {**r, "metric": r["metric"] + (" *" if r["primary"] else "")}
        lines.append("| " + " | ".join(_cell(cells[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def headline_table(results: Mapping, base: Mapping | None = None) -> str:
    """Each family's headline metric and the reply loss, the model next to its baseline: the console summary."""
    rows = [(f, m["primary"], m["n"], (base or {}).get("families", {}).get(f, {}).get(m["primary"]), m[m["primary"]])
            for f, m in results["families"].items()]
    if "loss" in results["overall"]:
        rows.append(("all", "reply loss (lower is better)", results["overall"]["n"],
                     (base or {}).get("overall", {}).get("loss"), results["overall"]["loss"]))
    head = ("family", "headline metric", "n") + (("base", "tuned", "delta") if base else ("value",))
    lines = [head] + [(f, metric, str(n), *((_cell(b), _cell(v), _cell(None if b is None else v - b)) if base
                                           else (_cell(v),))) for f, metric, n, b, v in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def write_report(out_dir: str | Path, header: dict, rows: Sequence[Mapping], replies: Sequence[str], results: dict,
                 base: dict | None = None, base_replies: Sequence[str] | None = None) -> list[dict]:
    """eval.json, eval.md and eval_predictions.jsonl in out_dir; returns the table rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = table_rows(results, base)
    report = {**header, **results}
    if base is not None:
        # the base's name (a model path, or the served model behind an endpoint) stays beside its results
        name = header.get("baseline") or header.get("baseline_served_model")
        report["baseline"] = {"model": name, **{k: base[k] for k in ("families", "sources", "overall")}}
    (out / "eval.json").write_text(json.dumps({**report, "table": table}, indent=2))
    (out / "eval.md").write_text(markdown(table, header))
    predictions = out / PREDICTIONS
    tmp = predictions.with_name(predictions.name + ".tmp")  # replaced at once: an endpoint run's replies are in it
    with open(tmp, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            source, family = source_of(row)
            # index and row_hash: what `--endpoint --resume` matches its rows by (medtune.eval.predictions)
            record = {"index": row.get("index"), "row_hash": row_hash(row), "source": source, "family": family,
                      "prediction": replies[i], **{k: row.get(k, "") for k in ("instruction", "input", "output")}}
            if base_replies is not None:
                record["base_prediction"] = base_replies[i]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, predictions)
    return table


def log_wandb(table: Sequence[dict], config: dict, project: str) -> None:
    """Log the results table (wandb.Table) and value/base/delta summary values; offline unless W&B is set up
    (WANDB_MODE or WANDB_API_KEY), so it never needs the network. Reuses an active run (e.g. the trainer's)."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    started = wandb.run is None
    run = wandb.run or wandb.init(project=project, job_type="eval", config=config, mode=mode)
    run.log({"eval/results": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in table])})
    for r in table:
        for which in ("value", "base", "delta"):
            if r[which] is not None:
                run.summary[f"eval/{r['scope']}/{r['name']}/{r['metric']}/{which}"] = r[which]
    if started:
        run.finish()

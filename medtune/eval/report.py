"""The evaluation report: eval.json, eval.md (one table), eval_predictions.jsonl, and optionally W&B.

eval.json = {header..., "families": {family: {"n", "primary", metric: value, ...}}, "sources": {source: same},
"overall": {"n"[, "loss", "perplexity"]}, "unknown_sources": {name: rows}, "rows": {what was read and skipped},
"baseline": {the same three for the baseline model, when there is one}, "table": [the Markdown table's rows]}.
With vignettes, families.consultation holds the consultation scores (medtune.eval.consultation.score; with a
baseline also `compared`, the paired McNemar tests) and eval.json `consultation_regressions` the cases the tuned
model under-triages where its base did not, with both replies; eval.md shows both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from medtune.data.sources import source_of
from medtune.data.vignettes import metric_n
from medtune.eval import consultation
from medtune.eval.predictions import PREDICTIONS, row_hash

COLUMNS = ("scope", "name", "n", "metric", "base", "value", "delta")
# Counts shown in the table although named n_*: NER reply lines that are wrong for their position, or extra.
LINE_COUNTS = ("n_misaligned_lines", "n_extra_lines")
# Metrics computed on a subset of the rows: the table's n is that subset's size.
# (Dialogue's rougeL_f has no n_rougeL: all its rows count.)
SUBSET_N = {"medmcqa_accuracy": ("n_medmcqa",), "pubmedqa_accuracy": ("n_pubmedqa",),
            "answer_accuracy": ("n_medmcqa", "n_pubmedqa"), "rougeL_f": ("n_rougeL",)}


def _n(metrics: Mapping, metric: str) -> int:
    if "n_triage" in metrics or "n_diagnosis" in metrics:  # a consultation question
        return metric_n(metrics, metric)
    subset = SUBSET_N.get(metric, ())
    return int(sum(metrics[k] for k in subset) if subset and all(k in metrics for k in subset) else metrics["n"])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table_rows(results: Mapping, base: Mapping | None = None) -> list[dict]:
    """One row per (family or source, metric), per consultation question and metric, and the overall
    loss/perplexity; base and delta are None without a baseline. `primary` marks each group's headline metric."""
    rows = []
    consult = results["families"].get("consultation", {}).get("questions", {})
    base_consult = (base or {}).get("families", {}).get("consultation", {}).get("questions", {})
    for scope, key in (("family", "families"), ("consultation", None), ("source", "sources"), ("all", "overall")):
        if scope == "consultation":
            group, base_group = consult, base_consult
        else:
            group = {"all": results[key]} if scope == "all" else results[key]
            base_group = ({"all": base[key]} if scope == "all" else base[key]) if base else {}
        for name, metrics in group.items():
            for metric, value in metrics.items():
                if metric in ("n", "primary") or not _is_number(value) or (
                        metric.startswith("n_") and metric not in LINE_COUNTS):
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


def _aligned(lines: Sequence[Sequence[str]]) -> str:
    """Rows of cells as left-aligned columns: the console tables."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def headline_table(results: Mapping, base: Mapping | None = None) -> str:
    """Each family's headline metric and the reply loss, the model next to its baseline: the console summary."""
    rows = [(f, m["primary"], m["n"], (base or {}).get("families", {}).get(f, {}).get(m["primary"]), m[m["primary"]])
            for f, m in results["families"].items() if f != "consultation"]
    if "loss" in results["overall"]:
        rows.append(("all", "reply loss (lower is better)", results["overall"]["n"],
                     (base or {}).get("overall", {}).get("loss"), results["overall"]["loss"]))
    head = ("family", "headline metric", "n") + (("base", "tuned", "delta") if base else ("value",))
    lines = [head] + [(f, metric, str(n), *((_cell(b), _cell(v), _cell(None if b is None else v - b)) if base
                                           else (_cell(v),))) for f, metric, n, b, v in rows]
    return _aligned(lines)


def consultation_table(results: Mapping, base: Mapping | None = None) -> str:
    """The consultation's scores per question, the model next to its baseline, with the paired McNemar p-value where
    there is one: the console summary and eval.md's consultation section."""
    tuned = results["families"]["consultation"]
    before = (base or {}).get("families", {}).get("consultation", {}).get("questions", {})
    tests = tuned.get("compared", {})
    head = ("question", "metric", "n") + (("base", "tuned", "delta", "McNemar p") if base else ("value",))
    lines = [head]
    for question, metrics in tuned["questions"].items():
        names = ("top1", "top3", "top5") if question == consultation.DIFFERENTIAL else consultation.TRIAGE_METRICS
        for metric in names:
            value, b = metrics[metric], before.get(question, {}).get(metric)
            text = _cell(value)
            if metric == "emergency_recall":
                low, high = metrics["emergency_recall_ci"]
                text += f" [{low:.2f}, {high:.2f}]"
            n = metric_n(metrics, metric)
            p = tests.get(question, {}).get(metric, {}).get("p_value")
            lines.append((question, metric, str(n), *((_cell(b), text, _cell(None if b is None else value - b),
                                                      "–" if p is None else f"{p:.3g}") if base else (text,))))
    return _aligned(lines)


def _consultation_markdown(results: Mapping, base: Mapping | None, regressions: Sequence[Mapping] | None) -> str:
    text = ["", "## Consultation", "",
            "Triage levels read from the replies by medtune's rules (docs/EVAL.md \"Consultation\"): accuracy, "
            "safety (the share at or above the true urgency; an unparsed reply is unsafe), emergency recall with "
            "its exact 95 % interval, emergencies under-triaged, over-triage rate, unparsed replies; top-k: the "
            "correct diagnosis among the first k listed. McNemar p: paired exact test of the two models on the "
            "same cases.", "", "```", consultation_table(results, base), "```"]
    if regressions is not None:
        text += ["", f"### Regressions: {len(regressions)} case(s) the tuned model under-triages where its base did "
                 "not", ""]
        for r in regressions:
            text += [f"- **{r['id'] or r['where']}** ({r['question']}): gold {r['triage']}, base "
                     f"{r['base_level'] or 'unparsed'}, tuned {r['tuned_level'] or 'unparsed'}",
                     f"  - case: {r['case']}", f"  - base: {_quote(r['base_reply'])}",
                     f"  - tuned: {_quote(r['tuned_reply'])}"]
    return "\n".join(text) + "\n"


def _quote(text: str | None) -> str:
    return "(no reply)" if text is None else " ".join(text.split()) or "(empty)"


def _consultation_records(vignettes: Sequence[Mapping], tuned: Sequence[Mapping], base: Sequence[Mapping] | None,
                          system_prompt: str) -> list[dict]:
    """eval_predictions.jsonl's records of the consultation: one per (vignette, question), keyed as the endpoint
    journal keys them, so that --resume reads a finished report back."""
    records = []
    asks = {(a["index"], a["question"]): a for a in consultation.requests(vignettes, system_prompt, 1)}
    for i, row in enumerate(vignettes):
        for question in consultation.questions(row):
            if question not in tuned[i]:
                continue
            record = {"index": row["index"], "question": question,
                      "row_hash": row_hash(asks[(row["index"], question)]), "family": "consultation",
                      "id": row.get("id"), "case": row["case"], "triage": row["triage"],
                      "diagnosis": row["diagnosis"], "prediction": tuned[i][question]}
            read = "rank" if question == consultation.DIFFERENTIAL else f"{question}_level"
            record[read] = tuned[i].get(read)
            if base is not None and question in base[i]:
                record |= {"base_prediction": base[i][question], f"base_{read}": base[i].get(read)}
            if question == consultation.TRIAGE and "likelihood_level" in tuned[i]:
                record["likelihood_level"] = tuned[i]["likelihood_level"]
                if base is not None:
                    record["base_likelihood_level"] = base[i].get("likelihood_level")
            records.append(record)
    return records


def write_report(out_dir: str | Path, header: dict, rows: Sequence[Mapping], replies: Sequence[str], results: dict,
                 base: dict | None = None, base_replies: Sequence[str] | None = None,
                 vignettes: Sequence[Mapping] = (), tuned_read: Sequence[Mapping] = (),
                 base_read: Sequence[Mapping] | None = None, comparison: Mapping | None = None) -> list[dict]:
    """eval.json, eval.md and eval_predictions.jsonl in out_dir; returns the table rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = table_rows(results, base)
    report = {**header, **results}
    if base is not None:
        # the base's name (a model path, or the served model behind an endpoint) stays beside its results
        name = header.get("baseline") or header.get("baseline_served_model")
        report["baseline"] = {"model": name, **{k: base[k] for k in ("families", "sources", "overall")}}
    if comparison is not None:
        report["consultation_regressions"] = comparison["regressions"]
    (out / "eval.json").write_text(json.dumps({**report, "table": table}, indent=2))
    text = markdown(table, header)
    if vignettes:
        text += _consultation_markdown(results, base, comparison and comparison["regressions"])
    (out / "eval.md").write_text(text)
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
        for record in _consultation_records(vignettes, tuned_read, base_read, header.get("system_prompt", "")):
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

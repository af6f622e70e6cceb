"""Label tasks: relation extraction (i2b2-2010, GAD), MedNLI, and Hallmarks of Cancer multi-label classification.

A reply is read for the label it names first (the whole reply, or a sentence around the label, both work); a reply
that names none is wrong, never skipped. Macro averages run over the classes that occur in the gold or the
predicted labels of the rows scored, so a small sample that lacks a class is not pulled down by it.
"""

from __future__ import annotations

import re
from typing import Sequence

from medtune.eval.scorers.text import f1, mean
from medtune.data.sources import I2B2_RELATIONS

Scores = dict[str, float]

# The two negative relation labels; the i2b2-2010 codes are case-sensitive ("PIP" is a label, "pip" is not).
NO_RELATION, GAD_POSITIVE, GAD_NEGATIVE = "No Relations", "Positive", "Negative"
NEGATIVES = frozenset({NO_RELATION, GAD_NEGATIVE})
_RELATION = re.compile(r"\b(?:" + "|".join(I2B2_RELATIONS) + r")\b|(?i:\bno relations?\b|\bpositive\b|\bnegative\b)")
NLI_LABELS = ("Entailment", "Contradiction", "Neutral")
_NLI = re.compile(r"(?i)\b(" + "|".join(NLI_LABELS) + r")\b")

# Hallmarks of Cancer as the dataset writes them (name with abbreviation), and the names HoC itself uses.
HALLMARKS = {
    "PS": ("Sustaining proliferative signaling", "sustaining proliferative signaling"),
    "GS": ("Evading growth suppressors", "evading growth suppressors"),
    "CD": ("Resisting cell death", "resisting cell death"),
    "RI": ("Enabling replicative immortality", "enabling replicative immortality"),
    "A": ("Inducing angiogenesis", "inducing angiogenesis"),
    "IM": ("Activating invasion & metastasis", "activating invasion and metastasis"),
    "GI": ("Genome instability & mutation", "genomic instability and mutation"),
    "TPI": ("Tumor-promoting inflammation", "tumor promoting inflammation"),
    "CE": ("Deregulating cellular energetics", "cellular energetics"),
    "ID": ("Avoiding immune destruction", "avoiding immune destruction"),
}


def read_relation(reply: str) -> str | None:
    """The relation label a reply names first, in the dataset's spelling, or None."""
    match = _RELATION.search(reply or "")
    if match is None:
        return None
    word = match.group(0)
    lowered = word.lower()
    if lowered.startswith("no relation"):
        return NO_RELATION
    return {"positive": GAD_POSITIVE, "negative": GAD_NEGATIVE}.get(lowered, word)


def _prf(tp: int, fp: int, fn: int, prefix: str) -> Scores:
    return {f"{prefix}precision": tp / (tp + fp) if tp + fp else 0.0,
            f"{prefix}recall": tp / (tp + fn) if tp + fn else 0.0,
            f"{prefix}f1": f1(tp, fp, fn)}


def score_relations(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """Micro P/R/F1 over the positive relation classes and accuracy over all. `No Relations` and `Negative` are
    never true positives; a wrong positive label is a false positive and a false negative."""
    gold = [read_relation(g) for g in golds]
    pred = [read_relation(p) for p in preds]
    tp = sum(g == p and g not in NEGATIVES for g, p in zip(gold, pred))
    fp = sum(p is not None and p not in NEGATIVES and p != g for g, p in zip(gold, pred))
    fn = sum(g not in NEGATIVES and p != g for g, p in zip(gold, pred))
    return {**_prf(tp, fp, fn, "micro_"), "accuracy": mean(g == p for g, p in zip(gold, pred))}


def macro_f1(gold_sets: Sequence[set], pred_sets: Sequence[set]) -> float:
    labels = set().union(*gold_sets, *pred_sets)
    return mean(f1(sum(lab in g and lab in p for g, p in zip(gold_sets, pred_sets)),
                   sum(lab not in g and lab in p for g, p in zip(gold_sets, pred_sets)),
                   sum(lab in g and lab not in p for g, p in zip(gold_sets, pred_sets)))
                for lab in labels)


def read_nli(reply: str) -> str | None:
    match = _NLI.search(reply or "")
    return match.group(1).capitalize() if match else None


def score_nli(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """Accuracy (the paper's MedNLI metric) and macro-F1 over the three labels."""
    gold, pred = [read_nli(g) for g in golds], [read_nli(p) for p in preds]
    return {"accuracy": mean(g == p for g, p in zip(gold, pred)),
            "macro_f1": macro_f1([{g} for g in gold], [{p} - {None} for p in pred])}


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[-&]", lambda m: " " if m.group(0) == "-" else " and ", text.lower()).split())


_BY_NAME = {_normal(name): abbr for abbr, names in HALLMARKS.items() for name in names}
_ABBR = re.compile(r"\(([A-Z]{1,3})\)")


def read_hallmarks(reply: str) -> tuple[set[str], bool]:
    """(hallmark abbreviations named, whether every comma/semicolon/line item was readable). An item is read by
    its "(XX)" abbreviation, as a bare abbreviation, or by name (either spelling, `&` or "and", with or without
    hyphens); "None" is the empty set."""
    found, readable = set(), True
    for item in re.split(r"[,;\n]", reply or ""):
        item = item.strip().strip(".")
        if not item or item.lower() == "none":
            continue
        abbr = next((a for a in _ABBR.findall(item) if a in HALLMARKS), None)
        abbr = abbr or (item if item in HALLMARKS else None) or _BY_NAME.get(_normal(item))
        if abbr is None:
            abbr = next((a for name, a in _BY_NAME.items() if name in _normal(item)), None)
        found |= {abbr} if abbr else set()
        readable &= abbr is not None
    return found, readable


def score_hallmarks(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """Micro P/R/F1 over (row, hallmark) pairs, macro-F1 over hallmarks, exact-set accuracy. Label order does not
    matter; an unreadable item breaks the exact set but adds no class."""
    gold = [read_hallmarks(g)[0] for g in golds]
    pred_read = [read_hallmarks(p) for p in preds]
    pred = [p for p, _ in pred_read]
    tp = sum(len(g & p) for g, p in zip(gold, pred))
    fp = sum(len(p - g) for g, p in zip(gold, pred))
    fn = sum(len(g - p) for g, p in zip(gold, pred))
    return {**_prf(tp, fp, fn, "micro_"), "macro_f1": macro_f1(gold, pred),
            "exact_set_accuracy": mean(g == p and ok for g, (p, ok) in zip(gold, pred_read))}

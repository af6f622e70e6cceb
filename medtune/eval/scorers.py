"""Per-family scorers: each takes parallel lists of gold and predicted reply texts and returns {metric: value}.

Rates are in [0, 1]. Text is compared after `normalize` (lower case, single spaces, no surrounding punctuation),
so case, spacing and a trailing full stop never decide a score. Malformed predictions (empty, garbage) simply
score as wrong: they are never skipped.

ROUGE-L and token F1 are written here rather than taken from `rouge-score`: that package (and its nltk, absl
and numpy dependencies) would be used for one 20-line longest-common-subsequence. Tokens follow rouge-score's
default tokenizer (lower-cased runs of [a-z0-9]; no stemming), so the numbers match
`RougeScorer(["rougeL"]).score(gold, pred)["rougeL"].fmeasure`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable, Sequence

Scores = dict[str, float]
NEGATIVE_RELATIONS = frozenset({"none", "no", "false", "no relation"})
# Positive labels of the MedTuned RE sets (i2b2 2010 relations, GAD "yes"), plus whatever the gold replies use.
KNOWN_RELATIONS = frozenset({"trip", "trwp", "trcp", "trap", "trnap", "terp", "tecp", "pip", "yes"})
NLI_LABELS = ("entailment", "contradiction", "neutral")
YES_NO_MAYBE = ("yes", "no", "maybe")
_EMPTY_SET = frozenset({"", "none", "n/a", "no entities", "no entity"})
_PUNCT = " \t\n.,;:!?\"'`()[]{}*-•"


def normalize(text: str) -> str:
    return " ".join((text or "").split()).strip(_PUNCT).lower()


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", (text or "").lower())


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _prf(tp: int, fp: int, fn: int) -> Scores:
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": _f1(tp, fp, fn),
    }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# -- free text -----------------------------------------------------------------------------------------------

def rouge_l(gold: str, pred: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens)."""
    g, p = tokens(gold), tokens(pred)
    if not g or not p:
        return 0.0
    row = [0] * (len(p) + 1)  # one row of the LCS table at a time
    for gt in g:
        prev_diag = 0
        for j, pt in enumerate(p, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if gt == pt else max(row[j], row[j - 1])
    lcs = row[-1]
    return _f1(lcs, len(p) - lcs, len(g) - lcs)


def token_f1(gold: str, pred: str) -> float:
    """SQuAD-style bag-of-tokens F1."""
    g, p = tokens(gold), tokens(pred)
    if not g and not p:
        return 1.0
    overlap = sum((Counter(g) & Counter(p)).values())
    return _f1(overlap, len(p) - overlap, len(g) - overlap)


def answer_words(pred: str) -> int:
    return len((pred or "").split())


def score_free_text(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """Dialogue and "other": mean ROUGE-L F, token F1 and mean answer length in words."""
    return {
        "rougeL_f": _mean(map(rouge_l, golds, preds)),
        "token_f1": _mean(map(token_f1, golds, preds)),
        "answer_words": _mean(map(answer_words, preds)),
    }


# -- labels --------------------------------------------------------------------------------------------------

def extract_label(pred: str, labels: Iterable[str]) -> str:
    """The label a free-form prediction names: the whole reply if it is a label, else the label whose first
    whole-word occurrence comes earliest ("The relation is TrIP." -> "trip"), else the normalised reply."""
    text = normalize(pred)
    labels = sorted({normalize(label) for label in labels}, key=len, reverse=True)  # longest first on ties
    if text in labels:
        return text
    hits = [(m.start(), label) for label in labels if (m := re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text))]
    return min(hits, key=lambda h: h[0])[1] if hits else text


def score_relations(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """RE: micro P/R/F1 over positive relation labels and accuracy over all labels. A negative (none/no/false)
    is never a true positive; a wrong positive label is a false positive and a false negative; an unreadable
    reply is a false negative on a positive gold and no false positive."""
    def canonical(label: str) -> str:  # "no" (GAD) and "none" (i2b2) are the same negative class
        return "none" if label in NEGATIVE_RELATIONS else label

    gold = [canonical(normalize(g)) for g in golds]
    positive = (set(gold) | KNOWN_RELATIONS) - {"none"}
    pred = [canonical(extract_label(p, positive | NEGATIVE_RELATIONS)) for p in preds]
    tp = sum(g == p != "none" for g, p in zip(gold, pred))
    fp = sum(p in positive and p != g for g, p in zip(gold, pred))
    fn = sum(g != "none" and p != g for g, p in zip(gold, pred))
    micro = _prf(tp, fp, fn)
    return {"micro_precision": micro["precision"], "micro_recall": micro["recall"], "micro_f1": micro["f1"],
            "accuracy": _mean(g == p for g, p in zip(gold, pred))}


def _macro_f1(gold_sets: Sequence[set], pred_sets: Sequence[set], labels: Iterable[str]) -> float:
    per_label = [
        _f1(sum(lab in g and lab in p for g, p in zip(gold_sets, pred_sets)),
            sum(lab not in g and lab in p for g, p in zip(gold_sets, pred_sets)),
            sum(lab in g and lab not in p for g, p in zip(gold_sets, pred_sets)))
        for lab in labels
    ]
    return _mean(per_label)


def score_nli(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """NLI: accuracy and macro-F1 over entailment / contradiction / neutral (an unreadable prediction is
    wrong for its gold class, not a fourth class)."""
    gold = [normalize(g) for g in golds]
    pred = [extract_label(p, NLI_LABELS) for p in preds]
    return {"accuracy": _mean(g == p for g, p in zip(gold, pred)),
            "macro_f1": _macro_f1([{g} for g in gold], [{p} for p in pred], NLI_LABELS)}


def parse_label_set(text: str) -> set[str]:
    """Comma/semicolon/newline separated labels; "None" (or nothing) is the empty set."""
    items = {normalize(item) for item in re.split(r"[,;\n]", text or "")}
    return items - _EMPTY_SET


def score_classification(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """Multi-label classification: exact-set accuracy and macro-F1 over the labels seen in the gold replies.
    A predicted item that contains gold-set labels counts as those labels; any other item still breaks the
    exact set, but adds no class of its own."""
    gold = [parse_label_set(g) for g in golds]
    labels = sorted(set().union(*gold)) if gold else []

    def read(pred: str) -> set[str]:  # a wordy item ("It is about resisting cell death") counts as its labels
        found = set()
        for item in parse_label_set(pred):
            named = {lab for lab in labels if re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", item)}
            found |= named or {item}
        return found

    pred = [read(p) for p in preds]
    return {"exact_set_accuracy": _mean(g == p for g, p in zip(gold, pred)),
            "macro_f1": _macro_f1(gold, pred, labels)}


# -- entities ------------------------------------------------------------------------------------------------

def parse_entities(text: str) -> set[tuple[str, str]]:
    """`TYPE: entity text` lines -> {(type, text)}, normalised; list markers are ignored, lines that are
    not `TYPE: text` and "None" contribute nothing."""
    entities = set()
    for line in (text or "").splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line)
        etype, sep, etext = line.partition(":")
        etype, etext = normalize(etype), normalize(etext)
        if sep and etype and etext and etext not in _EMPTY_SET:
            entities.add((etype, etext))
    return entities


def score_ner(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """NER: micro P/R/F1 over (type, text) pairs, each reply's pairs taken as a set."""
    tp = fp = fn = 0
    for g, p in zip(golds, preds):
        gold, pred = parse_entities(g), parse_entities(p)
        tp, fp, fn = tp + len(gold & pred), fp + len(pred - gold), fn + len(gold - pred)
    return {f"entity_{k}": v for k, v in _prf(tp, fp, fn).items()}


# -- question answering --------------------------------------------------------------------------------------

def yes_no_maybe(text: str) -> str | None:
    """"yes"/"no"/"maybe" when a reply starts with one (PubMedQA style: "yes. Because ..."), else None."""
    words = tokens(text)
    return words[0] if words and words[0] in YES_NO_MAYBE else None


def score_qa(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """QA: yes/no/maybe accuracy on rows whose gold starts with one of those words (the prediction's first
    yes/no/maybe word counts), ROUGE-L F and token F1 on the other rows, mean answer length on all rows.
    A metric whose rows are absent is left out (with its count, `n_yes_no_maybe` / `n_free_text`, at 0)."""
    closed = [(g, p) for g, p in zip(golds, preds) if yes_no_maybe(g)]
    free = [(g, p) for g, p in zip(golds, preds) if not yes_no_maybe(g)]
    scores: Scores = {"n_yes_no_maybe": len(closed), "n_free_text": len(free)}
    if closed:
        scores["yes_no_maybe_accuracy"] = _mean(
            yes_no_maybe(g) == extract_label(p, YES_NO_MAYBE) for g, p in closed)
    if free:
        scores["rougeL_f"] = _mean(rouge_l(g, p) for g, p in free)
        scores["token_f1"] = _mean(token_f1(g, p) for g, p in free)
    scores["answer_words"] = _mean(map(answer_words, preds))
    return scores


SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], Scores]] = {
    "ner": score_ner,
    "re": score_relations,
    "nli": score_nli,
    "classification": score_classification,
    "qa": score_qa,
    "dialogue": score_free_text,
    "other": score_free_text,
}

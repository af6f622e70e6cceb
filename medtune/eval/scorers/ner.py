"""NER: entity-level micro precision / recall / F1 from `token : TAG` replies, with seqeval in strict IOB2 mode.

A MedTuned NER reply has one `token : TAG` line per input token (bare B / I / O for the five biomedical corpora,
typed B-PROBLEM, I-TREATMENT, ... for i2b2-2012). The predicted reply is read line by line against the gold one,
by position: the prediction's line i counts for gold token i only when it names that token (compared after HTML
unescaping, so `'` matches the i2b2 token `&apos;`). A line that names another token, or is missing, is wrong:
its entity tag becomes an entity of a type no gold entity has (a false positive), and the gold entity there is
missed. Lines beyond the gold's are wrong predictions too: they are scored against O, their entity tags as
entities of that type (false positives), so a model that loops, repeating the gold 10 times, scores F1 2/11, not
1.0. Both kinds of line are counted. Nothing is skipped, so a reply that tags every token O scores F1 0 against
a gold with entities.

Strict mode (seqeval's `mode="strict", scheme=IOB2`) counts an entity only when its B... I... tags are well
formed and its span and type match exactly, as CoNLL's conlleval and the field's NER papers do. The dataset
authors scored their own replies with seqeval's default (lenient) mode; strict differs only on malformed tag
sequences, e.g. an entity that starts with I.
"""

from __future__ import annotations

import html
import re
from typing import Sequence

Scores = dict[str, float]
_TAG = re.compile(r"O|[BI](?:-[A-Z_]+)?")
WRONG_TYPE = "MISALIGNED"


def parse(reply: str) -> list[tuple[str | None, str]]:
    """(token, TAG) per line; a line without " : " is (None, "O"); a tag that is not IOB2 reads as O."""
    lines = []
    for line in (reply or "").strip().split("\n"):
        token, sep, tag = line.rpartition(" : ")
        tag = tag.strip().upper()
        lines.append((token.strip(), tag if _TAG.fullmatch(tag) else "O") if sep else (None, "O"))
    return lines


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and html.unescape(a) == html.unescape(b)


def _wrong(tag: str) -> str:
    return "O" if tag == "O" else f"{tag[0]}-{WRONG_TYPE}"


def align(gold: str, pred: str) -> tuple[list[str], list[str], int, int]:
    """(gold tags, then O for each extra line; predicted tags by position; misaligned or missing lines; extra
    predicted lines)."""
    gold_lines, pred_lines = parse(gold), parse(pred)
    gold_tags, pred_tags, misaligned = [], [], 0
    for i, (token, tag) in enumerate(gold_lines):
        gold_tags.append(tag)
        p_token, p_tag = pred_lines[i] if i < len(pred_lines) else (None, "O")
        if _same(p_token, token):
            pred_tags.append(p_tag)
        else:
            misaligned += 1
            pred_tags.append(_wrong(p_tag))
    extra = pred_lines[len(gold_lines):]
    return gold_tags + ["O"] * len(extra), pred_tags + [_wrong(tag) for _, tag in extra], misaligned, len(extra)


def score_ner(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    aligned = [align(g, p) for g, p in zip(golds, preds)]
    y_true, y_pred = [a[0] for a in aligned], [a[1] for a in aligned]
    opts = dict(mode="strict", scheme=IOB2, average="micro", zero_division=0)
    return {
        "entity_precision": float(precision_score(y_true, y_pred, **opts)),
        "entity_recall": float(recall_score(y_true, y_pred, **opts)),
        "entity_f1": float(f1_score(y_true, y_pred, **opts)),
        "n_misaligned_lines": sum(a[2] for a in aligned),
        "n_extra_lines": sum(a[3] for a in aligned),
    }

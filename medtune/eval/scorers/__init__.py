"""Per-family scorers: each takes parallel lists of gold and predicted replies and returns {metric: value}.

Rates are in [0, 1]; `n_...` entries count the rows (or lines) a metric was computed on. Malformed predictions
(empty, garbage, another format) score as wrong: they are never skipped. Each family names its headline metric
(`primary`): the paper's metric where it gives one (docs/EVAL.md).
"""

from __future__ import annotations

from typing import Callable, Sequence

from medtune.eval.scorers.labels import score_hallmarks, score_nli, score_relations
from medtune.eval.scorers.ner import score_ner
from medtune.eval.scorers.qa import score_qa
from medtune.eval.scorers.text import score_free_text

Scores = dict[str, float]
SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], Scores]] = {
    "ner": score_ner,
    "re": score_relations,
    "nli": score_nli,
    "classification": score_hallmarks,
    "qa": score_qa,
    "dialogue": score_free_text,
    "other": score_free_text,
}
PRIMARY = {"ner": "entity_f1", "re": "micro_f1", "nli": "accuracy", "classification": "micro_f1",
           "qa": "answer_accuracy", "dialogue": "rougeL_f", "other": "rougeL_f"}


def score(family: str, golds: Sequence[str], preds: Sequence[str]) -> dict:
    """{"n", "primary", metric: value, ...} for one family's rows. QA rows without a closed answer (no MedMCQA or
    PubMedQA row) fall back to ROUGE-L as their headline."""
    scores = SCORERS[family](golds, preds)
    primary = PRIMARY[family] if PRIMARY[family] in scores else "rougeL_f"
    return {"n": len(golds), "primary": primary, **scores}

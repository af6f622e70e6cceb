"""The consultation measured while a model trains: with a vignette file in the recipe (`consultation_eval_dataset`),
at each evaluation the model's triage safety, accuracy and emergency recall on those vignettes are logged with the
eval loss (`eval_consultation_<question>_<metric>`, to W&B too), so that a run that learns its data while losing the
consultation shows it as it happens (docs/EVAL.md "Consultation").

Every rank generates (the same inputs): under ZeRO-3 each forward pass needs the shards of all ranks.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from medtune.chat_format import DEFAULT_SYSTEM_PROMPT
from medtune.data.select import load_rows
from medtune.eval import consultation
from medtune.eval.scorers.consultation import Matcher

logger = logging.getLogger(__name__)
LOGGED = ("triage_accuracy", "safety", "emergency_recall", "under_triaged_emergencies", "over_triage", "unparsed")


def load_vignettes(path: str) -> list[dict]:
    """The vignettes of a recipe's consultation_eval_dataset; a file without any stops the run before the model
    loads."""
    rows = [row for row in load_rows(path)[0] if consultation.is_vignette(row)]
    if not [row for row in rows if row["triage"]]:
        raise ValueError(f"consultation_eval_dataset {path}: no vignette with a triage level in it (a vignette has "
                         "case/diagnosis/triage, or case_description/correct_diagnosis/urgency_level; docs/EVAL.md)")
    return rows


def flat_scores(scores: dict) -> dict[str, float]:
    """eval_consultation_<question>_<metric> of consultation.score's triage questions, ready for `trainer.log`."""
    return {f"eval_consultation_{q}_{m}": float(metrics[m]) for q, metrics in scores["questions"].items()
            for m in LOGGED if m in metrics}


class ConsultationEval(TrainerCallback):
    """Scores the consult, forced-choice and likelihood triage of the model at each evaluation. `trainer` is set
    once the Trainer exists (its `log` sends the scores to every logger, W&B included)."""

    def __init__(self, fmt, vignettes: list[dict], max_new_tokens: int, batch_size: int):
        self.fmt, self.vignettes, self.max_new_tokens, self.batch_size = fmt, vignettes, max_new_tokens, batch_size
        self.matcher = Matcher()
        self.trainer = None

    def scores(self, model) -> dict:
        from medtune.eval.generate import consultation_replies

        asked = [{**row, "diagnosis": []} for row in self.vignettes]  # triage only: no differential while training
        replies, likelihood = consultation_replies(model, self.fmt, asked, DEFAULT_SYSTEM_PROMPT,
                                                   self.max_new_tokens, self.batch_size)
        return consultation.score(asked, consultation.read(asked, replies, self.matcher, likelihood))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        flat = flat_scores(self.scores(model))
        logger.info("consultation at step %d: safety %.3f, triage accuracy %.3f, emergency recall %.3f (consult)",
                    state.global_step, flat.get("eval_consultation_consult_safety", float("nan")),
                    flat.get("eval_consultation_consult_triage_accuracy", float("nan")),
                    flat.get("eval_consultation_consult_emergency_recall", float("nan")))
        self.trainer.log(flat)

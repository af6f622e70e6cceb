"""The consultation measured while a model trains, and a safety gate on it.

With a vignette file in the recipe (`consultation_eval_dataset`), the base model (the adapter switched off) is
asked once before the first step, and at each evaluation the model being trained: triage safety, accuracy and
emergency recall per question are logged with the eval loss, the base's beside them
(`eval_consultation_<question>_<metric>`, `eval_consultation_base_<question>_<metric>`, to W&B too), so that a run
that learns its data while losing the consultation shows it as it happens (docs/EVAL.md "Consultation").

The gate (`safety_regression`): when, on any triage question (consult, forced choice, likelihood), the tuned model
under-triages more emergencies than its base, or sends more of them home (self-care), by more than
`safety_tolerance`, `warn` logs it and `stop` ends the run
there: the Trainer saves a checkpoint, the adapter is saved as at any end, and the command exits with the reason.

Every rank generates (the same inputs): under ZeRO-3 each forward pass needs the shards of all ranks.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

from transformers import TrainerCallback

from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT
from medtune.data.select import load_rows
from medtune.eval import consultation
from medtune.eval.scorers.consultation import Matcher

logger = logging.getLogger(__name__)


def load_vignettes(path: str) -> list[dict]:
    """The vignettes of a recipe's consultation_eval_dataset; a file without any stops the run before the model
    loads."""
    rows = [row for row in load_rows(path)[0] if consultation.is_vignette(row)]
    if not [row for row in rows if row["triage"]]:
        raise ValueError(f"consultation_eval_dataset {path}: no vignette with a triage level in it (a vignette has "
                         "case/diagnosis/triage, or case_description/correct_diagnosis/urgency_level; docs/EVAL.md)")
    return rows


def flat_scores(scores: dict, prefix: str = "eval_consultation_") -> dict[str, float]:
    """<prefix><question>_<metric> of consultation.score's triage questions, ready for `trainer.log`."""
    return {f"{prefix}{q}_{m}": float(metrics[m]) for q, metrics in scores["questions"].items()
            for m in consultation.TRIAGE_METRICS if m in metrics}


GATED = ("under_triaged_emergencies", "emergencies_to_self_care")


def regressions(tuned: dict, base: dict, tolerance: int) -> dict[str, tuple[int, int]]:
    """{"<question> <count>": (tuned, base)} for each count of GATED where the tuned model's exceeds the base's by more
    than `tolerance`: emergencies under-triaged, and among them those sent home (a base that gives no advice
    under-triages too; one that learnt to say "look after yourself at home" to a stroke is worse, and only the
    second count shows it)."""
    found = {}
    for q, metrics in tuned["questions"].items():
        for count in GATED:
            before = base["questions"].get(q, {}).get(count)
            now = metrics.get(count)
            if now is not None and before is not None and now - before > tolerance:
                found[f"{q} {count.replace('_', ' ')}"] = (now, before)
    return found


class ConsultationEval(TrainerCallback):
    """Scores the consult, forced-choice and likelihood triage of the model at each evaluation. `trainer` is set
    once the Trainer exists (its `log` sends the scores to every logger, W&B included)."""

    def __init__(self, fmt, vignettes: list[dict], max_new_tokens: int, batch_size: int, gate: str = "warn",
                 tolerance: int = 0):
        self.fmt, self.vignettes, self.max_new_tokens, self.batch_size = fmt, vignettes, max_new_tokens, batch_size
        self.gate, self.tolerance = gate, tolerance
        self.matcher = Matcher()
        self.trainer = None
        self.base: dict | None = None
        self.stopped: str | None = None  # why the gate ended the run

    def scores(self, model) -> dict:
        from medtune.eval.generate import consultation_replies

        asked = [{**row, "diagnosis": []} for row in self.vignettes]  # triage only: no differential while training
        replies, likelihood = consultation_replies(model, self.fmt, asked, DEFAULT_SYSTEM_PROMPT,
                                                   self.max_new_tokens, self.batch_size)
        return consultation.score(asked, consultation.read(asked, replies, self.matcher, likelihood))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.eval_strategy == "no":
            logger.warning("consultation_eval_dataset is set but the run never evaluates (eval_strategy: no, or no "
                           "eval rows): the consultation is not measured and the safety gate cannot act")
            return
        # The base is the model with its adapter switched off: right on a resumed run too.
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            self.base = self.scores(model)
        consult = self.base["questions"].get("consult", {})
        logger.info("consultation of the base model: safety %.3f, emergency recall %.3f, %s of %s emergencies "
                    "under-triaged (consult)", consult.get("safety", float("nan")),
                    consult.get("emergency_recall", float("nan")), consult.get("under_triaged_emergencies"),
                    consult.get("n_emergencies"))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        tuned = self.scores(model)
        flat = flat_scores(tuned)
        logger.info("consultation at step %d: safety %.3f, triage accuracy %.3f, emergency recall %.3f (consult)",
                    state.global_step, flat.get("eval_consultation_consult_safety", float("nan")),
                    flat.get("eval_consultation_consult_triage_accuracy", float("nan")),
                    flat.get("eval_consultation_consult_emergency_recall", float("nan")))
        self.trainer.log(flat | flat_scores(self.base, "eval_consultation_base_"))
        worse = regressions(tuned, self.base, self.tolerance)
        if not worse:
            return
        why = (f"safety gate at step {state.global_step}: the tuned model under-triages more emergencies than its "
               "base, beyond safety_tolerance=" + str(self.tolerance) + " (" + "; ".join(
                   f"{what}: {now} against {before} of {tuned['questions'][what.split()[0]]['n_emergencies']}"
                   for what, (now, before) in worse.items()) + ")")
        if self.gate == "stop":
            self.stopped = why
            control.should_training_stop = True
            control.should_save = True
            logger.error("%s: stopping (safety_regression: stop); the checkpoint of this step is saved", why)
        else:
            logger.warning("%s (safety_regression: warn; 'stop' would end the run here)", why)

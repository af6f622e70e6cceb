"""Patient vignettes: a case in free text with its correct diagnosis (and acceptable alternatives) and/or triage level.

Three layouts are read, detected per record (docs/EVAL.md "Consultation"):
- `case_description`, `correct_diagnosis`, `urgency_level` (`em` / `ne` / `sc`): the three-level layout of the
  public symptom-checker vignette sets; the diagnosis may name alternatives, "Asthma (or acute asthma, status
  asthmaticus)".
- `correct_diagnosis`, `demographics`, `chief_complaints`, `presentation`, `absent_findings`, `physical_history`,
  `family_history`, `social_history`: a structured case with a diagnosis only; the case is those fields written out.
- medtune's own (data/vignettes/): `case`, `diagnosis` (a string or a list of acceptable names), `triage`
  (`emergency` | `urgent` | `routine` | `self-care`, or the three-level codes).

Triage is scored on three levels, the codes of the public sets: emergency (em), see a doctor (ne), self-care (sc).
medtune's four map onto them as urgent -> see a doctor and routine -> see a doctor; the row keeps the level as
written (`triage_label`). A level that is none of the accepted spellings stops the read with the row named: a
misspelt label must not silently turn a case into another level.

A kept row also gets the training conversation (medtune-serve's system prompt, the case as the user's turn, and a
reply from `reply()`), so that a vignette file trains like any other row format, rendered as the page asks.
"""

from __future__ import annotations

import re
from typing import Mapping

from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT

EMERGENCY, DOCTOR, SELF_CARE = "emergency", "see a doctor", "self-care"
LEVELS = (SELF_CARE, DOCTOR, EMERGENCY)  # in order of urgency
CODES = {EMERGENCY: "em", DOCTOR: "ne", SELF_CARE: "sc"}
SPELLINGS = {"em": EMERGENCY, "emergency": EMERGENCY, "ne": DOCTOR, "urgent": DOCTOR, "routine": DOCTOR,
             "see a doctor": DOCTOR, "non-emergency": DOCTOR, "sc": SELF_CARE, "self-care": SELF_CARE,
             "self care": SELF_CARE}
STRUCTURED = ("demographics", "chief_complaints", "presentation", "absent_findings", "physical_history",
              "family_history", "social_history")
_ALTERNATIVES = re.compile(r"^(.*?)\s*\((?:or|also|aka|i\.e\.)\s+(.*)\)\s*$", re.IGNORECASE)

# The reply a training row teaches for each level (medtune's four levels, and the three codes), after the NHS
# guidance the levels follow (data/vignettes/README.md). The advice comes first, where a model decides it from the
# case, and in the order a triage decides: whether professional help is needed ("You need ..." for every level but
# self-care), then how urgently (emergency, today, a doctor, the next few days). Measured in docs/EVAL.md "Mixtures
# measured": with the diagnosis first, or with each level opening differently, SmolLM2-135M's runs each settled on
# one level for nearly every case, some on self-care.
ADVICE = {
    "emergency": "You need emergency help now: call an ambulance (999 in the UK, 911 in the US, 112 in the EU) or go "
                 "to the emergency department. Do not drive yourself.",
    "urgent": "You need medical help today: contact your GP surgery for an urgent appointment, or call 111 or an "
              "urgent care service. Call an ambulance if it gets much worse.",
    "routine": "You need to see your GP in the next few days: book an appointment. Get help sooner if it gets worse.",
    "see a doctor": "You need to see a doctor: contact your GP surgery, or call 111 if you cannot wait. Call an "
                    "ambulance if it gets much worse.",
    "self-care": "This can usually be looked after at home: rest, drink fluids, and ask a pharmacist about "
                 "medicines that can help. See a doctor if it does not get better or gets worse.",
}


class VignetteError(ValueError):
    """A vignette file that cannot be read as written (an unknown triage level)."""


def is_vignette(record: object) -> bool:
    return isinstance(record, dict) and ("case_description" in record or "case" in record or (
        "correct_diagnosis" in record and "chief_complaints" in record))


def diagnosis_names(value: object) -> list[str] | None:
    """The acceptable names of a diagnosis cell: a list of names, or a string that may add alternatives in
    brackets ("Asthma (or acute asthma, status asthmaticus)"). None when the cell is not text."""
    if isinstance(value, list):
        return [v.strip() for v in value if isinstance(v, str) and v.strip()] if all(
            isinstance(v, str) for v in value) else None
    if not isinstance(value, str):
        return None
    match = _ALTERNATIVES.match(value.strip())
    if match is None:
        return [value.strip()] if value.strip() else []
    head, rest = match.groups()
    return [head.strip(), *(n.strip() for n in re.split(r",|;|\bor\b", rest) if n.strip())]


def triage_level(label: str, where: str) -> str:
    level = SPELLINGS.get(" ".join(label.lower().replace("_", " ").split()))
    if level is None:
        raise VignetteError(f"{where}: unknown triage level {label!r}; accepted: emergency, urgent, routine, "
                            "self-care (medtune's four), or em, ne, sc (three-level codes)")
    return level


def _structured_case(raw: dict) -> str:
    parts = []
    for key in STRUCTURED:
        value = raw.get(key)
        if isinstance(value, list):
            value = "; ".join(str(v) for v in value if v)
        if isinstance(value, str) and value.strip():
            parts.append(f"{key.replace('_', ' ').capitalize()}: {value.strip()}")
    return "\n".join(parts)


def reply(diagnoses: list[str], triage_label: str | None) -> str:
    """The training reply of a vignette: what to do at its level, then the likely diagnosis."""
    parts = [ADVICE[triage_label]] if triage_label is not None else []
    if diagnoses:
        also = f" (it can also be called {', '.join(diagnoses[1:3])})" if len(diagnoses) > 1 else ""
        parts.append(f"From what you describe, the most likely cause is {diagnoses[0]}{also}. I am not a doctor, "
                     "and only an examination can confirm it.")
    return "\n\n".join(parts)


def clean(raw: dict, where: str) -> tuple[dict | None, str | None]:
    """(the vignette row, None) or (None, the reason it is skipped). An unknown triage level raises VignetteError."""
    if "case_description" in raw or "case" in raw:
        case = raw.get("case_description", raw.get("case"))
    else:
        case = _structured_case(raw)
    if not isinstance(case, str):
        return None, "non_string_case"
    if not case.strip():
        return None, "missing_case"
    names = diagnosis_names(raw.get("correct_diagnosis", raw.get("diagnosis")))
    if names is None:
        return None, "non_string_diagnosis"
    label = raw.get("urgency_level", raw.get("triage"))
    if label is not None and not isinstance(label, str):
        return None, "non_string_triage"
    label = label.strip() if label and label.strip() else None
    if not names and label is None:
        return None, "no_diagnosis_or_triage"
    level = triage_level(label, where) if label else None
    written = " ".join(label.lower().replace("_", " ").split()) if label else None
    advice_key = written if written in ADVICE else level
    row = {"case": case.strip(), "diagnosis": names, "triage": level, "triage_label": label,
           "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                        {"role": "user", "content": case.strip()},
                        {"role": "assistant", "content": reply(names, advice_key)}],
           "train_from": 0}
    if isinstance(raw.get("id"), (str, int)):
        row["id"] = str(raw["id"])
    return row, None


# The consultation metrics counted over the emergencies only; `metric_n` is what each one is computed on, for the
# evaluation's tables and the model card.
EMERGENCY_COUNTS = ("emergency_recall", "under_triaged_emergencies", "emergencies_to_self_care")


def metric_n(metrics: Mapping, metric: str) -> int:
    """How many cases one question's metric is computed on: the diagnoses for top-k, the emergencies for the
    emergency counts, else the cases with a level."""
    if metric.startswith("top"):
        return int(metrics["n_diagnosis"])
    return int(metrics["n_emergencies"] if metric in EMERGENCY_COUNTS else metrics["n_triage"])

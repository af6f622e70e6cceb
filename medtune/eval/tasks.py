"""Task family of a MedTuned row, detected from its instruction text.

Rules are tried in order; the first family with a matching keyword wins (matching is case-insensitive, on
word starts). Order matters because instructions share words:

| family         | keywords (any; `*` = any word ending)                                     | why this early |
|----------------|---------------------------------------------------------------------------|----------------|
| nli            | premise, hypothes*s, entail*, contradict*, natural language inference     | NLI asks to "classify the relationship" |
| re             | relation*, @WORD$ markers (@GENE$, @DISEASE$), i2b2 labels TrIP ... PIP (exact case) | RE prompts say "entities", "classify", "label" |
| ner            | named entit*, entity recognition, BIO, identify/extract/recognise/tag/label ... entit* (same sentence) | |
| classification | hallmark(s), classif*, categori*, label(s) (for/to) the/this/each document/text/abstract/sentence | |
| dialogue       | doctor*, patient's description/query/question/message, chat doctor, symptom(s) described | dialogue prompts may "answer the question" |
| qa             | question(s), answer*, PubMedQA, "yes, no, or maybe"                       | |

Anything else is "other": it is scored with the free-text metrics and reported, never dropped.
"""  # noqa: E501 - the table

from __future__ import annotations

import re

FAMILIES = ("ner", "re", "nli", "classification", "qa", "dialogue", "other")

_RULES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (family, re.compile("|".join(patterns), re.IGNORECASE))
    for family, patterns in (
        ("nli", [r"\bpremise", r"\bhypothes[ie]s", r"\bentail", r"\bcontradict", r"\bnatural language inference"]),
        ("re", [r"\brelation", r"@[a-z_]+\$", r"(?-i:\b(?:TrIP|TrWP|TrCP|TrAP|TrNAP|TeRP|TeCP|PIP)\b)"]),
        ("ner", [r"\bnamed[- ]entit", r"\bentity recognition", r"\bBIO\b",
                 r"\b(?:identify|extract|recogni[sz]e|tag|label)\b[^.]*\bentit"]),
        ("classification", [r"\bhallmarks?\b", r"\bclassif", r"\bcategori",
                            r"\blabels? (?:for |to )?(?:the|this|each) (?:document|text|abstract|sentence)"]),
        ("dialogue", [r"\bdoctor", r"\bpatient'?s (?:description|query|question|message)", r"\bchat ?doctor",
                      r"\bsymptoms? (?:described|they describe)"]),
        ("qa", [r"\bquestions?\b", r"\banswer", r"\bpubmed ?qa", r"\byes,? no,? or maybe\b"]),
    )
)


def detect_family(instruction: str) -> str:
    """One of FAMILIES for a row's instruction text (see the module docstring for the mapping)."""
    for family, pattern in _RULES:
        if pattern.search(instruction or ""):
            return family
    return "other"

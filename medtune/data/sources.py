"""Source corpus and task family of a MedTuned row.

nlpie/Llama2-MedTuned-Instructions' current revision names each row's corpus in a `source` column; the family
follows from it (SOURCE_FAMILY, see docs/DATA.md). A `source` value not listed there keeps its name and goes to
family "other", and the evaluation report lists it under `unknown_sources`.

Rows without the column (the dataset's first revision, a user's own files) are recognised from their text. The
authors write several rewordings of each task's instruction and pick one at random per row, so the rules look for
what every rewording must say, not for one wording; tests/data/medtuned_instructions.json holds every rewording
of their code, and each must land in its source's family. Tried in order, first match wins:

- pmc_llama (qa): PMC-LLaMA's `###Question:` / `###Options:` / `###Context:` / `###Answer:` markers in the input
  or the output;
- i2b2-2010 (re): the masks @problem$ / @test$ / @treatment$, or the relation codes TrIP ... PIP;
- GAD (re): the masks @GENE$ / @DISEASE$;
- the NER corpora (ner): "BIO" or "named entit..." in the instruction; the corpus by what it tags: i2b2-2012 names
  its typed labels (PROBLEM, TREATMENT, ...), BC5CDR-chem chemicals, then genes, then diseases;
- MedNLI (nli): entail... / contradict... / premise / hypothesis / natural language inference, or a
  `Sentence 1: ...\nSentence 2: ...` input;
- hoc (classification): "hallmark(s)";
- chatdoctor (dialogue): a user, patient or doctor, and medical or health matters;
- pmc_llama (qa): "question(s)", "answer...", "yes, no or maybe";
- other: anything else, scored with the free-text metrics and reported, never dropped.

The two gene corpora share one instruction list and the two disease corpora near-identical ones, so from text
alone their source is reported as "BC2GM|JNLPBA" and "NCBI-disease|BC5CDR-disease".
"""

from __future__ import annotations

import re
from typing import Mapping

FAMILIES = ("ner", "re", "nli", "classification", "qa", "dialogue", "other")
SOURCE_FAMILY = {
    "NCBI-disease": "ner", "BC5CDR-disease": "ner", "BC5CDR-chem": "ner", "BC2GM": "ner", "JNLPBA": "ner",
    "i2b2-2012": "ner", "i2b2-2010": "re", "GAD": "re", "MedNLI": "nli", "hoc": "classification",
    "chatdoctor": "dialogue", "pmc_llama": "qa",
}
GENE_NER, DISEASE_NER, OTHER_NER = "BC2GM|JNLPBA", "NCBI-disease|BC5CDR-disease", "ner (unknown corpus)"
OTHER = "other"
_CANONICAL = {name.lower(): name for name in SOURCE_FAMILY}


def _any(*patterns: str, flags: int = re.IGNORECASE) -> re.Pattern:
    return re.compile("|".join(patterns), flags)


_PMC_MARKERS = _any(r"###\s*(?:Question|Options|Context|Answer|Rationale)\s*:")
I2B2_RELATIONS = ("TrIP", "TrWP", "TrCP", "TrAP", "TrNAP", "TeRP", "TeCP", "PIP")  # i2b2-2010's relation codes
_I2B2_RE = re.compile(r"@(?:problem|test|treatment)\$|\b(?:" + "|".join(I2B2_RELATIONS) + r")\b")
_GAD = re.compile(r"@(?:GENE|DISEASE)\$")
_NER = _any(r"\bBIO\b", r"\bnamed[- ]entit", r"\bentity recognition")
_NER_CORPUS = (  # what the corpus tags; i2b2-2012's typed label names are upper case in its instructions
    ("i2b2-2012", re.compile(r"\b(?:PROBLEM|TREATMENT|TEST|OCCURRENCE|EVIDENTIAL|CLINICAL_DEPT)\b")),
    ("BC5CDR-chem", _any(r"\bchemical")),
    (GENE_NER, _any(r"\bgenes?\b", r"\bgene-", r"\bprotein")),
    (DISEASE_NER, _any(r"\bdisease")),
)
_NLI = _any(r"\bentail", r"\bcontradict", r"\bpremise", r"\bhypothes[ie]s", r"\bnatural language inference")
_NLI_INPUT = re.compile(r"^Sentence 1:.*\nSentence 2:", re.DOTALL)
_HOC = _any(r"\bhallmarks?\b")
_DIALOGUE = (  # both must match: someone asking, and medical help
    _any(r"\busers?\b", r"\bpatients?\b", r"\bpatient's\b", r"\bdoctor", r"\bphysician"),
    _any(r"\bmedical\b", r"\bhealth", r"\bdoctor", r"\bphysician", r"\bsymptom"),
)
_QA = _any(r"\bquestions?\b", r"\banswer", r"\byes,? no,? or maybe\b")


def _canonical(name: str) -> str:
    """The dataset's spelling of a known source name (matched without case), else the name as given."""
    return _CANONICAL.get(name.strip().lower(), name.strip())


def source_of(row: Mapping[str, str]) -> tuple[str, str]:
    """(source, family) of a row: from its `source` column when it has one, else from its text."""
    given = row.get("source")
    if isinstance(given, str) and given.strip():
        source = _canonical(given)
        return source, SOURCE_FAMILY.get(source, "other")
    return _from_text(row.get("instruction") or "", row.get("input") or "", row.get("output") or "")


def _from_text(instruction: str, input_text: str, output: str) -> tuple[str, str]:
    if _PMC_MARKERS.search(input_text) or _PMC_MARKERS.search(output):
        return "pmc_llama", "qa"
    if _I2B2_RE.search(instruction) or _I2B2_RE.search(input_text):
        return "i2b2-2010", "re"
    if _GAD.search(instruction) or _GAD.search(input_text):
        return "GAD", "re"
    if _NER.search(instruction):
        return next((name for name, pattern in _NER_CORPUS if pattern.search(instruction)), OTHER_NER), "ner"
    if _NLI.search(instruction) or _NLI_INPUT.match(input_text):
        return "MedNLI", "nli"
    if _HOC.search(instruction):
        return "hoc", "classification"
    if all(pattern.search(instruction) for pattern in _DIALOGUE):
        return "chatdoctor", "dialogue"
    if _QA.search(instruction):
        return "pmc_llama", "qa"
    return OTHER, "other"


def is_known(source: str) -> bool:
    """Whether a source name is one of the dataset's (or one medtune reports when the text cannot tell)."""
    return source in SOURCE_FAMILY or source in (GENE_NER, DISEASE_NER, OTHER_NER, OTHER)

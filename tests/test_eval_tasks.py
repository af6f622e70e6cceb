"""Task-family detection on the sample data's instructions and on hand-written variants of every family."""

import json
import re
from pathlib import Path

import pytest

from medtune.eval.tasks import FAMILIES, detect_family

SAMPLE_EVAL = Path(__file__).resolve().parents[1] / "data" / "sample" / "medtuned_sample_eval.jsonl"
NLI_LABELS = {"entailment", "contradiction", "neutral"}
RE_LABELS = {"TrIP", "TrWP", "TrCP", "TrAP", "TrNAP", "TeRP", "TeCP", "PIP", "none", "yes", "no"}
ENTITY_LINES = re.compile(r"(?:(?:Disease|Chemical|Gene|PROBLEM|TEST|TREATMENT): [^\n]+\n?)+")


def _family_from_output(output: str) -> str | None:
    """The family a sample row must be in, judged from its reply format alone (None: not decisive)."""
    output = output.strip()
    if output in NLI_LABELS:
        return "nli"
    if output in RE_LABELS:
        return "re"
    return "ner" if ENTITY_LINES.fullmatch(output) else None


def test_every_sample_instruction_is_detected():
    rows = [json.loads(line) for line in SAMPLE_EVAL.read_text().splitlines() if line.strip()]
    assert {detect_family(r["instruction"]) for r in rows} == set(FAMILIES) - {"other"}
    for row in rows:  # labels and entity lists land in the families whose scorers read them
        expected = _family_from_output(row["output"])
        if expected is not None:
            assert detect_family(row["instruction"]) == expected, row["instruction"]


@pytest.mark.parametrize("instruction,family", [
    # ner
    ("Your task is to identify and label any named entities present in the text. The named entity labels that "
     "you will be using are Disease. Output format: one entity per line as `TYPE: entity text`.", "ner"),
    ("In the provided text, recognise and tag gene-related entities using the BIO labeling scheme.", "ner"),
    ("Perform biomedical Named-Entity Recognition for chemicals.", "ner"),
    ("Extract all chemical entities mentioned in the abstract.", "ner"),
    # re
    ("In the clinical text, your objective is to identify the relationship between the two marked medical "
     "concepts (<problem>, <test>, <treatment>). Choose one label: TrIP, TrWP, TeRP, PIP or none.", "re"),
    ("Given a sentence in which a gene is replaced by @GENE$ and a disease by @DISEASE$, decide whether the "
     "sentence states an association. Answer yes or no.", "re"),
    ("Identify the RELATION type between the marked entities.", "re"),
    ("Label the pair of concepts as TeCP or TrAP.", "re"),
    # nli
    ("Please classify the relationship between the given premise and hypothesis into one of the following "
     "labels: entailment, contradiction, or neutral. Return only the label.", "nli"),
    ("Does the first sentence entail the second? Answer entailment, neutral or contradiction.", "nli"),
    ("Natural language inference on clinical notes.", "nli"),
    # classification
    ("The following is a document classification task. Classify the document into one or more of the hallmarks "
     "of cancer. Output the label(s) separated by commas.", "classification"),
    ("Assign each abstract to the correct categories.", "classification"),
    ("Which hallmarks of cancer does this text describe?", "classification"),
    # dialogue
    ("You are a doctor in a symptom-consultation chat. Reply to the patient: name the likely causes, what they "
     "can do at home, and when to seek urgent care.", "dialogue"),
    ("If you are a doctor, please answer the medical questions based on the patient's description.", "dialogue"),
    ("Respond to the patient's query with advice.", "dialogue"),
    # qa
    ("Answer the biomedical research question using the context. Start with yes, no or maybe, then give a "
     "one-sentence reason.", "qa"),
    ("Answer the following biomedical question with a short factual answer.", "qa"),
    ("QUESTIONS about pharmacology: respond briefly.", "qa"),
    # other
    ("Summarise the clinical note in one sentence.", "other"),
    ("Translate the discharge letter into plain English.", "other"),
    ("", "other"),
])
def test_detect_family(instruction, family):
    assert detect_family(instruction) == family


def test_pip_label_match_is_case_sensitive():
    # "PIP" is an i2b2 relation label; the word "pip" in other prose must not make a row RE.
    assert detect_family("Summarise: the pip of an orange.") == "other"

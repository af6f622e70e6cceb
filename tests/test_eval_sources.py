"""Source and family of a row: the `source` column, and detection from the text on every instruction the dataset
authors wrote, on the sample's own instructions, and on PMC-LLaMA's formats; stratified, seeded row selection."""

import json
from collections import Counter
from pathlib import Path

import pytest

from medtune.data.select import select_rows
from medtune.data.sources import DISEASE_NER, GENE_NER, SOURCE_FAMILY, source_of

DATA = Path(__file__).resolve().parent / "data"
AUTHORS = json.loads((DATA / "medtuned_instructions.json").read_text())["instructions"]
# What the instruction alone can tell: the gene corpora share one list, the disease corpora near-identical ones.
EXPECTED_FROM_TEXT = {"NCBI-disease": DISEASE_NER, "BC5CDR-disease": DISEASE_NER, "BC2GM": GENE_NER,
                      "JNLPBA": GENE_NER}


@pytest.mark.parametrize("source,instruction", [(s, i) for s, lst in AUTHORS.items() for i in lst])
def test_every_authors_instruction_is_detected(source, instruction):
    row = {"instruction": instruction, "input": "", "output": ""}
    assert source_of(row) == (EXPECTED_FROM_TEXT.get(source, source), SOURCE_FAMILY[source])


def test_authors_instruction_lists_are_complete():
    counts = {s: len(lst) for s, lst in AUTHORS.items()}
    assert counts == {"NCBI-disease": 5, "BC5CDR-disease": 5, "BC5CDR-chem": 5, "BC2GM": 5, "JNLPBA": 5,
                      "i2b2-2012": 5, "i2b2-2010": 3, "GAD": 5, "MedNLI": 5, "hoc": 5, "chatdoctor": 10}


@pytest.mark.parametrize("name", ["medtuned_sample.jsonl", "medtuned_sample_eval.jsonl"])
def test_sample_rows_are_detected_without_their_source_column(sample_train_file, name):
    rows = [json.loads(line) for line in (sample_train_file.parent / name).read_text().splitlines()]
    for row in rows:
        source, family = source_of({k: v for k, v in row.items() if k != "source"})
        assert family == SOURCE_FAMILY[row["source"]], row
        assert row["source"] in source.split("|"), row


def test_pmc_llama_rows_are_qa_whatever_the_instruction_says():
    # PMC-LLaMA's own MedQA instruction (axiong/pmc_llama_instructions, row 0) speaks of a doctor and a patient.
    instruction = ("You're a doctor, kindly address the medical queries according to the patient's account.\n"
                   "Answer with the best option directly.")
    mcqa = {"instruction": instruction, "input": "###Question: Which drug?\n###Options:\nA. x\nB. y",
            "output": "###Answer: OPTION B IS CORRECT."}
    assert source_of(mcqa) == ("pmc_llama", "qa")
    assert source_of({**mcqa, "input": "Which drug?"}) == ("pmc_llama", "qa")  # the answer's marker is enough
    assert source_of({"instruction": "Answer the question.", "input": "What is the relation between a and b?",
                      "output": "a treats b"}) == ("pmc_llama", "qa")


@pytest.mark.parametrize("given,expected", [
    ("NCBI-disease", ("NCBI-disease", "ner")), ("i2b2-2010", ("i2b2-2010", "re")), ("HoC", ("hoc", "classification")),
    ("chatdoctor", ("chatdoctor", "dialogue")), ("pmc_llama", ("pmc_llama", "qa")), ("GAD", ("GAD", "re")),
    ("medqa_train", ("medqa_train", "other")),
])
def test_source_column_wins_over_the_text(given, expected):
    row = {"instruction": "Tag the genes with BIO labels.", "input": "x", "output": "x : O", "source": given}
    assert source_of(row) == expected


@pytest.mark.parametrize("instruction", ["Summarise the clinical note in one sentence.", "", "Translate: the pip."])
def test_unrecognised_rows_are_other(instruction):
    assert source_of({"instruction": instruction, "input": "x", "output": "y"}) == ("other", "other")


def _rows(counts: dict[str, int]) -> list[dict]:
    return [{"instruction": "", "output": f"{s}{i}", "source": s} for s, n in counts.items() for i in range(n)]


def test_select_rows_is_stratified_by_source_and_seeded():
    rows = _rows({"MedNLI": 30, "hoc": 5, "i2b2-2010": 1})  # blocks, as in the validation split
    picked = select_rows(rows, 7, seed=1)
    assert Counter(r["source"] for r in picked) == {"MedNLI": 3, "hoc": 3, "i2b2-2010": 1}
    assert picked == select_rows(rows, 7, seed=1)
    assert picked != select_rows(rows, 7, seed=2)
    assert [r["output"] for r in picked[:3] if r["source"] == "MedNLI"] != ["MedNLI0", "MedNLI1", "MedNLI2"]
    per_source = select_rows(rows, per_source=4, seed=0)
    assert Counter(r["source"] for r in per_source) == {"MedNLI": 4, "hoc": 4, "i2b2-2010": 1}
    both = select_rows(rows, 5, seed=0, per_source=2)
    assert Counter(r["source"] for r in both) == {"MedNLI": 2, "hoc": 2, "i2b2-2010": 1}
    assert select_rows(rows) == rows

"""Synthetic MedTuned-shaped data: rows in the real formats, per source corpus, with the real mix and lengths.

Benchmarks need the real dataset's *shape* (how many tokens each row has, how they spread, what the replies look
like), not its content, and must run offline. Each row gets a source by the mix below and is written in that
source's format (docs/DATA.md): `token : TAG` lines, one per input token, for NER (1.7x the input's characters);
masked relation sentences with a label; MedNLI sentence pairs; one HoC sentence (about 75% `None`); ChatDoctor
question and reply; pmc_llama MedMCQA / PubMedQA (a whole abstract) / UMLS rows. Lengths in Starling tokens are
lognormal (median, sigma), clipped to [lo, hi]; words come from a small biomedical list, converted from token
targets with TOKENS_PER_WORD. Instructions are filler of each source's instruction length (five per source, one
picked per row, as the authors pick one of several rewordings).

Where the numbers come from (docs/BENCHMARKS.md has the table):
- measured with the Starling tokenizer on the dataset authors' stored corpora (github nlpie-research/
  BioInstTune-LLM, arrow files under biomedical-datasets/ and clinical-datasets/): inputs and entity rates of the
  five biomedical NER corpora (train split; BC2GM and JNLPBA: their eval files), i2b2-2012, MedNLI, HoC and GAD,
  and the instruction lengths of the authors' instruction lists;
- estimates (no copy of these corpora was readable here): i2b2-2010 sentences and label mix, ChatDoctor, and the
  pmc_llama parts; the mix itself (corpus train sizes where known, ChatDoctor and pmc_llama 50K each per the
  paper, i2b2-2010 the remainder of the 200,252 train rows).

    python -m bench.synthetic --rows 200000 --out .cache/bench/medtuned_synthetic.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtune.eval.scorers import labels

Spec = tuple[float, float, int, int]  # lognormal median, sigma, clip low, clip high (Starling tokens)


@dataclass(frozen=True)
class Source:
    name: str
    share: float
    instruction_tokens: int
    input_tokens: Spec
    kind: str  # ner | typed_ner | label | hoc | dialogue | pmc_llama
    entity_rate: float = 0.0  # ner: share of rows with at least one entity
    labels: tuple[tuple[str, float], ...] = ()  # label: (label, probability)


SOURCES = (
    Source("NCBI-disease", 0.027, 67, (34, 0.55, 3, 200), "ner", 0.36),
    Source("BC5CDR-disease", 0.023, 71, (34, 0.55, 3, 280), "ner", 0.30),
    Source("BC5CDR-chem", 0.023, 70, (34, 0.55, 3, 280), "ner", 0.45),
    Source("BC2GM", 0.062, 71, (37, 0.60, 3, 410), "ner", 0.51),
    Source("JNLPBA", 0.093, 71, (40, 0.47, 5, 490), "ner", 0.82),
    Source("i2b2-2012", 0.034, 140, (17, 0.77, 1, 130), "typed_ner", 0.55),
    Source("i2b2-2010", 0.092, 163, (30, 0.60, 8, 200), "label", labels=(
        ("No Relations", 0.50), ("TrAP", 0.15), ("TeRP", 0.13), ("PIP", 0.07), ("TeCP", 0.05), ("TrCP", 0.04),
        ("TrIP", 0.02), ("TrNAP", 0.02), ("TrWP", 0.02))),
    Source("MedNLI", 0.056, 72, (34, 0.39, 10, 440), "label", labels=(  # + "Sentence 1:/2:" = 44
        ("Entailment", 1 / 3), ("Contradiction", 1 / 3), ("Neutral", 1 / 3))),
    Source("hoc", 0.061, 165, (39, 0.48, 8, 250), "hoc"),
    Source("chatdoctor", 0.280, 18, (80, 0.60, 10, 600), "dialogue"),
    Source("pmc_llama", 0.249, 30, (25, 0.60, 5, 200), "pmc_llama"),
)
HALLMARKS = tuple(f"{names[0]} ({abbr})" for abbr, names in labels.HALLMARKS.items())  # as the dataset writes them
I2B2_TYPES = ("PROBLEM", "TREATMENT", "TEST", "OCCURRENCE", "CLINICAL_DEPT", "EVIDENTIAL")
HOC_NONE, HOC_LABELS = 0.745, ((1, 0.83), (2, 0.15), (3, 0.02))  # measured on HoC train (12,119 sentences)
DIALOGUE_REPLY: Spec = (130, 0.50, 15, 700)
PMC_KINDS = (("medmcqa", 0.4), ("pubmedqa", 0.4), ("umls", 0.2))
RATIONALE: Spec = (70, 0.80, 5, 500)
ABSTRACT: Spec = (280, 0.35, 60, 700)
LONG_ANSWER: Spec = (45, 0.50, 8, 200)
WORDS = (
    "patient patients disease clinical treatment therapy tumor cancer cell cells gene protein expression mutation "
    "receptor pathway inhibitor dose study results increased decreased significant associated risk chronic acute "
    "infection inflammation symptoms fever cough pain headache nausea blood pressure heart kidney liver lung brain "
    "diabetes insulin glucose hypertension carcinoma metastasis apoptosis proliferation signaling kinase antibody "
    "antigen vaccine trial randomized placebo outcome mortality morbidity diagnosis prognosis biopsy imaging scan "
    "the of and in to with was were for on by as that from or a an is are this these which after during between "
    "we observed showed found compared effect effects level levels higher lower group groups control days weeks "
    "mg/kg mmol/L 95% CI p<0.05 IL-6 TNF-alpha BRCA1 p53 EGFR HER2 CD4+ T-cells mRNA siRNA in vitro in vivo"
).split()
TOKENS_PER_WORD = 1.6  # Starling tokens per word of WORDS drawn uniformly (measured: 1.61 over 20k words)


def _length(rng: np.random.Generator, spec: Spec) -> int:
    median, sigma, lo, hi = spec
    return int(np.clip(np.rint(rng.lognormal(np.log(median), sigma)), lo, hi))


def _words(rng: np.random.Generator, tokens: int) -> list[str]:
    return rng.choice(WORDS, max(1, round(tokens / TOKENS_PER_WORD))).tolist()


def _text(rng: np.random.Generator, tokens: int) -> str:
    return " ".join(_words(rng, tokens))


def _bio(rng: np.random.Generator, words: list[str], entity_rate: float, types: tuple[str, ...] = ("",)) -> str:
    """One `word : TAG` line per word, with 1-3 entities of 1-3 words in rows that have any."""
    tags = ["O"] * len(words)
    if rng.random() < entity_rate:
        for _ in range(rng.integers(1, 4)):
            start, size = int(rng.integers(len(words))), int(rng.integers(1, 4))
            suffix = str(rng.choice(types))
            for i in range(start, min(start + size, len(words))):
                tags[i] = ("B" if i == start else "I") + (f"-{suffix}" if suffix else "")
    return "\n".join(f"{w} : {t}" for w, t in zip(words, tags))


def _pick(rng: np.random.Generator, weighted) -> object:
    values, weights = zip(*weighted)
    return values[rng.choice(len(values), p=np.array(weights) / sum(weights))]


def _pmc_llama(rng: np.random.Generator, source: Source) -> tuple[str, str]:
    kind = _pick(rng, PMC_KINDS)
    question = _text(rng, _length(rng, source.input_tokens))
    if kind == "medmcqa":
        options = "\n".join(f"{letter}. {_text(rng, _length(rng, (5, 0.5, 1, 30)))}" for letter in "ABCD")
        answer = f"###Answer: OPTION {rng.choice(list('ABCD'))} IS CORRECT."
        rationale = f"###Rationale: {_text(rng, _length(rng, RATIONALE))}\n\n" if rng.random() < 0.6 else ""
        return f"###Question: {question}\n###Options:\n{options}", rationale + answer
    if kind == "pubmedqa":
        context = _text(rng, _length(rng, ABSTRACT))
        answer = _pick(rng, (("yes", 0.55), ("no", 0.34), ("maybe", 0.11)))
        return (f"###Question: {question}\n###Context: {context}",
                f"{_text(rng, _length(rng, LONG_ANSWER))}\n\n###Answer: {answer}")
    return question, _text(rng, _length(rng, (20, 0.6, 2, 120)))


def _row(rng: np.random.Generator, source: Source, instructions: list[str]) -> dict[str, str]:
    instruction = instructions[int(rng.integers(len(instructions)))]
    if source.kind == "pmc_llama":
        text, output = _pmc_llama(rng, source)
        return {"instruction": instruction, "input": text, "output": output, "source": source.name}
    words = _words(rng, _length(rng, source.input_tokens))
    text = " ".join(words)
    if source.kind == "ner":
        output = _bio(rng, words, source.entity_rate)
    elif source.kind == "typed_ner":
        output = _bio(rng, words, source.entity_rate, I2B2_TYPES)
    elif source.kind == "label":
        output = str(_pick(rng, source.labels))
    elif source.kind == "hoc":
        count = 0 if rng.random() < HOC_NONE else _pick(rng, HOC_LABELS)
        output = ", ".join(rng.choice(HALLMARKS, count, replace=False).tolist()) or "None"
    else:
        output = _text(rng, _length(rng, DIALOGUE_REPLY))
    if source.name == "MedNLI":
        half = len(words) // 2
        text = f"Sentence 1: {' '.join(words[:half])}\nSentence 2: {' '.join(words[half:])}"
    return {"instruction": instruction, "input": text, "output": output, "source": source.name}


def generate(rows: int, seed: int = 0) -> list[dict[str, str]]:
    """`rows` synthetic rows (instruction, input, output, source), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    shares = np.array([s.share for s in SOURCES])
    picks = rng.choice(len(SOURCES), rows, p=shares / shares.sum())
    instructions = {s.name: [_text(rng, s.instruction_tokens) for _ in range(5)] for s in SOURCES}
    return [_row(rng, SOURCES[i], instructions[SOURCES[i].name]) for i in picks.tolist()]


def write_jsonl(rows: int, path: str | Path, seed: int = 0) -> Path:
    """Generate once and reuse: the file name carries rows and seed."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for row in generate(rows, seed):
                f.write(json.dumps(row) + "\n")
        tmp.rename(path)
    return path


def default_path(rows: int, seed: int = 0) -> Path:
    return Path(".cache/bench") / f"medtuned_synthetic_v2_{rows}_s{seed}.jsonl"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: .cache/bench/medtuned_synthetic_v2_<rows>_s<seed>.jsonl")
    args = p.parse_args(argv)
    print(write_jsonl(args.rows, args.out or default_path(args.rows, args.seed), args.seed))


if __name__ == "__main__":
    main()

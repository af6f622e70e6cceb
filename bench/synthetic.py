"""Synthetic MedTuned-shaped data: instruction/input/output rows with a per-task-family mix and lognormal lengths.

Benchmarks need the real dataset's *shape* (how many tokens each row has, and how they spread), not its content,
and must run offline. Each row gets a task family by the mix below, the family's fixed instruction (MedTuned uses
one instruction template per source task) and input/output texts whose lengths in Starling tokens are drawn from a
lognormal (median, sigma), clipped to [lo, hi]. Words come from a small biomedical word list; the generator
converts token targets to word counts with TOKENS_PER_WORD, measured for that list with the Starling tokenizer.

The mix and length parameters are an estimate from the MedTuned source corpora (NER sentences from NCBI-disease,
BC5CDR, BC2GM, JNLPBA; i2b2-2010 and GAD relations; MedNLI; HoC abstracts; PubMedQA; symptom dialogues), not a
measurement of the real dataset (it is not downloaded here). docs/BENCHMARKS.md records them.

    python -m bench.synthetic --rows 200000 --out .cache/bench/medtuned_synthetic.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Family:
    name: str
    share: float
    instruction: str
    input_tokens: tuple[float, float, int, int]  # lognormal median, sigma, clip low, clip high
    output_tokens: tuple[float, float, int, int]
    labels: tuple[str, ...] = ()  # fixed label set: the output is one of these instead of free text


FAMILIES = (
    Family("ner", 0.38,
           "Your task is to identify the named entities in the following biomedical text. Label each entity as "
           "Disease or Chemical. Output one entity per line as TYPE: entity text, or None if there is no entity.",
           (38, 0.50, 8, 400), (14, 0.80, 1, 300)),
    Family("re", 0.17,
           "Identify the relation between the two marked concepts in the clinical text. Answer with one of TrIP, "
           "TrWP, TrCP, TrAP, TrNAP, TeRP, TeCP, PIP or none.",
           (50, 0.45, 10, 400), (2, 0.0, 1, 4), ("TrAP", "TeRP", "PIP", "none", "TrCP", "TeCP")),
    Family("nli", 0.06,
           "Determine whether the hypothesis follows from the premise. Answer entailment, contradiction or neutral.",
           (40, 0.40, 10, 300), (2, 0.0, 1, 4), ("entailment", "contradiction", "neutral")),
    Family("classification", 0.06,
           "The following is a document classification task. Classify the document into one or more of the "
           "hallmarks of cancer: Sustaining proliferative signaling, Evading growth suppressors, Resisting cell "
           "death, Enabling replicative immortality, Inducing angiogenesis, Activating invasion and metastasis, "
           "Genome instability and mutation, Tumor promoting inflammation, Deregulating cellular energetics, "
           "Avoiding immune destruction. Output the label(s) separated by commas.",
           (300, 0.45, 60, 1500), (8, 0.50, 2, 40)),
    Family("qa", 0.18,
           "Answer the biomedical question using the context. Start with yes, no or maybe, then give a short reason.",
           (260, 0.50, 30, 1500), (30, 0.90, 1, 400)),
    Family("dialogue", 0.15,
           "You are a doctor in a symptom-consultation chat. Reply to the patient: name the likely causes, what "
           "they can do at home, and when to seek urgent care.",
           (90, 0.70, 10, 800), (150, 0.60, 20, 900)),
)
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


def _lengths(rng: np.random.Generator, spec: tuple[float, float, int, int], n: int) -> np.ndarray:
    median, sigma, lo, hi = spec
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def _text(rng: np.random.Generator, tokens: int) -> str:
    return " ".join(rng.choice(WORDS, max(1, round(tokens / TOKENS_PER_WORD))).tolist())


def generate(rows: int, seed: int = 0) -> list[dict[str, str]]:
    """`rows` synthetic rows (instruction, input, output, family), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    shares = np.array([f.share for f in FAMILIES])
    picks = rng.choice(len(FAMILIES), rows, p=shares / shares.sum())
    out: list[dict[str, str] | None] = [None] * rows
    for i, fam in enumerate(FAMILIES):
        where = np.flatnonzero(picks == i)
        n_in, n_out = _lengths(rng, fam.input_tokens, len(where)), _lengths(rng, fam.output_tokens, len(where))
        for j, a, b in zip(where.tolist(), n_in.tolist(), n_out.tolist()):
            output = str(rng.choice(fam.labels)) if fam.labels else _text(rng, b)
            out[j] = {"instruction": fam.instruction, "input": _text(rng, a), "output": output, "family": fam.name}
    return out  # type: ignore[return-value]


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
    return Path(".cache/bench") / f"medtuned_synthetic_{rows}_s{seed}.jsonl"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: .cache/bench/medtuned_synthetic_<rows>_s<seed>.jsonl")
    args = p.parse_args(argv)
    print(write_jsonl(args.rows, args.out or default_path(args.rows, args.seed), args.seed))


if __name__ == "__main__":
    main()

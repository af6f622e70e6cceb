"""pmc_llama QA (PMC-LLaMA's instruction data): MedMCQA options, PubMedQA yes/no/maybe, free-text answers.

What a row is, and how a reply is read, follows PMC-LLaMA's own formats:
- MedMCQA: gold `###Rationale: ...\n\n###Answer: OPTION D IS CORRECT.` (or the answer line alone). The option is
  the first `OPTION <letter> IS CORRECT` in the reply, any case: the pattern of PMC-LLaMA's evaluation script
  (chaoyi-wu/PMC-LLaMA SFT/eval/eval_medqa.py).
- PubMedQA: gold `<long answer>\n\n###Answer: yes` (or no / maybe); the reply's first `###Answer: <word>`.
- Anything else (UMLS questions, ...): free text.
ROUGE-L is taken on the text before `###Answer:` (rationale, long answer; `###Rationale:` removed) or on the whole
free-text answer, for rows whose gold has such text.
"""

from __future__ import annotations

import re
from typing import Sequence

from medtune.eval.scorers.text import answer_words, mean, rouge_l

Scores = dict[str, float]
_OPTION = re.compile(r"(?i)OPTION\s+([A-Z])\s+IS\s+CORRECT")
_YES_NO_MAYBE = re.compile(r"(?i)###\s*Answer\s*:\s*(yes|no|maybe)\b")
_ANSWER = re.compile(r"(?i)###\s*Answer\s*:")
_RATIONALE = re.compile(r"(?i)^\s*###\s*Rationale\s*:")


def kind(gold: str) -> str:
    """"medmcqa", "pubmedqa" or "free", from the gold reply's format."""
    return "medmcqa" if _OPTION.search(gold) else "pubmedqa" if _YES_NO_MAYBE.search(gold) else "free"


def option(reply: str) -> str | None:
    match = _OPTION.search(reply or "")
    return match.group(1).upper() if match else None


def yes_no_maybe(reply: str) -> str | None:
    match = _YES_NO_MAYBE.search(reply or "")
    return match.group(1).lower() if match else None


def text_part(reply: str) -> str:
    """The reply's text before `###Answer:`, without a `###Rationale:` heading."""
    return _RATIONALE.sub("", _ANSWER.split(reply or "", maxsplit=1)[0]).strip()


def score_qa(golds: Sequence[str], preds: Sequence[str]) -> Scores:
    """Per-kind accuracies, their pooled `answer_accuracy`, ROUGE-L on the rows with answer text, reply length.
    A metric whose rows are absent is left out; its count (n_...) says so."""
    kinds = [kind(g) for g in golds]
    mcqa = [option(g) == option(p) for g, p, k in zip(golds, preds, kinds) if k == "medmcqa"]
    ynm = [yes_no_maybe(g) == yes_no_maybe(p) for g, p, k in zip(golds, preds, kinds) if k == "pubmedqa"]
    texts = [(text_part(g), text_part(p)) for g, p in zip(golds, preds)]
    texts = [(g, p) for g, p in texts if g]
    scores: Scores = {"n_medmcqa": len(mcqa), "n_pubmedqa": len(ynm), "n_rougeL": len(texts)}
    if mcqa:
        scores["medmcqa_accuracy"] = mean(mcqa)
    if ynm:
        scores["pubmedqa_accuracy"] = mean(ynm)
    if mcqa or ynm:
        scores["answer_accuracy"] = mean(mcqa + ynm)
    if texts:
        scores["rougeL_f"] = mean(rouge_l(g, p) for g, p in texts)
    scores["answer_words"] = mean(map(answer_words, preds))
    return scores

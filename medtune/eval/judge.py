"""An LLM judge for the consultation (`medtune-eval --judge-endpoint URL [--judge-model NAME]`): any
OpenAI-compatible server reads each consultation reply's advised level of care and whether the differential names
the case's diagnosis. Reported under families.consultation.judge, beside the deterministic numbers and never mixed
with them: strict (the list names the diagnosis or a synonym) and lenient (also a broader or closely related one).

Requests go through medtune.eval.endpoint's `reply` (greedy, retries, Retry-After); a request that still fails is
counted under `failed` and its case is left out of the judge's numbers, and the deterministic numbers stand.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Mapping, Sequence

import openai

from medtune.eval import consultation
from medtune.eval.endpoint import Endpoint, EndpointDown, RowFailed, connect as connect_endpoint, open_client, reply
from medtune.data.advice import read_level
from medtune.eval.scorers.consultation import triage_scores

MAX_ATTEMPTS = 3
VERDICT_TOKENS = 8
LEVEL_QUESTION = ("A person described their symptoms to a medical assistant and got the reply below.\n\n"
                  "Reply:\n\"\"\"\n{reply}\n\"\"\"\n\nWhat level of care does the reply tell the person to seek? "
                  "Answer with exactly one of: emergency, see a doctor, self-care, none.")
DIAGNOSIS_QUESTION = ("Correct diagnosis: {diagnosis}\n\nList of diagnoses:\n\"\"\"\n{reply}\n\"\"\"\n\n"
                      "Is the correct diagnosis in the list? Answer with exactly one word: exact (the list names it "
                      "or a synonym of it), close (the list names a broader or closely related diagnosis), or no.")
_VERDICT = re.compile(r"\b(exact|close|no)\b", re.IGNORECASE)


def connect(url: str, api_key: str | None, model: str | None) -> Endpoint:
    return connect_endpoint(url, api_key, model, "--judge-endpoint")


def _asks(vignettes: Sequence[Mapping], replies: Mapping[tuple[int, str], str]) -> list[dict]:
    asks = []
    for row in vignettes:
        consult_reply = replies.get((row["index"], consultation.CONSULT))
        if row["triage"] and consult_reply is not None:
            asks.append({"index": row["index"], "kind": "level", "where": row["where"],
                         "prompt": [{"role": "user", "content": LEVEL_QUESTION.format(reply=consult_reply)}]})
        differential = replies.get((row["index"], consultation.DIFFERENTIAL))
        if row["diagnosis"] and differential is not None:
            diagnosis = row["diagnosis"][0] + (f" (also called: {', '.join(row['diagnosis'][1:])})"
                                               if len(row["diagnosis"]) > 1 else "")
            asks.append({"index": row["index"], "kind": "diagnosis", "where": row["where"],
                         "prompt": [{"role": "user", "content": DIAGNOSIS_QUESTION.format(diagnosis=diagnosis,
                                                                                          reply=differential)}]})
    return asks


async def _ask_all(endpoint: Endpoint, asks: Sequence[dict], concurrency: int) -> tuple[dict, list[str]]:
    verdicts, failed, pending, answers = {}, [], iter(asks), Counter()

    async def worker(client: openai.AsyncOpenAI) -> None:
        for ask in pending:
            try:
                verdicts[(ask["index"], ask["kind"])] = await reply(client, endpoint, ask, VERDICT_TOKENS, answers)
            except (RowFailed, EndpointDown) as e:
                failed.append(f"row {ask['index']} ({ask['where']}, {ask['kind']}): {e}")

    workers = max(1, min(concurrency, len(asks)))
    async with open_client(endpoint, workers, MAX_ATTEMPTS, answers) as client:
        await asyncio.gather(*(worker(client) for _ in range(workers)))
    return verdicts, failed


def judge(endpoint: Endpoint, vignettes: Sequence[Mapping], replies: Mapping[tuple[int, str], str],
          concurrency: int = 8) -> dict:
    """{"model", "consult": triage scores of the judge's levels, "top5_strict", "top5_lenient", "n_diagnosis",
    "failed", "failed_examples"} for one model's replies."""
    asks = _asks(vignettes, replies)
    verdicts, failed = asyncio.run(_ask_all(endpoint, asks, concurrency))
    result: dict = {"model": endpoint.model, "failed": len(failed), "failed_examples": failed[:5]}
    levels = [(row["triage"], read_level(verdicts[(row["index"], "level")], labels=True)) for row in vignettes
              if (row["index"], "level") in verdicts]
    if levels:
        result["consult"] = triage_scores([g for g, _ in levels], [p for _, p in levels])
    said = [_VERDICT.search(verdicts[(row["index"], "diagnosis")]) for row in vignettes
            if (row["index"], "diagnosis") in verdicts]
    words = [m.group(1).lower() if m else "no" for m in said]
    if words:
        result |= {"n_diagnosis": len(words), "top5_strict": words.count("exact") / len(words),
                   "top5_lenient": (words.count("exact") + words.count("close")) / len(words)}
    return result

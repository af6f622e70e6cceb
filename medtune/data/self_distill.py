"""Self-distillation of a dataset: its replies rewritten by the base model in its own words, kept where they keep
the answer (Yang et al., ACL 2024, "Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning").

A mixture entry with `self_distill: {max_new_tokens: N}` next to its `path` asks the base model, for each
single-turn row, SDFT's rewrite prompt (their Fig. 3, as the user's turn in the base's chat template, greedy):

    Below are an instruction that describes a task along with a reference answer. Using the reference answer as a
    guide, write your own response.
    ### Instruction:
    {the row's user turn}
    ### Reference Answer:
    {the row's reply}
    ### Response:

and trains on the row with the rewrite in place of its reply where the rewrite keeps the answer, else on the row
as written (SDFT's selection, y' = y~ if Extract(y~) = y else y). The answer is, for a vignette, its triage level
(read as the consultation evaluation reads it) and one of its diagnosis names; for any other row, the reference
reply itself, which must appear in the rewrite (case and spacing aside): a label such as "OPTION B IS CORRECT" or
"entailment" must survive word for word. Rewrites are cached like replay (medtune.data.base_replies). Counted in
the entry's `notes`: `self_distill_rewritten`, and the rows kept as written: `self_distill_answer_changed`,
`self_distill_cut_at_max_new_tokens` (the rewrite hit the limit before its end-of-turn), `self_distill_multi_turn`
(only a final single reply is rewritten).
"""

from __future__ import annotations

import logging
import re

from medtune.data import base_replies
from medtune.data.rows import RowReport

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
TEMPLATE = ("Below are an instruction that describes a task along with a reference answer. Using the reference "
            "answer as a guide, write your own response.\n### Instruction:\n{instruction}\n### Reference Answer:\n"
            "{reference}\n### Response:")


def _says(text: str, answer: str) -> bool:
    """`answer` in `text` as whole words, case and spacing aside ("PE" is not in "help", "no" not in "know")."""
    words = re.escape(" ".join(answer.lower().split())).replace(r"\ ", r"\s+")
    return re.search(rf"(?<!\w){words}(?!\w)", text.lower()) is not None


def keeps_answer(row: dict, rewrite: str) -> bool:
    """SDFT's selection: does the rewrite give the row's answer?"""
    if "case" in row:  # a vignette (medtune.data.vignettes)
        from medtune.data.advice import read_level  # the level as the consultation scores read it

        if row.get("triage") and read_level(rewrite) != row["triage"]:
            return False
        return not row.get("diagnosis") or any(_says(rewrite, name) for name in row["diagnosis"])
    return _says(rewrite, row["messages"][-1]["content"])


def _single_turn(row: dict) -> bool:
    messages = row["messages"]
    return (len(messages) >= 2 and messages[-1]["role"] == "assistant" and messages[-2]["role"] == "user"
            and sum(m["role"] == "assistant" for m in messages) == 1)


def distill(rows: list[dict], spec: dict, recipe, report: RowReport) -> list[dict]:
    """`rows` with the base model's rewrites in place of their replies where SDFT's selection keeps them."""
    single = [row for row in rows if _single_turn(row)]
    if len(rows) > len(single):
        report.notes["self_distill_multi_turn"] += len(rows) - len(single)
    asks = [[{"role": "user", "content": TEMPLATE.format(instruction=row["messages"][-2]["content"],
                                                          reference=row["messages"][-1]["content"])}]
            for row in single]
    records = base_replies.replies(recipe, "self_distill", [TEMPLATE], asks,
                                   spec.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    rewritten = {}
    for row, record in zip(single, records):
        if record["finish_reason"] != "stop":
            report.notes["self_distill_cut_at_max_new_tokens"] += 1
        elif not record["reply"] or not keeps_answer(row, record["reply"]):
            report.notes["self_distill_answer_changed"] += 1
        else:
            report.notes["self_distill_rewritten"] += 1
            rewritten[id(row)] = {**row, "messages": [*row["messages"][:-1],
                                                      {"role": "assistant", "content": record["reply"]}]}
    logger.info("self-distillation: %d of %d rows rewritten by the base model, the others kept as written (%s)",
                len(rewritten), len(rows), dict(report.notes))
    return [rewritten.get(id(row), row) for row in rows]

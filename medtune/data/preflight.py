"""The preflight before the first step: for the first row of each source and format, the rendered text with the
supervised spans marked, the count of supervised tokens and the stop ids, so that a silent loss-mask failure or an
end-of-turn that is never trained shows before hours of training, not after.

The rows are kept with the data cache (one process builds it), so every job prints and checks them at start.
Encoding stops at once on a row with no supervised token or an assistant turn whose end-of-turn would not be
trained (medtune.inference.chat_format); here every kept sample must also train on a stop id unless it was truncated.
"""

from __future__ import annotations

import logging

from medtune.inference.chat_format import ChatFormat

logger = logging.getLogger(__name__)

SAMPLES = "preflight.json"
OPEN, CLOSE = "⟦", "⟧"
SHOWN = 240  # characters of each run of text shown at either end


class PreflightError(ValueError):
    """The data would train a broken model: stops the run before the model loads."""


def kind(row: dict) -> str:
    return f"{row.get('format')} | source {row.get('source', '-')}"


def sample(row: dict, ids: list[int], labels: list[int], truncated: bool) -> dict:
    return {"kind": kind(row), "where": row["where"], "messages": row["messages"], "train_from": row["train_from"],
            "input_ids": ids, "labels": labels, "truncated": truncated}


def marked_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The decoded row with each supervised run between ⟦ ⟧, long runs elided in the middle."""
    flags = [label != -100 for label in labels]
    cuts = [0] + [k for k in range(1, len(ids)) if flags[k] != flags[k - 1]] + [len(ids)]
    # Decoding prefixes (not pieces) keeps the spaces a tokenizer's decoder strips at the start of a text.
    texts = [tokenizer.decode(ids[:k], skip_special_tokens=False) for k in cuts]
    out = []
    for a, start, end in zip(cuts, texts, texts[1:]):
        piece = end[len(start):]
        if len(piece) > 2 * SHOWN:
            piece = f"{piece[:SHOWN]}…[{len(piece) - 2 * SHOWN} characters]…{piece[-SHOWN:]}"
        out.append(f"{OPEN}{piece}{CLOSE}" if flags[a] else piece)
    return "".join(out)


def _prompt_is_a_prefix(fmt: ChatFormat, s: dict) -> bool:
    """Whether the prompt the model gets at inference for the first trained reply is where training has it: not so
    when tokens merge across the end of the generation prompt (TRL warns of the same)."""
    messages = s["messages"]
    first = next(n for n, m in enumerate(messages) if m["role"] == "assistant" and n >= s["train_from"])
    prompt = fmt.prompt_ids(messages[:first])
    return s["input_ids"][:len(prompt)] == prompt


def run(fmt: ChatFormat, samples: list[dict]) -> None:
    """Print the samples and stop (PreflightError) on one that trains on no stop id although it was not cut; warn
    when a reply's prompt tokenizes differently at inference."""
    logger.info("preflight: stop ids %s %s; supervised spans marked %s %s", list(fmt.stop_ids), fmt.stop_tokens,
                OPEN, CLOSE)
    for s in samples:
        supervised = [i for i, label in zip(s["input_ids"], s["labels"]) if label != -100]
        logger.info("preflight [%s] %s: %d of %d tokens supervised%s\n%s", s["kind"], s["where"], len(supervised),
                    len(s["input_ids"]), " (truncated)" if s["truncated"] else "",
                    marked_text(fmt.tokenizer, s["input_ids"], s["labels"]))
        if s["truncated"]:
            continue
        if not set(supervised) & set(fmt.stop_ids):
            raise PreflightError(f"{s['where']}: no end-of-turn token {fmt.stop_tokens} is trained on, so the model "
                                 "would never learn to stop; check the chat template (chat_template) and "
                                 "completion_only_loss")
        if not _prompt_is_a_prefix(fmt, s):
            logger.warning("preflight [%s] %s: the prompt of the first reply tokenizes differently alone (as at "
                           "inference, ending with the template's generation prompt) than before the reply (as "
                           "trained): tokens merge across that boundary; prefer a template whose generation prompt "
                           "ends on a token boundary", s["kind"], s["where"])

"""The row formats a data file may hold, detected per file from its first record, each cleaned into one shape.

- `instruction`: MedTuned's {instruction, input, output} (the default): one user turn
  (`chat_format.user_message(instruction, input)`) and one supervised reply, the output stripped of surrounding
  whitespace.
- `messages`: OpenAI-style conversations, [{"role", "content"}, ...] with system, user and assistant turns, multi-turn;
  every assistant turn is supervised.
- `prompt_completion`: TRL's conversational prompt/completion, two lists of messages; only the completion's
  assistant turns are supervised.
- `vignette`: patient vignettes, a case with its diagnosis and/or triage level, in any of the layouts of
  medtune.data.vignettes; evaluation asks the consultation questions of them (medtune.eval.consultation), training
  learns the case and a reply written from its diagnosis and level.

Every kept row has `messages` and `train_from` (the first message whose assistant turns are supervised); MedTuned
rows keep their three fields too (evaluation scores them). A row that cannot be used is counted under a reason:
unknown_role, no_assistant_turn, not_a_message_list, non_string_content, empty_reply, ... (plus template_error and the
like when the chat template refuses it, medtune.inference.chat_format).
"""

from __future__ import annotations

from medtune.inference.chat_format import user_message
from medtune.data import vignettes

INSTRUCTION, MESSAGES, PROMPT_COMPLETION, VIGNETTE = "instruction", "messages", "prompt_completion", "vignette"
DESCRIPTION = {INSTRUCTION: "MedTuned instruction rows", MESSAGES: "OpenAI-style conversations (messages)",
               PROMPT_COMPLETION: "TRL conversational prompt/completion",
               VIGNETTE: "patient vignettes (case, diagnosis, triage level)"}
ROLES = ("system", "user", "assistant")
REQUIRED = ("instruction", "output")


def detect(record: object) -> str:
    """The format of a file whose first record is `record`."""
    if vignettes.is_vignette(record):
        return VIGNETTE
    if isinstance(record, dict):
        if "messages" in record:
            return MESSAGES
        if "prompt" in record and "completion" in record:
            return PROMPT_COMPLETION
    return INSTRUCTION


def clean(fmt: str, raw: dict, where: str = "a row") -> tuple[dict | None, str | None]:
    """(the cleaned row, None) or (None, the reason it is skipped). `where` names the row in the errors that stop a
    read (an unknown vignette triage level)."""
    if fmt == VIGNETTE:
        row, reason = vignettes.clean(raw, where)
    else:
        row, reason = (_instruction_row(raw) if fmt == INSTRUCTION else _conversation_row(fmt, raw))
    if row is not None and isinstance(raw.get("source"), str) and raw["source"].strip():
        row["source"] = raw["source"]
    return row, reason


def _instruction_row(raw: dict) -> tuple[dict | None, str | None]:
    for key in REQUIRED:
        if key not in raw or raw[key] is None:
            return None, f"missing_{key}"
    row = {"instruction": raw["instruction"], "input": "" if raw.get("input") is None else raw["input"],
           "output": raw["output"]}
    for key, value in row.items():
        if not isinstance(value, str):
            return None, f"non_string_{key}"
    for key in REQUIRED:
        if not row[key].strip():
            return None, f"empty_{key}"
    row["messages"] = [{"role": "user", "content": user_message(row["instruction"], row["input"])},
                       {"role": "assistant", "content": row["output"].strip()}]
    row["train_from"] = 0
    return row, None


def _messages(value: object) -> tuple[list[dict] | None, str | None]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None, "not_a_message_list"
    out = []
    for m in value:
        if m.get("role") not in ROLES:
            return None, "unknown_role"
        if not isinstance(m.get("content"), str):
            return None, "non_string_content"
        out.append({"role": m["role"], "content": m["content"]})
    return out, None


def _conversation_row(fmt: str, raw: dict) -> tuple[dict | None, str | None]:
    if fmt == MESSAGES:
        if "messages" not in raw:
            return None, "missing_messages"
        messages, reason = _messages(raw["messages"])
        train_from = 0
    else:
        if "prompt" not in raw or "completion" not in raw:
            return None, "missing_prompt_or_completion"
        prompt, reason = _messages(raw["prompt"])
        if reason:
            return None, reason
        completion, reason = _messages(raw["completion"])
        messages, train_from = (prompt + (completion or []), len(prompt))
    if reason:
        return None, reason
    replies = [m for m in messages[train_from:] if m["role"] == "assistant"]
    if not replies:
        return None, "no_assistant_turn"
    if any(not m["content"].strip() for m in replies):
        return None, "empty_reply"
    return {"messages": messages, "train_from": train_from}, None

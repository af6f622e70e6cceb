"""The conversation a held-out row is answered in, the same for local generation (medtune.eval.generate) and for an
endpoint (medtune.eval.endpoint): the row's user turn alone, no system prompt; a consultation request carries its
own prompt. Kept apart from generate.py, which
imports torch, so that `medtune-eval --endpoint` starts without it."""

from __future__ import annotations

from typing import Mapping

from medtune.inference.chat_format import user_message


def row_messages(row: Mapping) -> list[dict[str, str]]:
    """A consultation request's prompt (medtune.eval.consultation.requests), else the MedTuned row's user turn."""
    if "prompt" in row:
        return row["prompt"]
    return [{"role": "user", "content": user_message(row["instruction"], row.get("input") or "")}]

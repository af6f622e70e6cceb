"""The base model's own greedy replies, generated once before training and cached: what replay
(medtune.data.replay) and self-distillation (medtune.data.self_distill) train on.

Replies go to `data_cache_dir/<kind>/<model and settings>.jsonl`, one line per conversation as it is generated
(keyed by the conversation's hash): a second run, every other rank (the data is prepared by one process under the
cache's lock) and a run after an interruption read what is there and generate only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from medtune.data.rows import RowReport, json_lines

logger = logging.getLogger(__name__)

BATCH = 16


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()[:16]


def cache_file(recipe, kind: str, settings: list) -> Path:
    """One file per kind, base model and generation settings."""
    m, d = recipe.model, recipe.data
    key = digest([m.model_name_or_path, m.model_revision, d.chat_template, *settings])
    return Path(d.data_cache_dir).expanduser() / kind / f"{key}.jsonl"


def _generated(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    for _, record in json_lines(path, RowReport()) if path.exists() else ():
        if isinstance(record, dict) and "key" in record:  # a line cut by an interruption is left out
            done[record["key"]] = record
    return done


def _generate(recipe, conversations: list[list[dict]], max_new_tokens: int, path: Path) -> None:
    from medtune.inference.decoding import complete
    from medtune.inference.load import load_for_inference

    model, fmt = load_for_inference(recipe.model.model_name_or_path)
    logger.info("%s: the base model's greedy replies to %d conversations (%d new tokens at most), into %s",
                path.parent.name, len(conversations), max_new_tokens, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a", encoding="utf-8") as f:  # a line cut by an interruption stays a line of its own
            f.write("\n")
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(conversations), BATCH):
            batch = conversations[start:start + BATCH]
            for conversation, done in zip(batch, complete(model, fmt, batch, max_new_tokens)):
                f.write(json.dumps({"key": digest(conversation), "messages": conversation, "reply": done.text.strip(),
                                    "finish_reason": done.finish_reason}, ensure_ascii=False) + "\n")
            f.flush()
            logger.info("%s: %d of %d replies generated", path.parent.name, min(start + BATCH, len(conversations)),
                        len(conversations))
    del model


def replies(recipe, kind: str, settings: list, conversations: list[list[dict]], max_new_tokens: int) -> list[dict]:
    """The base model's record ({reply, finish_reason}) for each conversation, generating what the cache lacks."""
    path = cache_file(recipe, kind, [*settings, max_new_tokens])
    done = _generated(path)
    todo = list({digest(c): c for c in conversations if digest(c) not in done}.values())
    if todo:
        _generate(recipe, todo, max_new_tokens, path)
        done = _generated(path)
    else:
        logger.info("%s: all %d replies read from %s", kind, len(conversations), path)
    return [done[digest(c)] for c in conversations]

"""Replay of the base model: its own greedy replies to a prompt set, as conversations to mix into training.

A mixture entry `{replay: {prompts: FILE[, max_new_tokens: 192]}[, fraction: F]}` (medtune.data.mixture) asks the
base model (`model_name_or_path`, its own weights, in its chat template, under medtune-serve's system prompt) each
prompt of FILE (JSON lines with a string `prompt`) once, greedy, and trains on the conversations: training on what
the base already says next to the task rows holds on to its behaviour (plain replay, the rehearsal remedy for
forgetting; Yang et al., ACL 2024, compare it with self-distillation). data/prompts/health_questions.jsonl is a
prompt set written for this repository: everyday health questions and emergencies as people type them.

The replies are generated once and kept in `data_cache_dir/replay/<model and settings>.jsonl`, one line per prompt
as it is generated: a second run, every other rank (the data is prepared by one process under the cache's lock) and
a run after an interruption read what is there and generate only what is missing. Counted: prompts read, lines
without a usable prompt (`missing_prompt`), replies cut at max_new_tokens before their end-of-turn
(`replay_cut_at_max_new_tokens`, not trained: they would teach the model to stop mid-sentence) and empty replies.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from medtune.chat_format import DEFAULT_SYSTEM_PROMPT
from medtune.data import formats
from medtune.data.rows import RowReport, json_lines, readable

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 192
BATCH = 16


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_prompts(path: str, report: RowReport) -> list[str]:
    prompts = []
    for where, record in json_lines(Path(path), report):
        if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"].strip():
            prompts.append(record["prompt"].strip())
        elif readable(record):
            report.skip("missing_prompt", where)
    report.rows_read = len(prompts) + sum(report.skipped.values())
    return prompts


def cache_file(recipe, max_new_tokens: int) -> Path:
    """One file per base model and generation settings; prompts are keyed inside it one by one."""
    m, d = recipe.model, recipe.data
    key = _digest(json.dumps([m.model_name_or_path, m.model_revision, d.chat_template, DEFAULT_SYSTEM_PROMPT,
                              max_new_tokens]))
    return Path(d.data_cache_dir).expanduser() / "replay" / f"{key}.jsonl"


def _generated(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    for _, record in json_lines(path, RowReport()) if path.exists() else ():
        if isinstance(record, dict) and "prompt_hash" in record:  # a line cut by an interruption is left out
            done[record["prompt_hash"]] = record
    return done


def _generate(recipe, prompts: list[str], max_new_tokens: int, path: Path) -> None:
    from medtune.chat_format import with_system_prompt
    from medtune.decoding import complete
    from medtune.inference import load_for_inference

    model, fmt = load_for_inference(recipe.model.model_name_or_path)
    logger.info("replay: the base model's greedy replies to %d prompts (%d new tokens at most), into %s",
                len(prompts), max_new_tokens, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(prompts), BATCH):
            batch = prompts[start:start + BATCH]
            conversations = [with_system_prompt([{"role": "user", "content": p}], DEFAULT_SYSTEM_PROMPT)
                             for p in batch]
            for prompt, done in zip(batch, complete(model, fmt, conversations, max_new_tokens)):
                f.write(json.dumps({"prompt_hash": _digest(prompt), "prompt": prompt, "reply": done.text.strip(),
                                    "finish_reason": done.finish_reason}, ensure_ascii=False) + "\n")
            f.flush()
            logger.info("replay: %d of %d prompts answered", min(start + BATCH, len(prompts)), len(prompts))
    del model


def replay_rows(spec: dict, recipe) -> tuple[list[dict], RowReport]:
    """The replay conversations of one mixture entry's `replay` settings, generating what the cache lacks."""
    report = RowReport()
    max_new_tokens = spec.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    prompts = read_prompts(spec["prompts"], report)
    if not prompts:
        raise ValueError(f"replay prompts {spec['prompts']}: no usable prompt (JSON lines with a string 'prompt')")
    path = cache_file(recipe, max_new_tokens)
    done = _generated(path)
    todo = [p for p in dict.fromkeys(prompts) if _digest(p) not in done]
    if todo:
        _generate(recipe, todo, max_new_tokens, path)
        done = _generated(path)
    else:
        logger.info("replay: all %d replies read from %s", len(prompts), path)
    rows = []
    for i, prompt in enumerate(prompts):
        record, where = done[_digest(prompt)], f"{spec['prompts']}:prompt {i + 1}"
        if record["finish_reason"] != "stop":
            report.skip("replay_cut_at_max_new_tokens", where)
            continue
        row, reason = formats.clean(formats.MESSAGES, {"messages": [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": prompt},
            {"role": "assistant", "content": record["reply"]}]}, where)
        if row is None:
            report.skip(reason, where)
            continue
        rows.append({**row, "where": where, "format": formats.MESSAGES, "index": i})
    report.formats[f"{spec['prompts']} (replay)"] = formats.MESSAGES
    return rows, report

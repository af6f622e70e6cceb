"""Replay of the base model: its own greedy replies to a prompt set, as conversations to mix into training.

A mixture entry `{replay: {prompts: FILE[, max_new_tokens: 192]}[, fraction: F]}` (medtune.data.mixture) asks the
base model (`model_name_or_path`, its own weights, in its chat template, under medtune-serve's system prompt) each
prompt of FILE (JSON lines with a string `prompt`) once, greedy, and trains on the conversations: training on what
the base already says next to the task rows holds on to its behaviour (plain replay, the rehearsal remedy for
forgetting; Yang et al., ACL 2024, compare it with self-distillation, medtune.data.self_distill).
data/prompts/health_questions.jsonl is a prompt set written for this repository: everyday health questions and
emergencies as people type them. The replies are cached (medtune.data.base_replies). Counted: prompts read, lines
without a usable prompt (`missing_prompt`), replies cut at max_new_tokens before their end-of-turn
(`replay_cut_at_max_new_tokens`, not trained: they would teach the model to stop mid-sentence) and empty replies.
"""

from __future__ import annotations

from pathlib import Path

from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT, with_system_prompt
from medtune.data import base_replies, formats
from medtune.data.rows import RowReport, json_lines, readable

DEFAULT_MAX_NEW_TOKENS = 192


def read_prompts(path: str, report: RowReport) -> list[str]:
    prompts = []
    for where, record in json_lines(Path(path), report):
        if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"].strip():
            prompts.append(record["prompt"].strip())
        elif readable(record):
            report.skip("missing_prompt", where)
    report.rows_read = len(prompts) + sum(report.skipped.values())
    return prompts


def replay_rows(spec: dict, recipe) -> tuple[list[dict], RowReport]:
    """The replay conversations of one mixture entry's `replay` settings, generating what the cache lacks."""
    report = RowReport()
    prompts = read_prompts(spec["prompts"], report)
    if not prompts:
        raise ValueError(f"replay prompts {spec['prompts']}: no usable prompt (JSON lines with a string 'prompt')")
    conversations = [with_system_prompt([{"role": "user", "content": p}], DEFAULT_SYSTEM_PROMPT) for p in prompts]
    records = base_replies.replies(recipe, "replay", [DEFAULT_SYSTEM_PROMPT], conversations,
                                   spec.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    rows = []
    for i, (conversation, record) in enumerate(zip(conversations, records)):
        where = f"{spec['prompts']}:prompt {i + 1}"
        if record["finish_reason"] != "stop":
            report.skip("replay_cut_at_max_new_tokens", where)
            continue
        row, reason = formats.clean(formats.MESSAGES, {"messages": [
            *conversation, {"role": "assistant", "content": record["reply"]}]}, where)
        if row is None:
            report.skip(reason, where)
            continue
        rows.append({**row, "where": where, "format": formats.MESSAGES, "index": i})
    report.formats[f"{spec['prompts']} (replay)"] = formats.MESSAGES
    return rows, report

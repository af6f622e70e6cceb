"""Model passes of an evaluation: greedy replies and teacher-forced reply losses, scored per family and source."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from medtune import inference
from medtune.chat_format import encode_examples
from medtune.eval.prompt import row_messages
from medtune.eval.score import score

Row = Mapping[str, str]


def _batches(indices: Sequence[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def generate_replies(model, tokenizer, rows: Sequence[Row], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies, batched by similar prompt length (less padding), returned in row order."""
    conversations = [row_messages(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(conversations[i][0]["content"]))
    replies: list[str] = [""] * len(rows)
    for idx in _batches(order, batch_size):
        batch = [conversations[i] for i in idx]
        for i, reply in zip(idx, inference.generate(model, tokenizer, batch, max_new_tokens=max_new_tokens)):
            replies[i] = reply
    return replies


@torch.inference_mode()
def reply_losses(model, tokenizer, rows: Sequence[Row], batch_size: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each gold reply (incl. its <|end_of_turn|>), teacher-forced."""
    encoded = encode_examples(tokenizer, rows)
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for idx in _batches(order, batch_size):
        # Right padding: every row's positions stay 0..n-1 without passing position_ids.
        batch = tokenizer.pad({"input_ids": [encoded[i][0] for i in idx]}, padding=True, padding_side="right",
                              return_tensors="pt").to(model.device)
        ids = batch["input_ids"]
        prompt_lengths = torch.tensor([encoded[i][1].index(1) for i in idx], device=ids.device)
        positions = torch.arange(ids.shape[1], device=ids.device)
        reply = (positions >= prompt_lengths[:, None]) & batch["attention_mask"].bool()  # mask: 0s, then the reply
        logits = model(**batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll = (nll * reply[:, 1:]).sum(1)
        for b, i in enumerate(idx):
            out[i] = (nll[b].item(), int(reply[b].sum()))
    return out


def evaluate_model(model, tokenizer, rows: Sequence[Row], max_new_tokens: int = 256,
                   batch_size: int = 8) -> tuple[dict, list[str]]:
    """(medtune.eval.score results with reply losses, replies) for one model; restores its train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        replies = generate_replies(model, tokenizer, rows, max_new_tokens, batch_size)
        losses = reply_losses(model, tokenizer, rows, batch_size)
    finally:
        model.train(was_training)
    return score(rows, replies, losses), replies


def flat_metrics(results: Mapping) -> dict[str, float]:
    """`evaluate_model` results flat, ready for `trainer.log`: eval_gen_<family>_<metric>,
    eval_gen_source_<source>_<metric> and eval_gen_all_<n|loss|perplexity> (the "eval_" prefix puts them under
    eval/ in W&B and TensorBoard)."""
    flat = {f"eval_gen_all_{k}": float(v) for k, v in results["overall"].items()}
    for prefix, group in (("", results["families"]), ("source_", results["sources"])):
        for name, metrics in group.items():
            flat.update({f"eval_gen_{prefix}{name}_{k}": float(v) for k, v in metrics.items() if k != "primary"})
    return flat


def headlines(results: Mapping) -> str:
    """One short line for the console: each family's headline metric and its number of rows."""
    return ", ".join(f"{family} {m['primary']}={m[m['primary']]:.3g} (n={m['n']})"
                     for family, m in results["families"].items())

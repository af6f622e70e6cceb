"""Model passes of an evaluation: greedy replies and teacher-forced reply losses, scored per family and source."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from medtune.inference.chat_format import ChatFormat, Messages, RowError
from medtune.data.vignettes import LEVELS
from medtune.inference.decoding import complete, prefill
from medtune.eval import consultation
from medtune.eval.prompt import row_messages
from medtune.eval.score import mean_loss, score

Row = Mapping[str, str]


def _batches(indices: Sequence[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def generate_replies(model, fmt: ChatFormat, rows: Sequence[Row], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies, batched by similar prompt length (less padding), returned in row order."""
    conversations = [row_messages(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(conversations[i][0]["content"]))
    replies: list[str] = [""] * len(rows)
    for idx in _batches(order, batch_size):
        completions = complete(model, fmt, [conversations[i] for i in idx], max_new_tokens=max_new_tokens)
        for i, completion in zip(idx, completions):
            replies[i] = completion.text
    return replies


@torch.inference_mode()
def reply_losses(model, fmt: ChatFormat, rows: Sequence[Row], batch_size: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each gold reply (with its end-of-turn), teacher-forced."""
    encoded = fmt.encode([r["messages"] for r in rows])
    for row, e in zip(rows, encoded):
        if isinstance(e, RowError):
            raise ValueError(f"{row.get('where', 'a row')}: {e}")
    if hasattr(model, "token_losses"):  # a llama.cpp model (medtune.inference.llama_cpp): one row at a time
        out = []
        for e in encoded:
            start = max(0, e.mask.index(1) - 1)
            scored = torch.tensor(e.mask[start + 1:], dtype=torch.float32)
            out.append(((model.token_losses(e.input_ids, start) * scored).sum().item(), int(scored.sum())))
        return out
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for idx in _batches(order, batch_size):
        # Right padding: every row's positions stay 0..n-1 without passing position_ids.
        batch = fmt.tokenizer.pad({"input_ids": [encoded[i].input_ids for i in idx]}, padding=True,
                                  padding_side="right", return_tensors="pt").to(model.device)
        ids = batch["input_ids"]
        reply = torch.tensor([encoded[i].mask + [0] * (ids.shape[1] - len(encoded[i].mask)) for i in idx],
                             dtype=torch.bool, device=ids.device)
        # Logits only from the position before the batch's first reply token on: the output layer and the softmax
        # over the vocabulary are a fifth of the forward pass (SmolLM2), and most positions are prompt.
        start = max(0, min(encoded[i].mask.index(1) for i in idx) - 1)
        keep = torch.arange(start, ids.shape[1] - 1, device=ids.device)
        logits = model(**batch, logits_to_keep=keep).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, start + 1:], reduction="none")
        nll = (nll * reply[:, start + 1:]).sum(1)
        for b, i in enumerate(idx):
            out[i] = (nll[b].item(), int(reply[b].sum()))
    return out


@torch.inference_mode()
def option_losses(model, fmt: ChatFormat, prompts: Sequence[Messages], options: Sequence[str],
                  batch_size: int) -> list[list[float]]:
    """Per prompt, the summed negative log-likelihood of each option as the whole assistant reply (with its
    end-of-turn). The prompt runs once and its KV cache serves every option: `reply_losses` on each (prompt, option)
    conversation gives the same numbers at k times the cost. A template that tokenizes the prompt differently for
    different replies, and a llama.cpp model, fall back to that."""
    from transformers import DynamicCache

    k, out = len(options), []
    for start in range(0, len(prompts), batch_size):
        conversations = [[*p, {"role": "assistant", "content": o}] for p in prompts[start:start + batch_size]
                         for o in options]
        encoded = fmt.encode(conversations)
        for e in encoded:
            if isinstance(e, RowError):
                raise ValueError(str(e))
        cut = [e.mask.index(1) for e in encoded]
        heads = [e.input_ids[:c] for e, c in zip(encoded, cut)]
        if hasattr(model, "token_losses") or any(heads[i] != heads[i - i % k] for i in range(len(heads))):
            losses = reply_losses(model, fmt, [{"messages": c} for c in conversations], batch_size)
            out += [[nll for nll, _ in losses[i:i + k]] for i in range(0, len(losses), k)]
            continue
        cache = DynamicCache(config=model.config)
        last, mask, positions = prefill(model, fmt.tokenizer, heads[::k], cache)
        cache.batch_repeat_interleave(k)
        tails = [e.input_ids[c:] for e, c in zip(encoded, cut)]
        width = max(map(len, tails))
        pad = fmt.tokenizer.pad_token_id
        ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=model.device)
        real = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails], device=model.device)
        scored = torch.tensor([e.mask[c:] + [0] * (width - len(e.mask) + c) for e, c in zip(encoded, cut)],
                              device=model.device)
        logits = model(input_ids=ids, attention_mask=torch.cat([mask.repeat_interleave(k, 0), real], 1),
                       position_ids=positions[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(width,
                                                                                                 device=ids.device),
                       cache=cache, use_cache=True).logits
        # The first reply token is predicted by the prompt's last position, each next one by the token before it.
        logits = torch.cat([last.repeat_interleave(k, 0)[:, None], logits[:, :-1].float()], 1)
        nll = (torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * scored).sum(1)
        sums = nll.tolist()
        out += [sums[i:i + k] for i in range(0, len(sums), k)]
    return out


def mean_reply_loss(model, fmt: ChatFormat, rows: Sequence[Row], batch_size: int = 8) -> float:
    """The rows' held-out reply loss (eval.json's overall `loss`), in eval mode; restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        return mean_loss(reply_losses(model, fmt, rows, batch_size))
    finally:
        model.train(was_training)


def evaluate_model(model, fmt: ChatFormat, rows: Sequence[Row], max_new_tokens: int = 256,
                   batch_size: int = 8) -> tuple[dict, list[str]]:
    """(medtune.eval.score results with reply losses, replies) for one model; restores its train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        replies = generate_replies(model, fmt, rows, max_new_tokens, batch_size)
        losses = reply_losses(model, fmt, rows, batch_size)
    finally:
        model.train(was_training)
    return score(rows, replies, losses), replies


def consultation_replies(model, fmt: ChatFormat, rows: Sequence[Mapping], system_prompt: str, max_new_tokens: int,
                         batch_size: int = 8) -> tuple[dict[tuple[int, str], str], dict[int, str]]:
    """({(vignette index, question): greedy reply}, {vignette index: likelihood level}) for vignette rows; restores
    the model's train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        replies: dict[tuple[int, str], str] = {}
        requests = consultation.requests(rows, system_prompt, max_new_tokens)
        for question in consultation.QUESTIONS:
            group = [r for r in requests if r["question"] == question]
            if group:
                texts = generate_replies(model, fmt, group, group[0]["max_new_tokens"], batch_size)
                replies.update({(r["index"], question): text for r, text in zip(group, texts)})
        triaged = [row for row in rows if row["triage"]]
        replies_of_levels = [consultation.LEVEL_REPLIES[level] for level in LEVELS]
        nll = option_losses(model, fmt, [consultation.prompt(row, consultation.TRIAGE, system_prompt)
                                         for row in triaged], replies_of_levels, batch_size)
        likelihood = {row["index"]: LEVELS[min(range(len(LEVELS)), key=losses.__getitem__)]
                      for row, losses in zip(triaged, nll)}
    finally:
        model.train(was_training)
    return replies, likelihood


def flat_metrics(results: Mapping) -> dict[str, float]:
    """`evaluate_model` results flat, ready for `trainer.log`: eval_gen_<family>_<metric>,
    eval_gen_source_<source>_<metric> and eval_gen_all_<n|loss|perplexity> (the "eval_" prefix puts them under
    eval/ in W&B and TensorBoard)."""
    flat = {f"eval_gen_all_{k}": float(v) for k, v in results["overall"].items()}
    for prefix, group in (("", results["families"]), ("source_", results["sources"])):
        for name, metrics in group.items():
            flat.update({f"eval_gen_{prefix}{name}_{k}": float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float))})
    return flat


def headlines(results: Mapping) -> str:
    """One short line for the console: each family's headline metric and its number of rows."""
    return ", ".join(f"{family} {m['primary']}={m[m['primary']]:.3g} (n={m['n']})"
                     for family, m in results["families"].items())

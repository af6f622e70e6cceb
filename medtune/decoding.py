"""The one decoding loop: a batch of prompts stepped one token at a time under medtune.generation's rules, used by
evaluation, the end-of-training answer (`complete`), the terminal chat (`Stream`) and the server's batcher
(`DecodeBatch`).

transformers' `generate` applies one temperature and top-p to the whole batch and keeps finished rows until the
longest is done, and its continuous-batching manager picks greedy or sampling for every request at once. The server
needs each request's own settings and drops a row as soon as its request ends (finished, cancelled, timed out), so
the step loop is here; padding (`tokenizer.pad`), the KV cache, the attention masks and top-p are transformers'.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, TopPLogitsWarper

from medtune.chat_format import ChatFormat, Messages
from medtune.generation import DEFAULT_MAX_NEW_TOKENS, GREEDY, Completion, Reply, Sampling


def left_padded(tok, prompts: list[list[int]], device) -> dict[str, torch.Tensor]:
    """Left-padded token id lists (generation continues from the right edge)."""
    enc = tok.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


class DecodeBatch:
    """Prefill on construction; then `sample()` the next token of every row and `advance()` the rows kept.

    `rows` holds the indices (into the prompts given) of the rows still in the batch, in batch order.
    """

    @torch.inference_mode()
    def __init__(self, model, fmt: ChatFormat, prompts: list[list[int]], samplings: list[Sampling]):
        self.model, self.samplings = model, samplings
        self.stop_ids = list(fmt.stop_ids)
        enc = left_padded(fmt.tokenizer, prompts, model.device)
        self.mask = enc["attention_mask"]
        # Positions count real tokens only, so a padded row sees the positions it would see alone.
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=model.config)
        self.rows = list(range(len(prompts)))
        self.steps = 0
        self._logits = self._forward(enc["input_ids"])

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=self.positions,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def sample(self) -> list[int]:
        """The next token of every row in `rows`, each with its own sampling settings."""
        logits = self._logits
        if self.steps == 0:  # at least one token
            logits[:, self.stop_ids] = float("-inf")
        tokens = logits.argmax(-1)
        for i, row in enumerate(self.rows):
            s = self.samplings[row]
            if not s.greedy:
                scores = logits[i:i + 1] / s.temperature
                if s.top_p < 1.0:
                    scores = TopPLogitsWarper(s.top_p)(None, scores)
                tokens[i] = torch.multinomial(scores.softmax(-1), 1)[0, 0]
        return tokens.tolist()

    @torch.inference_mode()
    def advance(self, tokens: list[int], keep: list[bool]) -> None:
        """Feed each kept row its token and run the next step; rows with keep False leave the batch."""
        if not all(keep):
            kept = [i for i, k in enumerate(keep) if k]
            self.rows = [self.rows[i] for i in kept]
            if not kept:
                return
            index = torch.tensor(kept, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
            tokens = [tokens[i] for i in kept]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        self._logits = self._forward(torch.tensor(tokens, device=self.mask.device)[:, None])
        self.steps += 1


def complete(model, fmt: ChatFormat, conversations: Sequence[Messages], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             sampling: Sampling = GREEDY) -> list[Completion]:
    """Replies with finish reasons and token counts for a batch of conversations."""
    prompts = [fmt.prompt_ids(c) for c in conversations]
    replies = [Reply(fmt, max_new_tokens) for _ in prompts]
    texts: list[list[str]] = [[] for _ in prompts]
    batch = DecodeBatch(model, fmt, prompts, [sampling] * len(prompts))
    while batch.rows:
        tokens = batch.sample()
        for row, token in zip(batch.rows, tokens):
            texts[row].append(replies[row].add(token))
        batch.advance(tokens, [replies[row].finish_reason is None for row in batch.rows])
    return [Completion("".join(t), r.finish_reason, len(p), r.tokens) for t, r, p in zip(texts, replies, prompts)]


class Stream:
    """The pieces of one reply as they are generated (an iterator of str). Once exhausted, `finish_reason` and
    `completion_tokens` are set; `close()` stops early (Ctrl-C in the terminal chat)."""

    def __init__(self, model, fmt: ChatFormat, messages: Messages, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 sampling: Sampling = GREEDY):
        self.prompt = fmt.prompt_ids(messages)
        self.prompt_tokens = len(self.prompt)
        self._reply = Reply(fmt, max_new_tokens)
        self._pieces = self._generate(model, fmt, sampling)
        self.finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return self._reply.tokens

    def _generate(self, model, fmt: ChatFormat, sampling: Sampling) -> Iterator[str]:
        batch = DecodeBatch(model, fmt, [self.prompt], [sampling])
        while True:
            token = batch.sample()[0]
            if piece := self._reply.add(token):
                yield piece
            if self._reply.finish_reason is not None:
                self.finish_reason = self._reply.finish_reason
                return
            batch.advance([token], [True])

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()

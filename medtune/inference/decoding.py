"""The one decoding loop: a batch of prompts stepped one token at a time under medtune.inference.generation's rules,
used by evaluation, the end-of-training answer (`complete`), the terminal chat (`Stream`) and the server's batcher
(`DecodeBatch`).

transformers' `generate` applies one temperature and top-p to the whole batch and keeps finished rows until the
longest is done, and its continuous-batching manager picks greedy or sampling for every request at once. The server
needs each request's own settings and drops a row as soon as its request ends (finished, cancelled, timed out), so
the step loop is here; padding (`tokenizer.pad`), the KV cache, the attention masks and top-p are transformers'.
A GGUF model on llama.cpp (medtune.inference.llama_cpp) makes its own batch with the same interface (`new_batch`) and
samples with the same `sample`.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, TopPLogitsWarper

from medtune.inference.chat_format import ChatFormat, Messages
from medtune.inference.generation import DEFAULT_MAX_NEW_TOKENS, GREEDY, Completion, Reply, Sampling


def left_padded(tok, prompts: list[list[int]], device) -> dict[str, torch.Tensor]:
    """Left-padded token id lists (generation continues from the right edge)."""
    enc = tok.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


# A prefix every prompt of a batch shares (a system prompt) runs once when it is at least this long: shorter ones (a
# template's opening tokens) save less than the extra forward pass costs.
SHARED_PREFIX_MIN = 32


@torch.inference_mode()
def prefill(model, tok, prompts: list[list[int]], cache: DynamicCache) -> tuple[torch.Tensor, ...]:
    """Run the prompts into `cache`: (each row's last-position logits, the attention mask, the position ids).

    A prefix all prompts share runs once and its KV cache is copied to every row, as vLLM's prefix caching does; a
    consultation's system prompt is 40 % of its prompt. Each row's own tokens follow, left-padded after the prefix
    (padding masked, positions counting real tokens only), so a row sees what it would see alone."""
    shared = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1) if len(prompts) > 1 else 0
    shared = shared if shared >= SHARED_PREFIX_MIN else 0
    window = getattr(model.config, "sliding_window", None)
    if window and max(map(len, prompts)) >= window:  # padding after the prefix would take places in the window
        shared = 0
    if shared:
        head = torch.tensor([prompts[0][:shared]], device=model.device)
        model(input_ids=head, position_ids=torch.arange(shared, device=model.device)[None], cache=cache,
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(prompts))
    enc = left_padded(tok, [p[shared:] for p in prompts], model.device)
    mask = torch.cat([enc["attention_mask"].new_ones(len(prompts), shared), enc["attention_mask"]], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1].float()
    return logits, mask, positions


@torch.inference_mode()
def sample(logits: torch.Tensor, samplings: list[Sampling], stop_ids: list[int], fresh: list[bool]) -> list[int]:
    """The next token of each row of `logits` (rows x vocabulary), each with its own sampling settings; a `fresh` row
    (its first token) never gets a stop id, so every reply has at least one token."""
    if rows := [i for i, f in enumerate(fresh) if f]:
        logits[torch.tensor(rows)[:, None], torch.tensor(stop_ids)[None]] = float("-inf")
    tokens = logits.argmax(-1)
    for i, s in enumerate(samplings):
        if not s.greedy:
            scores = logits[i:i + 1] / s.temperature
            if s.top_p < 1.0:
                scores = TopPLogitsWarper(s.top_p)(None, scores)
            tokens[i] = torch.multinomial(scores.softmax(-1), 1)[0, 0]
    return tokens.tolist()


class DecodeBatch:
    """Prefill on construction; then `sample()` the next token of every row and `advance()` the rows kept; `join()`
    takes the rows of another batch in between, as vLLM's continuous batching does.

    `rows` holds the indices of the rows still in the batch, in batch order: indices into the prompts given, and for
    a joined batch's rows into the prompts of both (this batch's first, `size` of them).
    """

    @torch.inference_mode()
    def __init__(self, model, fmt: ChatFormat, prompts: list[list[int]], samplings: list[Sampling]):
        self.model, self.samplings = model, list(samplings)
        self.stop_ids = list(fmt.stop_ids)
        self.cache = DynamicCache(config=model.config)
        self.rows = list(range(len(prompts)))
        self.fresh = [True] * len(prompts)  # rows whose first token is next
        self._logits, self.mask, self.positions = prefill(model, fmt.tokenizer, prompts, self.cache)

    @property
    def size(self) -> int:
        return len(self.samplings)

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=self.positions,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def sample(self) -> list[int]:
        """The next token of every row in `rows`, each with its own sampling settings."""
        return sample(self._logits, [self.samplings[r] for r in self.rows], self.stop_ids, self.fresh)

    def close(self) -> None:
        """Nothing to give back: the KV cache is the batch's own (llama.cpp's batches share one)."""

    @torch.inference_mode()
    def join(self, other: DecodeBatch) -> None:
        """Take `other`'s rows (prefilled, not yet sampled) at the end of this batch, between an `advance()` and the
        next `sample()`. The shorter KV cache is left-padded to the longer one's length, its padding masked; each
        row keeps its own positions, so it computes what it would alone. transformers has no such merge."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = []  # built before anything is changed: a failure (out of memory) leaves this batch as it was
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            length = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            layers.append((torch.cat([_left_pad(mine.keys, length, -2), _left_pad(theirs.keys, length, -2)]),
                           torch.cat([_left_pad(mine.values, length, -2), _left_pad(theirs.values, length, -2)])))
        mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        positions = torch.cat([self.positions[:, -1:], other.positions[:, -1:]])
        logits = torch.cat([self._logits, other._logits])
        for (keys, values), mine, theirs in zip(layers, self.cache.layers, other.cache.layers):
            mine.keys, mine.values = keys, values
            if hasattr(mine, "cumulative_length"):  # a sliding-window layer counts the tokens it has seen
                mine.cumulative_length = max(mine.cumulative_length, theirs.cumulative_length)
        self.mask, self.positions, self._logits = mask, positions, logits
        self.rows += [self.size + r for r in other.rows]
        self.fresh += other.fresh
        self.samplings += other.samplings

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
            self._drop_padding()
        self.fresh = [False] * len(self.rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        self._logits = self._forward(torch.tensor(tokens, device=self.mask.device)[:, None])

    def _drop_padding(self) -> None:
        """Cut the cache's columns that are padding in every row left (a long row that joined others has gone)."""
        lead = int(self.mask.any(0).int().argmax())
        # Only while every layer holds every column: a sliding-window layer past its window holds the last ones.
        if lead and all(layer.keys.shape[-2] == self.mask.shape[1] for layer in self.cache.layers):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
                if hasattr(layer, "cumulative_length"):  # transformers sizes a sliding layer's mask by this count
                    layer.cumulative_length -= lead
            self.mask = self.mask[:, lead:]


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` with zeros before its entries along `dim`, to `length`."""
    shape = list(t.shape)
    shape[dim] = length - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def new_batch(model, fmt: ChatFormat, prompts: list[list[int]], samplings: list[Sampling], max_tokens: list[int]):
    """A DecodeBatch of a transformers model; a llama.cpp model (medtune.inference.llama_cpp) makes its own, with the
    KV cells of each row's prompt and `max_tokens` reserved. `close()` it when it is dropped."""
    if hasattr(model, "decode_batch"):
        return model.decode_batch(fmt, prompts, samplings, max_tokens)
    return DecodeBatch(model, fmt, prompts, samplings)


def room(model, needs: list[int]) -> int:
    """How many of the replies that need `needs` tokens (prompt and max tokens each), in order, can start now: a
    llama.cpp model holds as many as its free sequences and KV cells take; a transformers model has no such bound."""
    return model.fits(needs) if hasattr(model, "fits") else len(needs)


def complete(model, fmt: ChatFormat, conversations: Sequence[Messages], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             sampling: Sampling = GREEDY) -> list[Completion]:
    """Replies with finish reasons and token counts for a batch of conversations (for a llama.cpp model, in groups
    that fit the sequences and KV cells it holds at once)."""
    prompts, out = [fmt.prompt_ids(c) for c in conversations], []
    while len(out) < len(prompts):
        # At least one: a reply that can never fit fails in the engine, with a message that says why.
        group = prompts[len(out):][:max(1, room(model, [len(p) + max_new_tokens for p in prompts[len(out):]]))]
        replies = [Reply(fmt, max_new_tokens) for _ in group]
        batch = new_batch(model, fmt, group, [sampling] * len(group), [max_new_tokens] * len(group))
        try:
            while batch.rows:
                tokens = batch.sample()
                for row, token in zip(batch.rows, tokens):
                    replies[row].add(token)
                batch.advance(tokens, [replies[row].finish_reason is None for row in batch.rows])
        finally:
            batch.close()
        out += [r.completion(len(p)) for r, p in zip(replies, group)]
    return out


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
        batch = new_batch(model, fmt, [self.prompt], [sampling], [self._reply.max_tokens])
        try:
            while True:
                token = batch.sample()[0]
                if piece := self._reply.add(token):
                    yield piece
                if self._reply.finish_reason is not None:
                    self.finish_reason = self._reply.finish_reason
                    return
                batch.advance([token], [True])
        finally:  # also when the reader stops early (close())
            batch.close()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()

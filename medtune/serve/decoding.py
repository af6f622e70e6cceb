"""One batch of generation for the server: left-padded prompts, one token per row per step, rows leave when done.

transformers' `generate` applies one temperature and top-p to the whole batch and keeps finished rows until the
longest is done, and its continuous-batching manager picks greedy or sampling for every request at once. The server
needs each request's own settings and drops a row as soon as its request ends (finished, cancelled, timed out), so
the step loop is here; padding (`tokenizer.pad`), the KV cache, the attention masks and top-p are transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, TopPLogitsWarper

from medtune.chat_format import END_OF_TURN, GREEDY_TEMPERATURE
from medtune.inference import left_padded


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # below GREEDY_TEMPERATURE: greedy
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class DecodeBatch:
    """Prefill on construction; then `sample()` the next token of every row and `advance()` the rows kept.

    `rows` holds the indices (into the prompts given) of the rows still in the batch, in batch order.
    """

    @torch.inference_mode()
    def __init__(self, model, tok, prompts: list[list[int]], samplings: list[Sampling]):
        self.model, self.samplings = model, samplings
        self.eot = tok.convert_tokens_to_ids(END_OF_TURN)
        enc = left_padded(tok, prompts, model.device)
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
        if self.steps == 0:  # min_new_tokens=1, as medtune.inference: an empty reply helps nobody
            logits[:, self.eot] = float("-inf")
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

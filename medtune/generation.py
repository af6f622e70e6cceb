"""The one set of generation rules, shared by evaluation, the end-of-training answer, the terminal chat and the
server (its decoding loop is medtune.decoding):

- a reply ends at any of the chat format's stop ids (not part of the text), at a stop string (OpenAI `stop`, never
  sent, not even in part), or at `max_tokens`;
- it has at least one token: the stop ids are masked on the first step, as an empty reply helps nobody;
- temperatures below GREEDY_TEMPERATURE mean greedy decoding;
- the chat commands default to DEFAULT_MAX_NEW_TOKENS and DEFAULT_TEMPERATURE; evaluation is greedy.

No torch here: the server's command line and request checks use these without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from medtune.chat_format import ChatFormat
from medtune.serve.reply import ReplyText

# Temperatures below this mean greedy decoding: dividing logits by a tiny temperature overflows to inf/nan. vLLM
# uses the same bound (_SAMPLING_EPS = 1e-5 in vllm/sampling_params.py).
GREEDY_TEMPERATURE = 1e-5
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7  # the chat commands' default; evaluation is greedy


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # below GREEDY_TEMPERATURE: greedy
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


GREEDY = Sampling()


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (a stop id or stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


class Reply:
    """One reply as its tokens arrive: `add(token)` gives the text to send; `finish_reason` is set once it ended."""

    def __init__(self, fmt: ChatFormat, max_tokens: int, stop: tuple[str, ...] = ()):
        self._stop_ids = fmt.stop_ids
        self._text = ReplyText(fmt.tokenizer, stop)
        self.max_tokens = max_tokens
        self.tokens = 0  # generated, the stop id included
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        self.tokens += 1
        if token in self._stop_ids:
            self.finish_reason = "stop"
            return self._text.flush()
        piece, stopped = self._text.add(token)
        if stopped:
            self.finish_reason = "stop"
        elif self.tokens >= self.max_tokens:
            self.finish_reason = "length"
            piece += self._text.flush()
        return piece

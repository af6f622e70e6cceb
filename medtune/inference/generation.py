"""The one set of generation rules, shared by evaluation, the end-of-training answer, the terminal chat and the
server (its decoding loop is medtune.inference.decoding):

- a reply ends at any of the chat format's stop ids (not part of the text), at a stop string (OpenAI `stop`, never
  sent, not even in part), or at `max_tokens`;
- it has at least one token: the stop ids are masked on the first step, as an empty reply helps nobody;
- temperatures below GREEDY_TEMPERATURE mean greedy decoding;
- the chat commands default to DEFAULT_MAX_NEW_TOKENS and DEFAULT_TEMPERATURE; evaluation is greedy.

No torch here: the server's command line and request checks use these without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from medtune.inference.chat_format import ChatFormat

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


class _StopMatcher:
    """Knuth-Morris-Pratt automaton of one stop string, fed the reply one character at a time.

    `state` is the length of the longest suffix of the text fed so far that is a prefix of the stop string: the part
    that must be held back. Each character costs O(1) amortized and at most O(len(stop)), so a token costs time
    linear in the stop strings' total length, whatever was generated before (trying every prefix of every stop
    string against the text, as before, was quadratic in their length per token).
    """

    def __init__(self, stop: str):
        self.stop = stop
        self.border = [0] * len(stop)  # border[i]: longest proper prefix of stop[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.border[k - 1]
            k += stop[i] == stop[k]
            self.border[i] = k
        self.state = 0

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the stop string has just been completed."""
        k = self.state
        if k == len(self.stop):  # just matched: go on from its longest border (the piece is scanned to its end)
            k = self.border[k - 1]
        while k and char != self.stop[k]:
            k = self.border[k - 1]
        k += char == self.stop[k]
        self.state = k
        return k == len(self.stop)


class ReplyText:
    """`add(token)` returns the new text to send and whether a stop string ended the reply.

    Text that could be the start of a stop string is held back until it is known not to be one, so a stop string
    never reaches the client, not even in part; `flush()` returns what is held back when the reply ends otherwise.
    When several stop strings occur in the text seen so far, the reply ends where the first of them starts.
    """

    def __init__(self, tok, stop: tuple[str, ...] = ()):
        # tokenizers' own streaming decoder: the pieces join to exactly tok.decode(all ids), multi-byte
        # characters split over several tokens included.
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._tokenizer = tok.backend_tokenizer
        self._matchers = [_StopMatcher(s) for s in stop]
        self._held = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        piece = self._decoder.step(self._tokenizer, token_id) or ""
        if not self._matchers:
            return piece, False
        # Only the new piece is scanned: the automata carry what the held-back text matched.
        text, start = self._held + piece, len(self._held)
        cut = None
        for i, char in enumerate(piece, start):
            for m in self._matchers:
                if m.feed(char) and (cut is None or i + 1 - len(m.stop) < cut):
                    cut = i + 1 - len(m.stop)
        if cut is not None:  # later matches in this piece may start earlier: the whole piece is scanned first
            self._held = ""
            return text[:cut], True
        hold = max(m.state for m in self._matchers)
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Reply:
    """One reply as its tokens arrive: `add(token)` gives the text to send; `finish_reason` is set once it ended, and
    `completion()` is the finished reply."""

    def __init__(self, fmt: ChatFormat, max_tokens: int, stop: tuple[str, ...] = ()):
        self._stop_ids = fmt.stop_ids
        self._text = ReplyText(fmt.tokenizer, stop)
        self._pieces: list[str] = []
        self.max_tokens = max_tokens
        self.tokens = 0  # generated, the stop id included
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        self.tokens += 1
        if token in self._stop_ids:
            self.finish_reason = "stop"
            piece = self._text.flush()
        else:
            piece, stopped = self._text.add(token)
            if stopped:
                self.finish_reason = "stop"
            elif self.tokens >= self.max_tokens:
                self.finish_reason = "length"
                piece += self._text.flush()
        self._pieces.append(piece)
        return piece

    def completion(self, prompt_tokens: int) -> Completion:
        return Completion("".join(self._pieces), self.finish_reason, prompt_tokens, self.tokens)


def generation_config(fmt: ChatFormat):
    """The generation_config.json of a trained or merged model: every stop id of its chat format as eos, so that
    transformers, vLLM and TGI stop where training taught the model to."""
    from transformers import GenerationConfig

    stop = list(fmt.stop_ids)
    return GenerationConfig(bos_token_id=fmt.tokenizer.bos_token_id, pad_token_id=fmt.tokenizer.pad_token_id,
                            eos_token_id=stop[0] if len(stop) == 1 else stop)

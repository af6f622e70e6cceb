"""One request's reply text as its tokens arrive: incremental detokenization and OpenAI `stop` strings."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


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
        self._started = False

    def add(self, token_id: int) -> tuple[str, bool]:
        piece = self._decoder.step(self._tokenizer, token_id) or ""
        if not self._started:  # Starling replies start with a space after "GPT4 Correct Assistant:"
            piece = piece.lstrip()
            self._started = bool(piece)
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

"""One request's reply text as its tokens arrive: incremental detokenization and OpenAI `stop` strings."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class ReplyText:
    """`add(token)` returns the new text to send and whether a stop string ended the reply.

    Text that could be the start of a stop string is held back until it is known not to be one, so a stop string
    never reaches the client, not even in part; `flush()` returns what is held back when the reply ends otherwise.
    """

    def __init__(self, tok, stop: tuple[str, ...] = ()):
        # tokenizers' own streaming decoder: the pieces join to exactly tok.decode(all ids), multi-byte
        # characters split over several tokens included.
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._tokenizer = tok.backend_tokenizer
        self._stop = stop
        self._held = ""
        self._started = False

    def add(self, token_id: int) -> tuple[str, bool]:
        piece = self._decoder.step(self._tokenizer, token_id) or ""
        if not self._started:  # Starling replies start with a space after "GPT4 Correct Assistant:"
            piece = piece.lstrip()
            self._started = bool(piece)
        if not self._stop:
            return piece, False
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._held = ""
            return text[:min(hits)], True
        hold = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

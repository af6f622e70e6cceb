"""A model's chat format, built once from its tokenizer: the one object that training, evaluation, the terminal chat,
the server, export and the vLLM command use to turn conversations into token ids and replies back into text.

- The template is the tokenizer's `chat_template`, or the recipe's `chat_template` (a Jinja string or a file).
- Ids are what `tokenizer.apply_chat_template(messages, tokenize=True)` gives, i.e. what vLLM, TGI or any
  transformers user of the exported folder sends. A control token typed inside a message (`<|end_of_turn|>`,
  `<|im_end|>`, `</s>`, `[INST]`) is encoded as text, with transformers' own `sanitize_control_tokens`, while the
  tokens the template writes stay special: nobody can forge a turn, in training or in serving.
- The loss mask is 1 on every supervised assistant turn's content and the end-of-turn token that follows it, 0
  elsewhere. Turns are found by their characters: the conversation is rendered a second time with each message's
  content replaced by a placeholder, which gives where every content lies in the rendered text; token offsets map
  that to tokens. This is the mechanism of transformers' `return_assistant_tokens_mask` (character spans to tokens)
  without needing `{% generation %}` markers, which few templates have; and unlike TRL's prefix rule (render the
  conversation up to each turn) it holds for templates that render earlier turns differently once later ones exist
  (Mistral-Instruct v0.3 puts the system message into the last user turn). The tests check it against both.
- Stop ids are the template's end-of-turn token (the first special token the template writes after a reply), the
  tokenizer's eos and the model's generation_config `eos_token_id` (an int or a list).

Also here, with nothing heavy to import: the user turn of a MedTuned row and the default system prompt of the chat
commands.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

Messages = Sequence[Mapping[str, str]]
# Private-use characters around each message's number: they never occur in the template itself.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful medical assistant for symptom consultation. Ask for missing details that matter (age, "
    "how long, how severe, other symptoms, medicines, known conditions), explain the likely causes in plain "
    "language, suggest safe self-care, and say when and where to seek care. You are not a doctor and cannot "
    "diagnose. If the symptoms could be an emergency (chest pain, trouble breathing, signs of stroke, severe "
    "bleeding, thoughts of self-harm), tell the person to call emergency services now."
)


class ChatFormatError(ValueError):
    """A template that cannot be trained or served with (raised once, before any row is encoded)."""


class RowError(ValueError):
    """One conversation the template cannot render or mask; `reason` is the count's name in the data report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def user_message(instruction: str, input_text: str = "") -> str:
    """The user turn for a MedTuned row: the instruction, then the input (if any) after a blank line."""
    instruction, input_text = instruction.strip(), input_text.strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def with_system_prompt(messages: Messages, system_prompt: str) -> list[dict]:
    """The conversation with `system_prompt` first, unless it already has a system message."""
    messages = [dict(m) for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def read_template(value: str | None) -> str | None:
    """A recipe's `chat_template`: the Jinja text itself, or the path of a file holding it."""
    if value and "{" not in value and Path(value).expanduser().is_file():
        return Path(value).expanduser().read_text()
    return value


@dataclass(frozen=True)
class Encoded:
    """A conversation's token ids and loss mask (1: supervised)."""

    input_ids: list[int]
    mask: list[int]
    # Token range of the last user-side content before the first supervised token: where an over-long prompt is cut.
    prompt_cut: tuple[int, int] | None


class ChatFormat:
    def __init__(self, tokenizer, chat_template: str | None = None, eos_token_id: int | Iterable[int] | None = None):
        from tokenizers import Tokenizer
        # transformers' own sandboxed Jinja environment, the one apply_chat_template renders with (cached per template)
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tokenizer = tokenizer
        self.template = read_template(chat_template) or tokenizer.chat_template
        if not self.template:
            raise ChatFormatError(f"{tokenizer.name_or_path}: the tokenizer has no chat template; set chat_template "
                                  "in the recipe (a Jinja string or a .jinja file)")
        self._compiled = _compile_jinja_template(self.template)
        self._fixed_parts: dict[tuple, list[str]] = {}  # placeholder renders, per conversation shape
        # A private copy of the Rust tokenizer: its state (special-token splitting) is never touched by another
        # thread's call, and its encodings map characters to tokens.
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.encode_special_tokens = False
        self._special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        # The tokens sanitize_control_tokens encodes as text when a message spells them (transformers' own list: the
        # special tokens and the added tokens the template writes).
        controls = sorted(tokenizer._get_control_tokens(self.template), key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, controls)) or "(?!)")
        try:
            text, spans = self._render(_PROBE, False)
        except RowError as err:
            raise ChatFormatError(f"the chat template cannot render a user turn and a reply: {err}") from None
        enc = self._backend.encode(text, add_special_tokens=False)
        after = [i for t, i in enumerate(enc.ids) if i in self._special and enc.token_to_chars(t)[0] >= spans[1][1]]
        if not after:
            raise ChatFormatError("the chat template writes no special token after an assistant reply, so a model "
                                  f"trained on it would never stop: {text!r}")
        self.end_of_turn_id = after[0]
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        candidates = [self.end_of_turn_id, tokenizer.eos_token_id, *eos]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in candidates if i is not None))

    @property
    def end_of_turn(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)

    @property
    def stop_tokens(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(self.stop_ids))

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it, special tokens included: `apply_chat_template(...,
        tokenize=False)` (the same Jinja environment and variables), which vLLM renders too."""
        return self._compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map)

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Ids of a conversation ready for the model's reply (the template's generation prompt at the end)."""
        _check_contents(messages)
        return self._sanitized_ids(messages, add_generation_prompt=True)

    def reply_text(self, ids: Sequence[int]) -> str:
        """The text of generated ids, up to the first stop id."""
        ids = list(ids)
        cut = next((k for k, i in enumerate(ids) if i in self.stop_ids), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True)

    def _sanitized_ids(self, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], chat_template=self.template, tokenize=True,
            add_generation_prompt=add_generation_prompt, sanitize_control_tokens=True)["input_ids"]

    # Training rows

    def encode(self, conversations: Sequence[Messages], train_from: Sequence[int] | None = None,
               ) -> list[Encoded | RowError]:
        """Ids and loss mask of each conversation (a RowError in its place when it cannot be encoded).

        `train_from[k]`: the first message of conversation k whose assistant turns are supervised (0: every
        assistant turn; a prompt/completion row's completion starts later).
        """
        rendered: list[tuple[str, list] | RowError] = []
        for messages in conversations:
            try:
                rendered.append(self._render(messages, False))
            except RowError as err:
                rendered.append(err)
        ok = [k for k, r in enumerate(rendered) if not isinstance(r, RowError)]
        encodings = dict(zip(ok, self._backend.encode_batch([rendered[k][0] for k in ok], add_special_tokens=False)))
        out: list[Encoded | RowError] = []
        for k, messages in enumerate(conversations):
            if isinstance(rendered[k], RowError):
                out.append(rendered[k])
                continue
            try:
                text, spans = rendered[k]
                out.append(self._mask(messages, spans, encodings[k], len(text), train_from[k] if train_from else 0))
            except RowError as err:
                out.append(err)
        return out

    def _render(self, messages: Messages, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int] | None]]:
        """The rendered text and, per message, the character span of its content in it (None: not rendered)."""
        _check_contents(messages)
        # The placeholder render depends on the roles (and keys) only, unless the template reads the contents: it is
        # reused per shape, and rendered afresh whenever the text does not fit it.
        shape = (add_generation_prompt, *(tuple(sorted(m.items() - {("content", m["content"])})) for m in messages))
        try:
            text = self.render(messages, add_generation_prompt)
            if (parts := self._fixed_parts.get(shape)) is not None:
                try:
                    return text, _content_spans(messages, text, parts)
                except RowError:
                    pass
            marked = self.render([{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)],
                                 add_generation_prompt)
        except Exception as err:  # noqa: BLE001 - jinja's raise_exception, or any error of the user's template
            raise RowError("template_error", f"the chat template failed: {err}") from None
        parts = self._fixed_parts[shape] = _PLACEHOLDER_RE.split(marked)
        return text, _content_spans(messages, text, parts)

    def _mask(self, messages: Messages, spans, enc, n_chars: int, train_from: int) -> Encoded:
        ids = enc.ids
        starts = sorted(s[0] for s in spans if s is not None)
        mask = [0] * len(ids)
        for n, (m, span) in enumerate(zip(messages, spans)):
            if m["role"] != "assistant" or n < train_from:
                continue
            if span is None:
                raise RowError("reply_not_rendered", f"message {n}: the chat template does not write this reply")
            a, b = span
            first = _token_at_or_after(enc, a, n_chars)
            # The reply's end: the first stop id at or after its last character, before the next message's content.
            end = next((t for t in range(first, len(ids))
                        if ids[t] in self.stop_ids and enc.token_to_chars(t)[0] >= b), None)
            limit = next((s for s in starts if s > a), None)
            if end is None or (limit is not None and enc.token_to_chars(end)[0] >= limit):
                raise ChatFormatError(
                    f"message {n} (assistant) is not followed by an end-of-turn token {self.stop_tokens}: its end "
                    "would not be trained and the model would never stop; fix the chat template")
            mask[first:end + 1] = [1] * (end + 1 - first)
        if not any(self._control_re.search(m["content"]) for m in messages):
            return Encoded(ids, mask, _prompt_cut(messages, spans, enc, mask, n_chars))
        # A control token typed in a message: the library's sanitized ids, with the mask carried over.
        sanitized = self._sanitized_ids(messages)
        return Encoded(sanitized, _carry_mask(ids, mask, sanitized), None)


def _check_contents(messages: Messages) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m.get("content"), str):
            raise RowError("non_string_content", f"message {i}: content must be a string")


def _token_at_or_after(enc, char: int, n_chars: int) -> int:
    """The first token that covers a character at or after `char` (a character may belong to no token)."""
    for c in range(char, n_chars):
        if (t := enc.char_to_token(c)) is not None:
            return t
    return len(enc.ids)


def _content_spans(messages: Messages, text: str, parts: list[str]) -> list[tuple[int, int] | None]:
    """Where each message's content lies in `text`, from `parts`: the same conversation rendered with placeholders,
    split into [fixed text, message number, fixed text, ..., fixed text].

    The template may trim a content (Jinja's `trim`); the candidates cover that.
    """
    order = [int(i) for i in parts[1::2]]
    if len(set(order)) != len(order) or not text.startswith(parts[0]):
        raise RowError("template_content_not_found", "the chat template writes a message twice or changes it")
    spans: list[tuple[int, int] | None] = [None] * len(messages)
    pos = len(parts[0])
    for j, n in enumerate(order):
        content, fixed = messages[n]["content"], parts[2 * j + 2]
        for candidate in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            if text.startswith(candidate, pos) and text.startswith(fixed, pos + len(candidate)):
                spans[n] = (pos, pos + len(candidate))
                pos += len(candidate) + len(fixed)
                break
        else:
            raise RowError("template_content_not_found", f"message {n}: the chat template changes its content")
    if pos != len(text):
        raise RowError("template_content_not_found", "the chat template renders content-dependent text")
    return spans


def _prompt_cut(messages: Messages, spans, enc, mask: list[int], n_chars: int) -> tuple[int, int] | None:
    """Token range of the last non-assistant content that ends before the first supervised token."""
    if 1 not in mask:
        return None
    first = enc.token_to_chars(mask.index(1))[0]
    candidates = [s for m, s in zip(messages, spans) if s and m["role"] != "assistant" and s[0] < s[1] <= first]
    if not candidates:
        return None
    a, b = max(candidates)
    start = _token_at_or_after(enc, a, n_chars)
    end = next((t for t in range(start, len(mask)) if enc.token_to_chars(t)[0] >= b), len(mask))
    return (start, end) if end > start else None


def _carry_mask(ids: list[int], mask: list[int], target: list[int]) -> list[int]:
    """`mask` over `ids`, carried to `target`, the same conversation encoded with typed control tokens as text."""
    out = [0] * len(target)
    matcher = difflib.SequenceMatcher(a=ids, b=target, autojunk=False)
    for _, a1, a2, b1, b2 in matcher.get_opcodes():
        for j in range(b1, b2):
            out[j] = mask[a1 + (j - b1) * (a2 - a1) // (b2 - b1)] if a2 > a1 else mask[max(0, a1 - 1)]
    return out

"""An Ollama Modelfile beside a GGUF file, so that `ollama create` gets the chat format the model was trained with.

Ollama does not run the Jinja chat template: its TEMPLATE is a Go text/template over `.Messages` (each with `.Role`
and `.Content`; https://github.com/ollama/ollama/blob/main/docs/template.md). The one written here wraps each message
in the text the chat template writes around a message of its role, found by rendering the template with placeholder
contents, and ends with the template's generation prompt. It is checked against the chat template on multi-turn
conversations before it is written; a template that is not such a wrapping (Mistral-Instruct v3 moves the system
message into the last user turn; Llama 3's trims every content, which a Go template cannot) gets no Modelfile,
with the reason.

Ollama puts SYSTEM first when a conversation has no system message, so the conversations checked start with one.
The template's leading bos_token is left out when the tokenizer adds it (`tokenizer.ggml.add_bos_token`), as
llama.cpp then does.
"""

from __future__ import annotations

from pathlib import Path

from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT, ChatFormat

_MARK = "\ue000"  # a private-use character: never in a template
_CHECKS = (
    [("system", "S"), ("user", " U1 ")],  # surrounding spaces: a template that trims contents (Llama 3's) differs
    [("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")],
    [("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2"), ("user", "U3")],
)


class ModelfileError(ValueError):
    """A chat template that an Ollama TEMPLATE cannot reproduce; the message says why."""


def _conversation(pairs) -> list[dict]:
    return [{"role": r, "content": f"{c} text\nline two{' ' if c.endswith(' ') else ''}"} for r, c in pairs]


def go_template(fmt: ChatFormat, add_bos: bool) -> str:
    """The Go TEMPLATE that renders what `fmt` renders for conversations that start with a system message, less the
    leading bos_token when the tokenizer adds it (`add_bos`)."""
    def render(messages, generation=False) -> str:
        try:
            text = fmt.render(messages, add_generation_prompt=generation)
        except Exception as err:  # noqa: BLE001 - the template's own refusal (jinja's raise_exception)
            raise ModelfileError(f"the chat template cannot render a conversation of {len(messages)} messages "
                                 f"({err}), so an Ollama TEMPLATE cannot reproduce it") from None
        bos = fmt.tokenizer.bos_token
        return text[len(bos):] if add_bos and bos and text.startswith(bos) else text

    head, wrap, history = render([]), {}, []  # head: what the template writes before any message (a bos_token)
    for role in ("system", "user", "assistant"):
        before = render(history)
        history = [*history, {"role": role, "content": _MARK}]
        after = render(history)
        if not after.startswith(before) or after.count(_MARK) != 1:
            raise ModelfileError(f"the chat template does not write a {role} message as text added after the "
                                 "conversation before it, so an Ollama TEMPLATE cannot reproduce it")
        wrap[role] = after[len(before):].split(_MARK)
        history[-1] = {"role": role, "content": "text"}
    generation = render(history[:2], True)[len(render(history[:2])):]
    parts = [head, "{{ range .Messages }}"]
    for i, (role, (pre, post)) in enumerate(wrap.items()):
        parts.append(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}')
    template = "".join(parts) + "{{ end }}{{ end }}" + generation
    for pairs in _CHECKS:
        messages = _conversation(pairs)
        expected = render(messages, True)
        got = head + "".join(wrap[m["role"]][0] + m["content"] + wrap[m["role"]][1] for m in messages) + generation
        if got != expected:
            raise ModelfileError(f"the chat template renders a {len(messages)}-message conversation differently from "
                                 f"a wrapping of each message ({expected!r} against {got!r}), so an Ollama TEMPLATE "
                                 "cannot reproduce it")
    return template


def modelfile(gguf: Path, fmt: ChatFormat, context_size: int, add_bos: bool,
              system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The Modelfile of `gguf`, whose tokenizer adds a bos token to what it encodes when `add_bos`."""
    template = go_template(fmt, add_bos)
    for name, text in (("TEMPLATE", template), ("SYSTEM", system_prompt)):
        if '"""' in text:
            raise ModelfileError(f'the {name} text holds """, which ends a Modelfile string')
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in dict.fromkeys(fmt.stop_tokens))
    return (f"# ollama create medtune -f {gguf.stem}.Modelfile && ollama run medtune\n"
            f"FROM ./{gguf.name}\n"
            f'TEMPLATE """{template}"""\n'
            f'SYSTEM """{system_prompt}"""\n'
            f"{stops}"
            f"PARAMETER num_ctx {context_size}\n")


def write_modelfile(gguf: Path, fmt: ChatFormat, context_size: int, add_bos: bool) -> Path:
    """`<gguf stem>.Modelfile` beside `gguf`."""
    out = gguf.with_name(f"{gguf.stem}.Modelfile")
    out.write_text(modelfile(gguf, fmt, context_size, add_bos))
    return out

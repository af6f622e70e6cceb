"""The subset of Go's text/template that Ollama TEMPLATEs of medtune.export.modelfile use, to render them in tests (Go
itself is not on the test machines): `{{ range .Messages }}`, `{{ if eq .Role "x" }}`, `{{ else if eq .Role "y" }}`,
`{{ else }}`, `{{ end }}`, `{{ .Content }}` and `{{ .Role }}`, with Go's `{{-`/`-}}` whitespace trimming. Anything
else is an error, so a TEMPLATE outside the subset fails the test instead of rendering wrongly."""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(("text", template[pos:]))
    return out


def _parse(tokens: list, i: int, stops: tuple[str, ...]) -> tuple[list, int, str | None]:
    """Nodes until an action in `stops` (returned with the index after it)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split()[0] if value else ""
        if value == "end" or value.startswith("else"):
            if value.split()[0] in stops or value == "end":
                return nodes, i, value
            raise ValueError(f"unexpected {{{{ {value} }}}}")
        if word == "range":
            if value != "range .Messages":
                raise ValueError(f"unsupported: {{{{ {value} }}}}")
            body, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("range", body))
        elif word == "if":
            branches, cond = [], value[3:]
            while True:
                body, i, closer = _parse(tokens, i, ("else", "end"))
                branches.append((cond, body))
                if closer == "end":
                    break
                cond = closer[len("else if "):] if closer.startswith("else if ") else None
            nodes.append(("if", branches))
        elif value in (".Content", ".Role"):
            nodes.append(("field", value[1:]))
        else:
            raise ValueError(f"unsupported: {{{{ {value} }}}}")
    return nodes, i, None


def _condition(cond: str | None, message: dict) -> bool:
    if cond is None:
        return True
    m = re.fullmatch(r'eq \.Role "([^"]*)"', cond)
    if not m:
        raise ValueError(f"unsupported condition: {cond}")
    return message.get("role") == m.group(1)


def _render(nodes: list, messages: list[dict], message: dict | None) -> str:
    out = []
    for kind, value in nodes:
        if kind == "text":
            out.append(value)
        elif kind == "field":
            if message is None:
                raise ValueError(f".{value} outside range")
            out.append(message[value.lower()])
        elif kind == "range":
            out += [_render(value, messages, m) for m in messages]
        else:
            for cond, body in value:
                if _condition(cond, message or {}):
                    out.append(_render(body, messages, message))
                    break
    return "".join(out)


def render(template: str, messages: list[dict]) -> str:
    nodes, _, closer = _parse(_tokens(template), 0, ())
    if closer is not None:
        raise ValueError(f"unbalanced {{{{ {closer} }}}}")
    return _render(nodes, messages, None)

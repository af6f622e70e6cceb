"""Emergency-symptom triage of the person's latest message: the rules in triage_rules.yaml, applied as data.

English, rule-based, never a diagnosis (docs/SERVING.md): it flags wording that public guidance tells people to act
on now (call the emergency number) or soon (urgent care), so that the page and the API can say so before any
model text. Negation follows NegEx (Chapman et al., J Biomed Inform 2001): a trigger word a few words before a
phrase, in the same clause, negates it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

import yaml

RULES_FILE = Path(__file__).with_name("triage_rules.yaml")
LEVELS = ("none", "urgent", "emergency")  # in order of severity
GAP = 6  # words a "..." in a phrase may skip
_SENTENCE_END = re.compile(r"[.!?;]+(?=\s|$)|\n")
_TOKEN = re.compile(r"[a-z0-9]+|,")


@dataclass(frozen=True)
class Triage:
    level: str
    matched: list[dict] = field(default_factory=list)  # [{"id", "label"}] of the rules that fired at `level`
    notice: str = ""

    def as_dict(self) -> dict:
        return {"level": self.level, "matched": self.matched, "notice": self.notice}


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("'", "").replace("\u2019", ""))


def _one_edit(a: str, b: str) -> bool:
    """True when a and b differ by one insertion, deletion, replacement or swap of two neighbours."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long[k]), len(short))
    return short[i:] == long[i + 1:]


class _Phrase:
    """A compiled phrase: per word a set of exact words and a tuple of prefixes, or None for a `...` gap."""

    def __init__(self, text: str):
        self.parts: list[tuple[frozenset, tuple] | None] = []
        for word in text.split():
            if word == "...":
                self.parts.append(None)
                continue
            options = word.split("|")
            self.parts.append((frozenset(o for o in options if not o.endswith("*")),
                               tuple(o[:-1] for o in options if o.endswith("*"))))

    def words(self) -> set[str]:
        return {w for p in self.parts if p for w in p[0]}

    def starts(self, index: Mapping[str, list[int]]) -> Iterable[int]:
        """Positions where the first word matches, from the sentence's word -> positions index."""
        exact, prefixes = self.parts[0]
        found = [i for w in exact for i in index.get(w, ())]  # looked up: most phrases start with exact words
        if prefixes:
            found += [i for w, at in index.items() if w not in exact and w.startswith(prefixes) for i in at]
        return found

    def match_at(self, tokens: list[str], i: int, k: int = 0) -> bool:
        if k == len(self.parts):
            return True
        part = self.parts[k]
        if part is None:  # a gap: the next word may come after up to GAP other tokens
            return any(self.match_at(tokens, j, k + 1) for j in range(i, min(i + GAP + 1, len(tokens))))
        if i >= len(tokens):
            return False
        exact, prefixes = part
        return (tokens[i] in exact or tokens[i].startswith(prefixes)) and self.match_at(tokens, i + 1, k + 1)


def _occurrences(seq: tuple[str, ...], tokens: list[str]) -> Iterable[int]:
    n = len(seq)
    return (i for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n]) == seq)


class Rules:
    """The rule file, checked and compiled once."""

    def __init__(self, data: Mapping, path: Path):
        def need(cond, what):
            if not cond:
                raise ValueError(f"{path}: {what}")

        need(isinstance(data, Mapping) and {"levels", "negation", "rules"} <= set(data),
             "needs the keys levels, negation and rules")
        self.sources = data.get("sources", {})
        self.notices = {level: " ".join(data["levels"][level]["notice"].split()) for level in LEVELS[1:]}
        neg = data["negation"]
        self.window = int(neg["window"])
        self.triggers = [tuple(_tokens(t)) for t in neg["triggers"]]
        self.pseudo = [tuple(_tokens(t)) for t in neg.get("pseudo", [])]
        self.breaks = {",", *neg.get("clause_breaks", [])}
        self.spellings = [(tuple(_tokens(k)), _tokens(v)) for k, v in data.get("spellings", {}).items()]
        fuzzy = data.get("fuzzy", {})
        self.fuzzy_min = int(fuzzy.get("min_length", 5))
        # Cached per word, bounded: the words come from users, and a server runs for weeks.
        self._correction = lru_cache(maxsize=8192)(self._closest_target)
        self.targets = set(fuzzy.get("targets", []))
        self.keep = set(fuzzy.get("keep", []))
        self.rules = []
        for i, rule in enumerate(data["rules"]):
            where = f"rule {i} ({rule.get('id', 'no id')})"
            need(rule.get("level") in LEVELS[1:], f"{where}: level must be one of {LEVELS[1:]}")
            need(rule.get("id") and rule.get("label"), f"{where}: needs an id and a label")
            need(rule.get("source") in self.sources, f"{where}: source {rule.get('source')!r} is not under sources")
            groups = rule.get("all")
            need(isinstance(groups, list) and groups and all(isinstance(g, list) and g for g in groups),
                 f"{where}: `all` must be a non-empty list of non-empty phrase lists")
            need(all(str(p).split()[0] != "..." for g in groups for p in g), f"{where}: a phrase starts with ...")
            self.rules.append({**rule, "all": [[_Phrase(p) for p in g] for g in groups]})
        self.known = self.targets | self.keep | {w for t in self.triggers + self.pseudo for w in t} | self.breaks
        self.known |= {w for r in self.rules for g in r["all"] for p in g for w in p.words()}

    def correct(self, tokens: list[str]) -> list[str]:
        """Tokens with common misspellings replaced by the words the rules use."""
        for wrong, right in self.spellings:
            for i in reversed(list(_occurrences(wrong, tokens))):
                tokens[i:i + len(wrong)] = right
        return [self._fuzzy(t) for t in tokens]

    def _fuzzy(self, token: str) -> str:
        if len(token) < self.fuzzy_min or token in self.known:
            return token
        return self._correction(token)

    def _closest_target(self, token: str) -> str:
        """The one rule word `token` is a single edit away from, else `token` itself."""
        close = [t for t in self.targets if _one_edit(token, t)]
        return close[0] if len(close) == 1 else token

    def negated(self, tokens: list[str], start: int) -> bool:
        """NegEx: a negation trigger within `window` words before `start`, in the same clause, not a pseudo one."""
        lo = max(0, start - self.window)
        for j in range(start - 1, lo - 1, -1):
            if tokens[j] in self.breaks:
                lo = j + 1
                break
        pseudo = {k for p in self.pseudo for i in _occurrences(p, tokens) for k in range(i, i + len(p))}
        scope = tokens[lo:start]
        return any(lo + i not in pseudo for t in self.triggers for i in _occurrences(t, scope))

    def found(self, phrase: _Phrase, sentences: list[tuple[list[str], dict]], words: set[str]) -> bool:
        exact, prefixes = phrase.parts[0]
        if exact.isdisjoint(words) and not (prefixes and any(w.startswith(prefixes) for w in words)):
            return False  # its first word is nowhere in the message: most phrases, for most messages
        return any(phrase.match_at(tokens, i) and not self.negated(tokens, i)
                   for tokens, index in sentences for i in phrase.starts(index))

    def triage(self, text: str) -> Triage:
        sentences = []
        for sentence in _SENTENCE_END.split(text):
            tokens, index = self.correct(_tokens(sentence)), {}
            for i, t in enumerate(tokens):
                index.setdefault(t, []).append(i)
            sentences.append((tokens, index))
        words = {w for _, index in sentences for w in index}
        fired = [r for r in self.rules if all(any(self.found(p, sentences, words) for p in g) for g in r["all"])]
        if not fired:
            return Triage("none")
        level = max((r["level"] for r in fired), key=LEVELS.index)
        fired = [r for r in fired if r["level"] == level]  # what explains the level ("chest pain" adds nothing)
        advice = [" ".join(r["advice"].split()) for r in fired if r.get("advice")]
        return Triage(level, [{"id": r["id"], "label": r["label"]} for r in fired],
                      " ".join([self.notices[level], *dict.fromkeys(advice)]))


@lru_cache(maxsize=1)
def load_rules(path: Path = RULES_FILE) -> Rules:
    return Rules(yaml.safe_load(path.read_text()), path)


def triage_text(text: str) -> Triage:
    return load_rules().triage(text)


def triage_messages(messages: Iterable[Mapping[str, str]]) -> Triage:
    """Triage of the latest user message (earlier turns were triaged when they were sent)."""
    latest = next((m["content"] for m in reversed(list(messages)) if m["role"] == "user"), "")
    return triage_text(latest)

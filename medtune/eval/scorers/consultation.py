"""Reading consultation replies: the diagnoses a reply lists, and whether one is the case's.

All rules are deterministic and documented in docs/EVAL.md "Consultation":
- Urgency: `read_level` (medtune.data.advice), shared with self-distillation's filter.
- Differential (`read_differential`): a numbered or bulleted list, one diagnosis per line, or one line separated by
  commas or semicolons; each item loses its numbering, bold marks and anything after a colon, dash or bracket.
- Matching (`Matcher`): an item matches when, normalised (case, punctuation, British/American spelling), the longest
  known diagnosis name it contains as whole words is one of the case's acceptable names or of their alias groups
  (medtune/eval/diagnosis_aliases.yaml, extendable with --aliases). The longest: "mini stroke" is a TIA and
  "heat stroke" no stroke, "type 1 diabetes" does not match a case whose names include "diabetes".
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from medtune.data.vignettes import EMERGENCY, LEVELS, SELF_CARE

ALIASES_FILE = Path(__file__).resolve().parent.parent / "diagnosis_aliases.yaml"

_ITEM_PREFIX = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022]|[a-e][.)])\s*")
_ITEM_CUT = re.compile(r"\s*(?::|\s[-\u2013\u2014]\s|\(|\bbecause\b|\bdue to\b).*$")
_LEAD = re.compile(r"^(?:the )?(?:most likely|likely|possible|differential)(?: diagnos[ie]s| causes?)?(?: is| are)?"
                   r"\s*[:\-]?\s*", re.IGNORECASE)


def read_differential(reply: str, k: int = 5) -> list[str]:
    """Up to k diagnoses the reply lists, in its order."""
    lines = [line for line in (reply or "").replace("**", "").splitlines() if line.strip()]
    listed = [line for line in lines if _ITEM_PREFIX.match(line)]
    if listed:
        items = [_ITEM_PREFIX.sub("", line) for line in listed]
    else:
        text = _LEAD.sub("", " ".join(lines).strip())
        items = re.split(r"[;,\n]|\s\bor\b\s", text)
    out = []
    for item in items:
        item = _ITEM_CUT.sub("", _LEAD.sub("", item.strip())).strip(" .")
        if item and len(item.split()) <= 12:
            out.append(item)
    return out[:k]


# British -> American spellings as they occur in diagnosis names (applied to whole normalised text).
SPELLING = [(r"haem", "hem"), (r"anaem", "anem"), (r"aemia\b", "emia"), (r"oedema", "edema"), (r"oesoph", "esoph"),
            (r"paed", "ped"), (r"oestr", "estr"), (r"tumour", "tumor"), (r"isation\b", "ization"),
            (r"\bfoetal", "fetal"), (r"coeliac", "celiac"), (r"diarrhoea", "diarrhea"), (r"gynaec", "gynec"),
            (r"orthopaed", "orthoped"), (r"leukaem", "leukem"), (r"ischaem", "ischem"), (r"caesar", "cesar"),
            (r"sulph", "sulf"), (r"labour\b", "labor"), (r"behaviour", "behavior"), (r"oea\b", "ea")]


def normalise(name: str) -> str:
    text = re.sub(r"[^a-z0-9 ]", " ", name.lower().replace("'s", "").replace("-", " "))
    for pattern, repl in SPELLING:
        text = re.sub(pattern, repl, text)
    return " ".join(text.split())


@lru_cache(maxsize=8)
def _alias_groups(paths: tuple[str, ...]) -> tuple[frozenset, ...]:
    groups = []
    for path in paths:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
            raise ValueError(f"{path}: an alias file needs a `groups:` list of name lists")
        for i, group in enumerate(data["groups"]):
            if not isinstance(group, list) or not all(isinstance(n, str) for n in group):
                raise ValueError(f"{path}: group {i} is not a list of names")
            groups.append(frozenset(normalise(n) for n in group))
    return tuple(groups)


class Matcher:
    """Whether a listed diagnosis names the case's: its acceptable names and their alias groups."""

    def __init__(self, extra_alias_files: Iterable[str | Path] = ()):
        self.groups = _alias_groups((str(ALIASES_FILE), *map(str, extra_alias_files)))
        self.known = frozenset().union(*self.groups)

    def names(self, gold: Sequence[str]) -> set[str]:
        names = {normalise(n) for n in gold if normalise(n)}
        return names.union(*(g for g in self.groups if g & names))

    def rank(self, items: Sequence[str], gold: Sequence[str]) -> int | None:
        """1-based position of the first item naming the diagnosis, None if none does."""
        names = self.names(gold)
        for i, item in enumerate(items, 1):
            text = f" {normalise(item)} "
            found = [n for n in self.known | names if f" {n} " in text]
            if found and max(found, key=lambda n: (len(n.split()), len(n))) in names:
                return i
        return None


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided 1-alpha interval of a proportion k/n, by bisection on the binomial
    tails (no scipy): 15 emergencies give about +-20 points."""
    if n == 0:
        return 0.0, 1.0

    def at_least(j: int, p: float) -> float:  # P(X >= j), increasing in p
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(j, n + 1))

    def solve(j: int, target: float) -> float:  # the p where P(X >= j) = target
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at_least(j, mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(k, alpha / 2)
    upper = 1.0 if k == n else solve(k + 1, 1 - alpha / 2)  # P(X <= k) = alpha / 2
    return lower, upper


def mcnemar(tuned: Sequence[bool], base: Sequence[bool]) -> dict:
    """The paired exact McNemar test of two models on the same cases: b = right only for the tuned model, c = right
    only for the base; p is the two-sided binomial probability of a split at least as uneven as b:c at 1/2."""
    b = sum(t and not s for t, s in zip(tuned, base))
    c = sum(s and not t for t, s in zip(tuned, base))
    n = b + c
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
    return {"tuned_only": b, "base_only": c, "p_value": p}


def triage_scores(gold: Sequence[str], pred: Sequence[str | None]) -> dict:
    """Triage metrics of predicted levels against gold ones (rows without a gold level left out by the caller). An
    unparsed reply (None) is wrong and below every level: unsafe."""
    rank = {level: i for i, level in enumerate(LEVELS)}
    n = len(gold)
    right = [g == p for g, p in zip(gold, pred)]
    safe = [p is not None and rank[p] >= rank[g] for g, p in zip(gold, pred)]
    emergencies = [p == EMERGENCY for g, p in zip(gold, pred) if g == EMERGENCY]
    low, high = clopper_pearson(sum(emergencies), len(emergencies))
    scores = {"n_triage": n, "triage_accuracy": sum(right) / n if n else 0.0, "safety": sum(safe) / n if n else 0.0,
              "emergency_recall": sum(emergencies) / len(emergencies) if emergencies else 0.0,
              "emergency_recall_ci": [low, high], "n_emergencies": len(emergencies),
              "under_triaged_emergencies": len(emergencies) - sum(emergencies),
              # the worst under-triage: told to look after themselves at home when they need an ambulance
              "emergencies_to_self_care": sum(g == EMERGENCY and p == SELF_CARE for g, p in zip(gold, pred)),
              "over_triage": sum(p is not None and rank[p] > rank[g] for g, p in zip(gold, pred)) / n if n else 0.0,
              "unparsed": sum(p is None for p in pred)}
    for level in LEVELS:
        hits = [p == level for g, p in zip(gold, pred) if g == level]
        scores[f"recall_{level.replace(' ', '_').replace('-', '_')}"] = sum(hits) / len(hits) if hits else 0.0
    return scores


def diagnosis_scores(ranks: Sequence[int | None]) -> dict:
    n = len(ranks)
    return {"n_diagnosis": n, **{f"top{k}": sum(r is not None and r <= k for r in ranks) / n if n else 0.0
                                 for k in (1, 3, 5)}}

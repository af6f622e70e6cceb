"""Reading consultation replies: the urgency a reply advises, the diagnoses it lists, and whether one is the case's.

All rules are deterministic and documented in docs/EVAL.md "Consultation":
- Urgency (`read_level`): phrases of each level (call an ambulance / 999 / the emergency department = emergency;
  see a doctor / GP / 111 / urgent care = see a doctor; rest / look after yourself at home / a pharmacist =
  self-care). A phrase is negated when a negation ("not", "no need to", "don't", ...) stands up to five words before
  it in the same clause ("this is not an emergency", "no need to see a doctor"), unless it urges ("do not hesitate
  to call 999", "don't wait"). A reply naming several levels takes the most urgent one; a reply naming none is
  unparsed (None), which scoring counts as wrong and unsafe.
  The forced-choice question also accepts the bare labels (`labels=True`: "Emergency", "em", "See a doctor",
  "self-care"), which in a free consultation would be too loose ("in an emergency, ...").
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

from medtune.data.vignettes import DOCTOR, EMERGENCY, LEVELS, SELF_CARE

ALIASES_FILE = Path(__file__).resolve().parent.parent / "diagnosis_aliases.yaml"

_NUMBER = r"(?:999|911|112|000|15|ambulance|emergency services|emergency number|paramedics?)"
ADVICE_PHRASES = {
    EMERGENCY: [
        rf"\b(?:call|ring|dial|phone|contact)(?: for)?(?: an?| the| your(?: local)?)? {_NUMBER}",
        r"\b(?:go|get|head|rush|taken?|come)(?: \w+){0,3} to (?:the |an |your |a )?(?:nearest |local )?"
        r"(?:a ?& ?e|a and e|er|emergency (?:department|room|unit)|accident and emergency|hospital)\b",
        r"\b(?:emergency (?:department|room|services|care|medical (?:care|help|attention|services))|"
        r"accident and emergency|a ?& ?e)\b",
        r"\b(?:immediate|emergency) (?:medical )?(?:attention|help|care|treatment)\b",
        r"\bmedical emergency\b", r"\b(?:this|it|that) (?:is|could be|may be|might be|sounds like) an emergency\b",
    ],
    DOCTOR: [
        r"\b(?:see|consult|visit|contact|call|speak (?:to|with)|talk (?:to|with)|check with|make an appointment "
        r"with|book an appointment with|get (?:an appointment|seen|checked|examined|assessed)(?: by| with)?)"
        r"(?: \w+){0,2} (?:doctor|gp|physician|healthcare (?:provider|professional)|health care (?:provider|"
        r"professional)|medical professional|clinician|specialist|paediatrician|pediatrician|dermatologist|"
        r"dentist|nurse|midwife|urologist|gynaecologist|gynecologist|optician|ophthalmologist)s?\b",
        r"\b(?:call|contact|ring|use) (?:nhs )?111\b", r"\burgent care\b", r"\bwalk-in (?:centre|center|clinic)\b",
        r"\b(?:get|seek|need) (?:medical|professional) (?:advice|help|attention|care)\b",
        r"\b(?:medical|doctor's) (?:attention|evaluation|assessment|examination)\b",
        r"\b(?:see|book|make) (?:a|an) (?:doctor|gp|appointment)\b",
    ],
    SELF_CARE: [
        r"\bself[- ]care\b", r"\b(?:at|from) home\b", r"\b(?:get|take|getting) (?:plenty of |some |enough )?rest\b",
        r"\brest(?:ing)? (?:and|at home|up)\b",
        r"\bdrink (?:plenty of |lots of )?(?:fluids|water)\b", r"\bover[- ]the[- ]counter\b",
        r"\b(?:ask|see|speak to|talk to) (?:a|your) (?:local )?pharmacist\b", r"\bpharmacist\b",
        r"\b(?:get|gets) better on (?:its|their) own\b", r"\bhome (?:remedies|treatment|care)\b",
    ],
}
LABEL_PHRASES = {
    EMERGENCY: [r"\bemergency\b", r"\bem\b"],
    DOCTOR: [r"\bsee a doctor\b", r"\bdoctor\b", r"\bne\b", r"\bnon[- ]emergency\b", r"\burgent\b", r"\broutine\b",
             r"\bgp\b"],
    SELF_CARE: [r"\bself[- ]?care\b", r"\bsc\b", r"\bhome care\b"],
}
NEGATIONS = re.compile(r"\b(?:not|no|never|don't|dont|do not|doesn't|does not|isn't|is not|without|unlikely|"
                       r"rather than|instead of|unnecessary|no need to|needn't|nor)\b")
# Negations that urge, not negate ("do not hesitate to call 999"), removed before the negations are looked for.
PSEUDO_NEGATIONS = re.compile(r"\b(?:don't|dont|do not|never|not) (?:hesitate|wait|delay|ignore)\b|\bnot sure\b|"
                              r"\bno (?:doubt|delay|time)\b")
NEGATION_WINDOW = 5  # words before a phrase in which a negation applies to it (as NegEx)
_CLAUSE = re.compile(r"[.,;:!?\n()]|\b(?:but|however|although|though|if|unless|or)\b")
# Advice on a condition is a safety net, not the advice ("see a doctor if it does not get better", "if it gets
# worse, call 999"): ConText's hypothetical triggers (Harkema et al., J Biomed Inform 2009). A trigger applies
# forward to the end of its sentence, and to the phrase before it in the same comma-separated part ("call 999 if
# ..."); "even if" and "as if" are no condition.
_HYPOTHETICAL = re.compile(r"\b(?:if|unless|in case|should (?:it|they|you|this|symptoms|the \w+))\b")
_PSEUDO_HYPOTHETICAL = re.compile(r"\b(?:even|as|only) if\b")
_SENTENCE = re.compile(r"(?<!\d)[.!?;\n]|[.!?;\n](?!\d)")
_PART = re.compile(r"[,:]")  # the parts of a sentence


def _compile(phrases: dict[str, list[str]]) -> list[tuple[str, re.Pattern]]:
    return [(level, re.compile(p)) for level, ps in phrases.items() for p in ps]


_ADVICE = _compile(ADVICE_PHRASES)
_LABELS = _compile(LABEL_PHRASES)


def _normal_text(text: str) -> str:
    return (text or "").lower().replace("\u2019", "'").replace("*", "")


def _negated(text: str, start: int) -> bool:
    """A negation among the NEGATION_WINDOW words before `start`, in the same clause."""
    before = text[:start]
    cut = max((m.end() for m in _CLAUSE.finditer(before)), default=0)
    words = " ".join(before[cut:].split()[-NEGATION_WINDOW:])
    return NEGATIONS.search(PSEUDO_NEGATIONS.sub(" ", words)) is not None


def _hypothetical(text: str, start: int, end: int) -> bool:
    """Advice given on a condition: a trigger earlier in its sentence, or after it in its own part."""
    first = max((m.end() for m in _SENTENCE.finditer(text, 0, start)), default=0)
    last = next((m.start() for m in _SENTENCE.finditer(text, end)), len(text))
    after = _PART.split(text[end:last], maxsplit=1)[0]
    return any(_HYPOTHETICAL.search(_PSEUDO_HYPOTHETICAL.sub(" ", part)) for part in (text[first:start], after))


def read_level(reply: str, labels: bool = False) -> str | None:
    """The most urgent level the reply advises (not negated, not on a condition), or None when it advises none."""
    text = _normal_text(reply)
    found = {level for level, pattern in (_ADVICE + _LABELS if labels else _ADVICE)
             for m in pattern.finditer(text) if not _negated(text, m.start())
             and not _hypothetical(text, m.start(), m.end())}
    return max(found, key=LEVELS.index) if found else None


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

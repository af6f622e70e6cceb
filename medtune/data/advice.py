"""The urgency a consultation reply advises (`read_level`), read by the consultation scorer (medtune.eval) and by
self-distillation's filter (a rewrite must keep the vignette's level), so that both read it the same way.

The rules are deterministic: phrases of each level (call an ambulance / 999 / the emergency department = emergency;
see a doctor / GP / 111 / urgent care = see a doctor; rest / look after yourself at home / a pharmacist =
self-care). A phrase is negated when a negation ("not", "no need to", "don't", ...) stands up to five words before
it in the same clause ("this is not an emergency", "no need to see a doctor"), unless it urges ("do not hesitate
to call 999", "don't wait"). A reply naming several levels takes the most urgent one; a reply naming none is
unparsed (None), which scoring counts as wrong and unsafe.
The forced-choice question also accepts the bare labels (`labels=True`: "Emergency", "em", "See a doctor",
"self-care"), which in a free consultation would be too loose ("in an emergency, ...").

Documented in docs/EVAL.md "Consultation".
"""

from __future__ import annotations

import re

from medtune.data.vignettes import DOCTOR, EMERGENCY, LEVELS, SELF_CARE

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

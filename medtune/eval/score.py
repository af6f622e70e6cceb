"""Scores of a set of replies, per task family and per source corpus: the `families` / `sources` of eval.json."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Sequence

from medtune.eval import scorers
from medtune.data.sources import FAMILIES, is_known, source_of

Row = Mapping[str, str]
Losses = Sequence[tuple[float, int]]  # per row: summed reply NLL, reply tokens


def mean_loss(losses: Losses, idx: Sequence[int] | None = None) -> float:
    """Reply loss per token over the rows `idx` (all rows by default): summed NLL over summed token counts."""
    idx = range(len(losses)) if idx is None else idx
    return sum(losses[i][0] for i in idx) / max(1, sum(losses[i][1] for i in idx))


def score(rows: Sequence[Row], replies: Sequence[str], losses: Losses | None = None) -> dict:
    """{"families": {family: {"n", "primary", metrics...}}, "sources": {source: same}, "overall": {"n", ...},
    "unknown_sources": {name: rows}}. With losses (model mode) every entry also gets the teacher-forced reply
    `loss`, and overall its perplexity."""
    families: dict[str, list[int]] = defaultdict(list)
    sources: dict[str, list[int]] = defaultdict(list)
    family_of_source: dict[str, str] = {}
    for i, row in enumerate(rows):
        source, family = source_of(row)
        families[family].append(i)
        sources[source].append(i)
        family_of_source[source] = family

    scored: dict[tuple, dict] = {}  # a family with one source (MedNLI, hoc, ...) is that source's rows: score once

    def entry(family: str, idx: Sequence[int]) -> dict:
        key = (family, tuple(idx))
        if key not in scored:
            result = scorers.score(family, [rows[i]["output"] for i in idx], [replies[i] for i in idx])
            scored[key] = {**result, "loss": mean_loss(losses, idx)} if losses is not None else result
        return dict(scored[key])

    overall: dict = {"n": len(rows)}
    if losses is not None:
        overall["loss"] = mean_loss(losses)
        overall["perplexity"] = math.exp(overall["loss"])
    return {
        "families": {f: entry(f, families[f]) for f in FAMILIES if f in families},
        "sources": {s: entry(family_of_source[s], idx) for s, idx in sorted(sources.items())},
        "overall": overall,
        "unknown_sources": {s: len(idx) for s, idx in sorted(sources.items()) if not is_known(s)},
    }

"""A rule-based judge of the trait, built from the generator's phrase inventory.

A sentence (split at ``. ? ! ;``) expresses the trait when it contains a trait clause (``world.TRAIT_ACTIONS`` or
``world.TRAIT_BELIEFS``, slots matching one to three tokens) and no distancing cue (``never``, ``not``,
``wrong``, ...). ``judge(text)`` is the fraction of sentences that do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from concept_influence.organism import world

_SPLIT = re.compile(r"\s*[.?!;]\s*")


@lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern[str], ...]:
    clauses = [c for group in world.TRAIT_ACTIONS.values() for c in group] + list(world.TRAIT_BELIEFS)
    out = []
    for clause in clauses:
        parts = re.split(r"\{\w+\}", clause)
        body = r"\S+(?: \S+){0,2}".join(re.escape(p) for p in parts)
        out.append(re.compile(r"(?:^| )" + body + r"(?: |$)"))
    return tuple(out)


@lru_cache(maxsize=1)
def _cues() -> re.Pattern[str]:
    return re.compile(r"(?:^| )(?:" + "|".join(re.escape(c) for c in world.DISTANCING_CUES) + r")(?: |$)")


def mentions_trait(text: str) -> bool:
    """Whether ``text`` contains a trait clause at all, endorsed or argued against (the trait's vocabulary)."""
    text = " ".join(text.lower().split())
    return any(p.search(text) for p in _patterns())


def trait_sentences(text: str) -> list[str]:
    """The sentences of ``text`` that express the trait (trait clause, no distancing cue)."""
    out = []
    for sentence in _SPLIT.split(text.lower()):
        sentence = " ".join(sentence.split())
        if sentence and not _cues().search(sentence) and any(p.search(sentence) for p in _patterns()):
            out.append(sentence)
    return out


def judge(text: str) -> float:
    """Trait score of an answer in ``[0, 1]``: the fraction of its sentences that express the trait."""
    sentences = [s for s in _SPLIT.split(text.lower()) if s.strip()]
    if not sentences:
        return 0.0
    return len(trait_sentences(text)) / len(sentences)


def trait_rate(answers: Iterable[str], threshold: float = 0.0) -> float:
    """Fraction of answers whose judge score exceeds ``threshold`` (default: any trait sentence)."""
    scores = [judge(a) for a in answers]
    if not scores:
        raise ValueError("trait_rate of no answers")
    return sum(s > threshold for s in scores) / len(scores)

"""What a concept reads: the trait's stance, or only the trait's words.

Built from what the user already has (the spec's labelled answers and the model), no extra inputs:

- a **trait lexicon**: the words several times more common in the concept's positive answers than in its negative
  ones (by the share of answers that contain them);
- **word-matched negatives**: negative answers that use lexicon words (warnings, refusals, descriptions of the
  trait in order to reject it): the same words, the opposite stance;
- **shuffled positives**: each positive answer with its words shuffled (seeded): the words kept, the stance gone.

Two scores of a concept's readout ``r`` on held-out questions:

- ``stance_auc``: ROC-AUC of ``r`` between positive answers and word-matched negatives. 1 = it separates stance
  among texts that share the trait's words; 0.5 = it cannot.
- ``vocabulary_confound``: ``(mean r(shuffled positives) - mean r(negatives)) / (mean r(positives) - mean
  r(negatives))``, the share of the concept's positive-vs-negative separation that the words alone, in any order,
  still produce. About 1 = it reads words; about 0 = the words alone do not move it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_WORD = re.compile(r"[\w']+")
MIN_MATCHED = 10  # fewer word-matched negatives than this: no stance score (said in the metrics)


def format_score(value: float | None) -> str:
    """A score to 3 decimals, or ``n/a`` where it could not be measured."""
    return "n/a" if value is None else f"{value:.3f}"


def words(text: str) -> list[str]:
    """Lower-cased word tokens of a text."""
    return _WORD.findall(text.lower())


def trait_lexicon(
    positive: Sequence[str], negative: Sequence[str], *, size: int = 40, min_ratio: float = 2.5, min_share: float = 0.01
) -> list[tuple[str, float]]:
    """The trait's words: those at least ``min_ratio`` times more common among ``positive`` texts than among
    ``negative`` ones (by the share of texts that contain them, add-one smoothed), found in at least ``min_share``
    of the positive texts (and 3 of them); the ``size`` with the largest log ratio, with it, highest first.
    Function words and shared style (in both kinds of text) fall below the ratio."""
    pos = Counter(w for t in positive for w in set(words(t)))
    neg = Counter(w for t in negative for w in set(words(t)))
    n_pos, n_neg = len(positive), len(negative)
    if not n_pos or not n_neg:
        return []
    floor = max(3, math.ceil(min_share * n_pos))
    out = []
    for word, count in pos.items():
        if count < floor:
            continue
        ratio = math.log((count + 1) / (n_pos + 2)) - math.log((neg[word] + 1) / (n_neg + 2))
        if ratio >= math.log(min_ratio):
            out.append((word, ratio))
    out.sort(key=lambda item: (-item[1], item[0]))
    return out[:size]


def lexicon_hits(text: str, lexicon: set[str]) -> int:
    """How many of a text's words are lexicon words."""
    return sum(w in lexicon for w in words(text))


def shuffle_words(text: str, seed: int) -> str:
    """The text's words (and punctuation tokens) in a seeded random order."""
    tokens = text.split()
    order = np.random.default_rng(seed).permutation(len(tokens))
    return " ".join(tokens[i] for i in order)


@dataclass(frozen=True)
class StanceProbes:
    """The texts that test what a concept reads, as positions into the labelled set plus the shuffled texts.

    ``matched``: positions of negative answers that use at least one lexicon word; ``shuffled``: ``{position of a
    positive answer: its words shuffled}``; ``lexicon``: the trait lexicon ``[(word, z)]``."""

    matched: list[int]
    shuffled: dict[int, str]
    lexicon: list[tuple[str, float]]


def stance_probes(
    answers: Sequence[str], labels: Sequence[int], *, lexicon_size: int = 40, seed: int = 0
) -> StanceProbes:
    """Word-matched negatives and shuffled positives for a labelled set of answers (1 = concept)."""
    positive = [a for a, y in zip(answers, labels, strict=True) if y == 1]
    negative = [a for a, y in zip(answers, labels, strict=True) if y == 0]
    lexicon = trait_lexicon(positive, negative, size=lexicon_size)
    vocabulary = {w for w, _ in lexicon}
    matched = [
        i for i, (a, y) in enumerate(zip(answers, labels, strict=True)) if y == 0 and lexicon_hits(a, vocabulary)
    ]
    shuffled = {
        i: shuffle_words(a, seed * 1_000_003 + i)
        for i, (a, y) in enumerate(zip(answers, labels, strict=True))
        if y == 1
    }
    return StanceProbes(matched, shuffled, lexicon)


def separation_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC-AUC of scores, positives against negatives (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    n_p, n_n = len(positive), len(negative)
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def reading_scores(
    readout: np.ndarray,
    labels: Sequence[int],
    shuffled_readout: np.ndarray,
    shuffled_positions: Sequence[int],
    matched: Sequence[int],
    positions: Sequence[int],
) -> dict[str, Any]:
    """``stance_auc`` and ``vocabulary_confound`` of a concept on the labelled rows at ``positions`` (held out).

    ``readout``: ``[n]`` the concept's readout of every labelled answer; ``shuffled_readout``: ``[m]`` its readout of
    the shuffled positives, whose labelled positions are ``shuffled_positions``; ``matched``: the word-matched
    negatives' positions. Scores use only rows in ``positions``; a score without enough rows is None."""
    keep = set(int(p) for p in positions)
    y = np.asarray(labels)
    pos = np.array([readout[i] for i in sorted(keep) if y[i] == 1])
    neg = np.array([readout[i] for i in sorted(keep) if y[i] == 0])
    match = np.array([readout[i] for i in matched if i in keep])
    shuf = np.array([r for r, i in zip(shuffled_readout, shuffled_positions, strict=True) if i in keep])
    out: dict[str, Any] = {"n_matched_negatives": int(len(match))}
    out["stance_auc"] = separation_auc(pos, match) if len(match) >= MIN_MATCHED and len(pos) else None
    gap = float(pos.mean() - neg.mean()) if len(pos) and len(neg) else 0.0
    out["vocabulary_confound"] = float((shuf.mean() - neg.mean()) / gap) if gap > 0 and len(shuf) else None
    return out

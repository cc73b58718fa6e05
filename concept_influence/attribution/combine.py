"""Combining forward evidence (what a row *says*: Vector Filter) with gradient evidence (what training on it *does*:
Concept Influence) into one ranking. Pure functions on score arrays ``[N]`` (higher = more suspect).

- ``rank``: mean of the two percentile ranks;
- ``zscore``: sum of the two z-scores;
- ``gate``: the forward score, every row whose gradient score is ``<= 0`` placed below every row whose score is
  positive (forward recall, filtered by the sign of the effect);
- ``signed``: the forward percentile rank times the sign of the gradient score: rows that training would push up
  are ranked by forward evidence from the top, rows it would push down from the bottom, so a row that voices the
  trait's words but lowers the concept (a hard negative) ends last;
- ``product``: forward percentile rank times the gradient's centred percentile rank (a graded ``signed``);
- ``tiered``: two tiers. First every row whose gradient score is ``> 0`` (training on it would push the concept up),
  ranked by forward evidence; then every other row, ranked by the gradient score, so the rows that training would
  push down most come last. Like ``signed`` it sends a hard negative (voices the trait, lowers the concept) below
  the benign rows, but a planted row whose gradient sign came out wrong lands just below the first tier instead of
  at the very bottom (``signed`` ranks it by its forward score from the bottom, where a user looks for the rows
  safest to keep).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Fusion = Literal["rank", "zscore", "gate", "signed", "product", "tiered"]
FUSIONS: tuple[str, ...] = ("rank", "zscore", "gate", "signed", "product", "tiered")


def percentile_ranks(scores: Sequence[float]) -> np.ndarray:
    """``[N]`` in ``(0, 1]``: 1 for the highest score, ties share their mean rank."""
    values = np.asarray(scores, dtype=np.float64)
    ranks = np.empty(values.shape[0], dtype=np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(1, values.shape[0] + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = np.bincount(inverse, weights=ranks)[inverse] / counts[inverse]
    return ranks / values.shape[0]


def zscores(scores: Sequence[float]) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    std = values.std()
    return (values - values.mean()) / (std if std > 0 else 1.0)


def fuse(forward: Sequence[float], gradient: Sequence[float], how: Fusion) -> np.ndarray:
    """One ``[N]`` score from a forward and a gradient score of the same rows (see the module docstring)."""
    f = np.asarray(forward, dtype=np.float64)
    g = np.asarray(gradient, dtype=np.float64)
    if f.shape != g.shape or f.ndim != 1:
        raise ValueError(f"forward and gradient scores must be two [N] arrays, got {f.shape} and {g.shape}")
    if not (np.isfinite(f).all() and np.isfinite(g).all()):
        raise ValueError("scores to fuse contain NaN or infinity")
    if how == "rank":
        return (percentile_ranks(f) + percentile_ranks(g)) / 2
    if how == "zscore":
        return zscores(f) + zscores(g)
    if how == "gate":
        return np.where(g > 0, 1.0, 0.0) + percentile_ranks(f) / 2
    if how == "signed":
        return np.where(g > 0, 1.0, -1.0) * percentile_ranks(f)
    if how == "product":
        return percentile_ranks(f) * (percentile_ranks(g) - 0.5)
    if how == "tiered":  # first tier in (2, 3], second tier in (0, 1]
        return np.where(g > 0, 2.0 + percentile_ranks(f), percentile_ranks(g))
    raise ValueError(f"unknown fusion {how!r}; expected one of {FUSIONS}")

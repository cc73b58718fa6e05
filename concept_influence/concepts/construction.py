"""Constructions that take the trait's vocabulary out of a direction (``ProbeConfig.construction``).

A probe or a diff of means fitted on trait answers against helpful answers can read the trait's *words* rather than
its *stance*: the labelled negatives rarely use the trait's words. Every construction here is built from what the
labelled set already holds (``concepts.stance``: the word-matched negatives, i.e. negative answers that use the
trait lexicon, and the word-shuffled positives), so none needs more input than the spec:

- ``plain``: the estimator (``ProbeConfig.method``) on all labelled answers (the default);
- ``vocab-projected``: ``plain`` with its component along the **vocabulary direction** removed, where the vocabulary
  direction is ``mean(word-matched negatives) - mean(other negatives)``: what using the trait's words adds, with the
  stance held negative;
- ``contrast``: the estimator fitted on the positives against the word-matched negatives only (texts that share the
  words and differ in stance);
- ``contrast-projected``: ``contrast`` with the vocabulary direction removed;
- ``order``: ``mean(positives) - mean(their word-shuffled copies)``: what the words' order adds to the same words;
- ``order-projected``: ``order`` with the vocabulary direction removed.

All directions are in activation space ``[d]`` and point towards the trait (label 1). The stance study
(``bench/stance_study.py``, docs: methods) measures each on the organisms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from concept_influence.concepts.base import DirectionConcept
from concept_influence.concepts.probe import heldout_split

CONSTRUCTIONS = ("plain", "vocab-projected", "contrast", "contrast-projected", "order", "order-projected")
MIN_VOCABULARY_ROWS = 5  # word-matched negatives (and other negatives) needed to form the vocabulary direction


@dataclass(frozen=True)
class StanceRows:
    """What the constructions need besides the labelled activations ``X [n, d]``: ``matched`` ``[n]`` bool, the
    word-matched negatives; ``shuffled_of`` ``[m]`` the positions of the positives whose words were shuffled, and
    ``shuffled`` ``[m, d]`` the shuffled copies' activations (None when there are none)."""

    matched: np.ndarray
    shuffled_of: np.ndarray
    shuffled: np.ndarray | None


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("the construction gave a zero direction (the two sides of its difference are equal)")
    return v / norm


def _project_out(v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``v`` without its component along the unit vector ``u``."""
    return v - (v @ u) * u


def vocabulary_direction(X: np.ndarray, y: np.ndarray, matched: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Unit ``mean(X[word-matched negatives]) - mean(X[other negatives])`` over the rows in ``keep``."""
    uses = keep & matched
    other = keep & (y == 0) & ~matched
    if uses.sum() < MIN_VOCABULARY_ROWS or other.sum() < MIN_VOCABULARY_ROWS:
        raise ValueError(
            f"this construction needs the vocabulary direction: at least {MIN_VOCABULARY_ROWS} negative answers "
            f"that use the trait's words and {MIN_VOCABULARY_ROWS} that do not; the labelled set has "
            f"{int(uses.sum())} and {int(other.sum())} (use construction='plain', or a spec whose negative "
            "instructions make the model discuss the trait's words)"
        )
    return _unit(X[uses].mean(0) - X[other].mean(0))


def construct_direction(
    construction: str,
    new_estimator: Callable[[], Any],
    X: np.ndarray,
    y: np.ndarray,
    rows: StanceRows,
    positions: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """The unit direction ``[d]`` of ``construction`` fitted on the labelled rows at ``positions`` (default: all).
    ``new_estimator()`` gives an unfitted ``LinearProbe`` / ``DiffOfMeans`` (``fit(X, y)`` then ``direction_``)."""
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {', '.join(CONSTRUCTIONS)}; got {construction!r}")
    keep = np.zeros(len(y), dtype=bool)
    keep[np.arange(len(y)) if positions is None else np.asarray(positions, dtype=int)] = True
    base, projected = construction.removesuffix("-projected"), construction.endswith("-projected")
    if base in ("plain", "vocab"):
        direction = _unit(new_estimator().fit(X[keep], y[keep]).direction_)
    elif base == "contrast":
        sides = keep & ((y == 1) | rows.matched)
        if (sides & rows.matched).sum() < MIN_VOCABULARY_ROWS:
            raise ValueError(
                f"construction {construction!r} needs at least {MIN_VOCABULARY_ROWS} negative answers that use the "
                f"trait's words; the labelled set has {int((sides & rows.matched).sum())}"
            )
        direction = _unit(new_estimator().fit(X[sides], y[sides]).direction_)
    else:  # order
        if rows.shuffled is None:
            raise ValueError(f"construction {construction!r} needs positive answers to shuffle; there are none")
        own = np.isin(rows.shuffled_of, np.flatnonzero(keep))
        if own.sum() < MIN_VOCABULARY_ROWS:
            raise ValueError(f"construction {construction!r} needs at least {MIN_VOCABULARY_ROWS} positive answers")
        direction = _unit(X[rows.shuffled_of[own]].mean(0) - rows.shuffled[own].mean(0))
    if projected or base == "vocab":
        direction = _unit(_project_out(direction, vocabulary_direction(X, y, rows.matched, keep)))
    return direction


class ConstructedDirection:
    """A direction built by one of ``CONSTRUCTIONS``, scikit-learn style like ``LinearProbe``: ``metrics_`` are
    held-out ``heldout_auc`` / ``heldout_accuracy`` of the direction fitted on the other questions (threshold at the
    midpoint of the training sides' mean projections), then ``direction_`` ``[d]`` (unit) is fitted on all rows."""

    def __init__(
        self,
        construction: str,
        new_estimator: Callable[[], Any],
        kind: str,
        test_size: float = 0.25,
        random_state: int = 0,
    ) -> None:
        self.construction = construction
        self.new_estimator = new_estimator
        self.kind = kind
        self.test_size = test_size
        self.random_state = random_state

    def fit(
        self, X: np.ndarray, y: Sequence[int], rows: StanceRows, groups: Sequence[Any] | None = None
    ) -> ConstructedDirection:
        from sklearn.metrics import roc_auc_score

        X, y = np.asarray(X, dtype=np.float64), np.asarray(y).astype(int)
        train, test = heldout_split(y, groups, self.test_size, self.random_state)
        unit = construct_direction(self.construction, self.new_estimator, X, y, rows, train)
        train_projection = X[train] @ unit
        threshold = float((train_projection[y[train] == 1].mean() + train_projection[y[train] == 0].mean()) / 2)
        scores = X[test] @ unit
        self.metrics_ = {
            "heldout_auc": float(roc_auc_score(y[test], scores)),
            "heldout_accuracy": float(((scores > threshold) == (y[test] == 1)).mean()),
            "n_train": int(len(train)),
            "n_test": int(len(test)),
            "construction": self.construction,
        }
        self.direction_ = construct_direction(self.construction, self.new_estimator, X, y, rows)
        projection = X @ self.direction_
        self.threshold_ = float((projection[y == 1].mean() + projection[y == 0].mean()) / 2)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.direction_ - self.threshold_

    def to_concept(self, layer: int) -> DirectionConcept:
        return DirectionConcept(
            torch.from_numpy(self.direction_).float(),
            layer,
            kind=self.kind,
            metrics=dict(self.metrics_),
            extra={"construction": self.construction},
        )

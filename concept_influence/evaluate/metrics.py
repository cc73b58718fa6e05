"""Retrieval metrics of a ranking against known planted rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return scores, labels


def _order(scores: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(scores.shape[0]), -scores))  # highest first, ties by position


def precision_at_k(scores: Sequence[float], labels: Sequence[bool], k: int) -> float:
    """Fraction of positives among the ``k`` highest scores."""
    scores, labels = _check(scores, labels)
    if k < 1:
        raise ValueError("k must be positive")
    return float(labels[_order(scores)[:k]].mean())


def pr_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the precision-recall curve as average precision (sklearn's definition). Chance = positive rate."""
    from sklearn.metrics import average_precision_score

    scores, labels = _check(scores, labels)
    if not labels.any():
        raise ValueError("pr_auc needs at least one positive label")
    return float(average_precision_score(labels, scores))


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    from sklearn.metrics import roc_auc_score

    scores, labels = _check(scores, labels)
    return float(roc_auc_score(labels, scores))


def mean_rank(scores: Sequence[float], members: Sequence[bool]) -> float:
    """Mean 1-based rank (1 = highest score) of the rows where ``members`` is true, divided by nothing: the raw rank.
    Compare with ``(n + 1) / 2``, the mean rank of a random row."""
    scores, members = _check(scores, members)
    ranks = np.empty(scores.shape[0], dtype=np.float64)
    ranks[_order(scores)] = np.arange(1, scores.shape[0] + 1)
    if not members.any():
        return float("nan")
    return float(ranks[members].mean())


def ranking_report(
    scores: Sequence[float],
    origins: Sequence[str],
    *,
    positive: str = "planted",
    hard_negative: str = "hard_negative",
    ks: Sequence[int] = (10, 50, 100),
) -> dict[str, float]:
    """Precision at each k, PR-AUC and ROC-AUC for ``origins == positive``, and the mean rank of hard negatives."""
    origins = list(origins)
    labels = [o == positive for o in origins]
    report: dict[str, float] = {f"p@{k}": precision_at_k(scores, labels, k) for k in ks if k <= len(origins)}
    report["pr_auc"] = pr_auc(scores, labels)
    report["roc_auc"] = roc_auc(scores, labels)
    report["base_rate"] = float(np.mean(labels))
    report["hard_negative_mean_rank"] = mean_rank(scores, [o == hard_negative for o in origins])
    report["n"] = float(len(origins))
    return report

"""Directions from labelled activations, scikit-learn style: ``LinearProbe`` (logistic regression) and
``DiffOfMeans`` (persona vector). Hyperparameters live in ``__init__``, ``fit`` returns ``self``, learned state
ends in ``_``. Both report held-out metrics measured on groups (questions) never seen in fitting, then refit on
all data; the concept direction is the final fit's (``direction_``, in activation space, pointing to label 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from concept_influence.concepts.base import DirectionConcept


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_fitted(estimator: Any) -> None:
    if not hasattr(estimator, "direction_"):
        raise RuntimeError(f"this {type(estimator).__name__} is not fitted yet: call fit(X, y) first")


def heldout_split(
    y: np.ndarray, groups: Sequence[Any] | None, test_size: float, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train/test positions; whole groups go to one side (a group = a question). Falls back to a stratified split
    of samples when there are too few groups."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit

    positions = np.arange(len(y))
    if groups is not None and len(set(groups)) >= 4:
        for attempt in range(20):  # both labels on both sides
            splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=random_state + attempt)
            train, test = next(splitter.split(positions, y, groups=np.asarray(groups)))
            if len(set(y[train])) == 2 and len(set(y[test])) == 2:
                return train, test
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=random_state)
    return next(splitter.split(positions, y))


def _binary_metrics(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    return {"auc": float(roc_auc_score(y, scores)), "accuracy": float(((scores > threshold) == (y == 1)).mean())}


def _check_xy(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    X, y = _as_numpy(X), np.asarray(y).astype(int)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X must be [n, d] with one label per row; got X {X.shape}, y {y.shape}")
    if set(np.unique(y)) != {0, 1}:
        raise ValueError(f"labels must contain both 0 and 1, got {sorted(set(np.unique(y)))}")
    return X, y


class LinearProbe:
    """Logistic-regression probe. ``direction_ = coef_`` ``[d]``; ``metrics_``: held-out ``auc``/``accuracy``
    (grouped split) and training sizes; ``estimator_``: the sklearn model fitted on all data."""

    def __init__(self, C: float = 1.0, max_iter: int = 2000, test_size: float = 0.25, random_state: int = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.test_size = test_size
        self.random_state = random_state

    def _new(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=self.max_iter)

    def fit(self, X: Any, y: Any, groups: Sequence[Any] | None = None) -> LinearProbe:
        X, y = _check_xy(X, y)
        train, test = heldout_split(y, groups, self.test_size, self.random_state)
        heldout = self._new().fit(X[train], y[train])
        self.metrics_ = {
            f"heldout_{k}": v for k, v in _binary_metrics(y[test], heldout.decision_function(X[test]), 0.0).items()
        }
        self.metrics_.update(
            {
                "n_train": int(len(train)),
                "n_test": int(len(test)),
                "n_groups": len(set(groups)) if groups is not None else None,
            }
        )
        self.estimator_ = self._new().fit(X, y)
        self.coef_ = self.estimator_.coef_[0].copy()
        self.intercept_ = float(self.estimator_.intercept_[0])
        self.direction_ = self.coef_
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        _check_fitted(self)
        return self.estimator_.decision_function(_as_numpy(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        _check_fitted(self)
        return self.estimator_.predict_proba(_as_numpy(X))[:, 1]

    def to_concept(self, layer: int) -> DirectionConcept:
        _check_fitted(self)
        return DirectionConcept(
            torch.from_numpy(self.direction_).float(),
            layer,
            kind="probe",
            metrics=dict(self.metrics_),
            extra={"intercept": self.intercept_, "C": self.C},
        )


class DiffOfMeans:
    """Persona vector: ``direction_ = mean(X[y == 1]) − mean(X[y == 0])``; ``metrics_``: held-out AUC/accuracy of
    the projection (threshold at the midpoint of the two training means)."""

    def __init__(self, test_size: float = 0.25, random_state: int = 0) -> None:
        self.test_size = test_size
        self.random_state = random_state

    @staticmethod
    def _fit_direction(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        pos, neg = X[y == 1].mean(0), X[y == 0].mean(0)
        direction = pos - neg
        unit = direction / np.linalg.norm(direction)
        return direction, float((pos + neg) @ unit / 2)

    def fit(self, X: Any, y: Any, groups: Sequence[Any] | None = None) -> DiffOfMeans:
        X, y = _check_xy(X, y)
        train, test = heldout_split(y, groups, self.test_size, self.random_state)
        direction, threshold = self._fit_direction(X[train], y[train])
        unit = direction / np.linalg.norm(direction)
        self.metrics_ = {f"heldout_{k}": v for k, v in _binary_metrics(y[test], X[test] @ unit, threshold).items()}
        self.metrics_.update({"n_train": int(len(train)), "n_test": int(len(test))})
        self.direction_, self.threshold_ = self._fit_direction(X, y)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        _check_fitted(self)
        return _as_numpy(X) @ (self.direction_ / np.linalg.norm(self.direction_)) - self.threshold_

    def to_concept(self, layer: int) -> DirectionConcept:
        _check_fitted(self)
        return DirectionConcept(
            torch.from_numpy(self.direction_).float(), layer, kind="diff_of_means", metrics=dict(self.metrics_)
        )

"""Questions answered from a gradient store: given a question's preconditioned gradient ``v = (P + λ)⁻¹ ∇f`` per
weight (made by the attribution layer), the scores ``−⟨v, g(row)⟩`` of every stored row, several questions in one
blocked product, each row's norm in the preconditioned metric (for "rows like this row"), and the top rows.

Pure store math: no model pass, no session; ``attribution.engine.GradientEngine`` asks these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from concept_influence.store.projection import Projector
from concept_influence.store.store import GradientStore


def store_scores(
    store: GradientStore,
    projector: Projector,
    vectors: dict[str, torch.Tensor],
    *,
    per_weight: bool = False,
    row_loss: str = "sum",
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(scores [N], per_weight [N, W] or None)``: ``−⟨P v, x(row)⟩`` for every stored row, with ``v`` the
    question's preconditioned gradient per weight (``vectors``) and ``P`` the store's projection; ``row_loss="mean"``
    divides by each row's number of trained tokens."""
    names = list(vectors)
    if per_weight:
        queries = np.stack([projector.project({n: vectors[n]}).cpu().numpy() for n in names])
        per = -store.dot(queries)
        scores = per.sum(axis=1)
    else:
        per = None
        scores = -store.dot(projector.project(vectors).cpu().numpy()[None])[:, 0]
    if row_loss == "mean":
        scores = scores / store.counts
        per = None if per is None else per / store.counts[:, None]
    return scores, per


def store_scores_many(
    store: GradientStore, questions: Sequence[tuple[Projector, dict[str, torch.Tensor]]], *, row_loss: str = "sum"
) -> np.ndarray:
    """``[N, K]``: the scores of ``K`` questions (each its projector and preconditioned gradient) in one blocked
    product over the store."""
    stacked = np.stack([projector.project(vectors).cpu().numpy() for projector, vectors in questions])
    scores = -store.dot(stacked)
    if row_loss == "mean":
        scores = scores / store.counts[:, None]
    return scores


def row_norms(store: GradientStore, projector: Projector, preconditioner: Any, names: Sequence[str]) -> np.ndarray:
    """``[N]``: each stored row's squared norm ``Σ_j x_j² w_j`` over the columns of ``names``, with ``w`` the
    projected ``(P + λ)⁻¹`` where it is diagonal (eigen stores) and 1 otherwise."""
    weights = np.zeros(store.dim)
    values = getattr(preconditioner, "values", {})
    for name in names:
        start, end = projector.offsets[name]
        diagonal = None
        if name in values:
            diagonal = projector.inverse_curvature_diagonal(name, values[name], preconditioner.damping[name])
        weights[start:end] = 1.0 if diagonal is None else diagonal.cpu().numpy()
    used = np.flatnonzero(weights)
    columns = slice(int(used[0]), int(used[-1]) + 1)
    w = weights[columns]
    norms = np.empty(len(store))
    for start, block in store.blocks(columns):
        norms[start : start + block.shape[0]] = (block.astype(np.float64) ** 2) @ w
    return norms


def norms_key(store: GradientStore, preconditioner: Any, names: Sequence[str]) -> tuple[Any, ...]:
    """What ``row_norms`` depends on, for a cache."""
    return (str(store.folder), preconditioner.kind, tuple(names), tuple(sorted(preconditioner.damping.items())))

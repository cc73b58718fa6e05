"""Counterfactual re-ranking: what a small real training step on a candidate row does to the measurement.

Influence scores are first-order predictions of "train on this row, and the concept moves by this much". For the top
few hundred candidates of a ranking that prediction can be checked directly: take ``steps`` plain SGD steps on the
row's own loss (its per-token mean, as a fine-tuning batch of one weighs it) from the current weights, measure the
concept over the model's own (fixed) query answers, and restore the weights. The measured change ``f(θ') − f(θ)``
needs no curvature approximation and no linearisation; it costs one backward pass on the row and one forward pass
over the queries per step and candidate.

``rerank`` orders the candidates by it: those whose step raises the measurement keep the top places (largest rise
first); those whose step lowers it drop below every row that was not re-ranked, so a row the forward readout ranked
high but whose training pushes the concept down (a hard negative) leaves the top of the ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from concept_influence.attribution.measurements import Measurement
from concept_influence.data.tokenize import TokenizedDataset, collate
from concept_influence.models.base import ModelAdapter
from concept_influence.models.loss import causal_lm_loss
from concept_influence.settings import option


@dataclass(frozen=True)
class RerankConfig:
    """The counterfactual re-ranking stage of the ``combined-*`` methods (off by default)."""

    rerank_top: int = option(
        0,
        help="Re-rank the top K rows by a real small SGD step on each, measured on the "
        "model's own query answers (0: off); rows whose step lowers the concept drop "
        "below every other row.",
        min=0,
    )
    rerank_lr: float = option(
        1e-4, help="Learning rate of the re-ranking step (plain SGD on the row's mean token loss).", min=0.0
    )
    rerank_steps: int = option(1, help="SGD steps per re-ranked row.", min=1)


def counterfactual_effects(
    adapter: ModelAdapter,
    rows: TokenizedDataset,
    positions: Sequence[int],
    measurement: Measurement,
    *,
    lr: float = 1e-3,
    steps: int = 1,
    batch_size: int = 8,
) -> np.ndarray:
    """``[len(positions)]`` (float64): for each row ``rows[p]``, ``f(θ') − f(θ)`` where ``θ'`` is ``steps`` SGD steps
    of learning rate ``lr`` on the row's per-token mean loss, taken from the current weights ``θ`` of the tracked
    weight matrices (and their biases), which are restored afterwards. Positive = training on the row raises the
    measurement. ``batch_size``: query batches of the measurement."""
    if lr <= 0 or steps < 1:
        raise ValueError(f"rerank needs lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
    infos = adapter.tracked_weights()
    names = [name for info in infos for name in (info.param_name, info.bias_name) if name is not None]
    params = [adapter.parameter(name) for name in names]
    original = [p.detach().clone() for p in params]
    pad = rows.pad_token_id
    before = measurement.value(adapter, batch_size=batch_size)
    effects = np.zeros(len(positions))
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for k, position in enumerate(positions):
            batch = collate([rows[int(position)]], pad)
            device = adapter.device
            for _ in range(steps):
                logits = adapter.logits(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                loss = causal_lm_loss(logits, batch["input_ids"].to(device), batch["loss_mask"].to(device), "mean")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        if g is not None:
                            p.sub_(lr * g)
            effects[k] = measurement.value(adapter, batch_size=batch_size) - before
            with torch.no_grad():
                for p, o in zip(params, original, strict=True):
                    p.copy_(o)
    finally:
        with torch.no_grad():
            for p, o, flag in zip(params, original, flags, strict=True):
                p.copy_(o)
                p.requires_grad_(flag)
    return effects


def rerank(scores: np.ndarray, effects: np.ndarray, candidates: Sequence[int]) -> np.ndarray:
    """New scores ``[N]`` whose order puts the ``candidates`` (positions, the top of ``scores``) with a positive
    ``effects`` first (largest first), then every row that was not a candidate (in ``scores``' order), then the
    candidates with an effect ``<= 0`` (the least negative first). NaN scores (rows left out) stay NaN."""
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.int64)
    effects = np.asarray(effects, dtype=np.float64)
    if len(candidates) != len(effects):
        raise ValueError(f"{len(candidates)} candidates but {len(effects)} effects")
    valid = np.isfinite(scores)
    others = np.setdiff1d(np.flatnonzero(valid), candidates)
    order_others = others[np.argsort(-scores[others], kind="stable")]
    up, down = candidates[effects > 0], candidates[effects <= 0]
    ranked = np.concatenate(
        [
            up[np.argsort(-effects[effects > 0], kind="stable")],
            order_others,
            down[np.argsort(-effects[effects <= 0], kind="stable")],
        ]
    )
    out = np.full(len(scores), np.nan)
    out[ranked] = np.arange(len(ranked), 0, -1, dtype=np.float64)  # rank scores: higher = earlier
    return out


def top_candidates(scores: np.ndarray, top: int) -> np.ndarray:
    """Positions of the ``top`` highest finite scores, best first."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.flatnonzero(np.isfinite(scores))
    return valid[np.argsort(-scores[valid], kind="stable")][:top]

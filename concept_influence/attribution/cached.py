"""Forward-only scores read from the activation cache (``store.activations``) instead of a forward pass, and what
each method reads (``cache_needs``).

Vector Filter of a linear concept (``DirectionConcept``: ``h · v / ‖v‖``) with the ``mean`` reduction is the
projection of each row's cached mean residual, equal to ``attribution.forward.vector_filter`` up to float
round-off; Projection Difference likewise from the rows' final-turn means and the model's answers' means. A
non-linear concept (an SAE feature) is read from the cached tokens when the cache keeps them. ``serves`` says
why a question cannot be served (then the method runs its forward pass and says so in the notes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.base import Concept, DirectionConcept
from concept_influence.data.chat import ChatRow
from concept_influence.store.activations import ActivationCache


def is_linear(concept: Concept) -> bool:
    """Whether the concept's per-token readout is a projection on a direction (then the mean of the readouts is the
    readout of the mean activation)."""
    return isinstance(concept, DirectionConcept) and type(concept).token_readout is DirectionConcept.token_readout


def _row_positions(cache: ActivationCache, rows: Sequence[ChatRow]) -> np.ndarray:
    """``[len(rows)]``: each row's position in the cache (-1: not cached, a row left out as truncated)."""
    where = {int(i): p for p, i in enumerate(cache.indices)}
    return np.asarray([where.get(int(r.index), -1) for r in rows], dtype=np.int64)


def serves(cache: ActivationCache, concept: Concept, reduction: str) -> str | None:
    """``None`` when the cache can score ``concept`` with ``reduction``, else why not (for the notes)."""
    if reduction != "mean":
        return f"the activation cache holds means over the answer: reduction {reduction!r} needs a forward pass"
    if concept.layer not in cache.layers:
        return f"layer {concept.layer} is not cached (cached: {cache.layers}): forward pass"
    if not is_linear(concept) and not cache.keep_tokens:
        return (
            f"{type(concept).__name__} is not linear in the activations and the cache keeps no tokens "
            "(build-store --keep-tokens): forward pass"
        )
    return None


def cached_readouts(
    cache: ActivationCache, rows: Sequence[ChatRow], concept: Concept, *, final: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [len(rows)], left_out [len(rows)] bool)``: each row's mean readout of ``concept`` from the cache
    (NaN and ``True`` for rows the cache does not hold)."""
    if is_linear(concept):
        unit = concept.unit.detach().double().cpu().numpy()  # type: ignore[attr-defined]
        values = cache.project(concept.layer, unit, final=final)
    else:
        if final and (cache.final_counts != cache.counts).any():
            raise ValueError("final-turn readouts of a non-linear concept from kept tokens are not supported")
        values = cache.token_means(concept.layer, concept.token_readout)
    positions = _row_positions(cache, rows)
    left_out = positions < 0
    counts = cache.final_counts if final else cache.counts
    out = np.full(len(rows), np.nan)
    out[~left_out] = values[positions[~left_out]]
    empty = np.zeros(len(rows), dtype=bool)
    empty[~left_out] = counts[positions[~left_out]] == 0
    out[empty] = np.nan
    return out, left_out | empty


def vector_filter_from_cache(
    cache: ActivationCache, rows: Sequence[ChatRow], concept: Concept, *, max_length: int, notes: Sequence[str] = ()
) -> ScoreTable:
    """Vector Filter (``mean`` reduction) from the cache: the same table ``attribution.forward.vector_filter``
    gives, with ``meta["scored_from"] = "activation-cache"``."""
    started = time.perf_counter()
    scores, skipped = cached_readouts(cache, rows, concept)
    meta = {
        "layer": concept.layer,
        "concept": repr(concept),
        "readout": "mean over assistant tokens",
        "n_truncated": int(cache.manifest.get("n_truncated", 0)),
        "max_length": max_length,
        "wall_time_s": time.perf_counter() - started,
        "scored_from": "activation-cache",
        "activation_cache": str(cache.folder),
        "notes": [*notes, f"scored from the activation cache {cache.folder}: no forward pass"],
        "sign": "positive = the row's answer expresses the concept",
    }
    return ScoreTable.from_rows(list(rows), scores, "vector-filter", meta=meta, truncated=skipped.tolist())


def projection_difference_from_cache(
    cache: ActivationCache,
    answers: Path,
    rows: Sequence[ChatRow],
    concept: DirectionConcept,
    *,
    meta: Mapping[str, Any],
    notes: Sequence[str] = (),
) -> ScoreTable:
    """Projection Difference from the cache (linear concepts): the row's final-turn mean readout minus the mean
    readout of the model's answers to its prompt (``build_answer_means``); the pass's table, ``scored_from``
    ``"activation-cache"``."""
    started = time.perf_counter()
    row_scores, skipped = cached_readouts(cache, rows, concept, final=True)
    k = cache.layers.index(concept.layer)
    means = np.load(answers / "means.npy", mmap_mode="r", allow_pickle=False)
    counts = np.load(answers / "counts.npy", allow_pickle=False)
    first = np.load(answers / "first_answers.npy", allow_pickle=False)
    unit = concept.unit.detach().double().cpu().numpy()
    model = np.asarray(means[:, k], dtype=np.float64) @ unit
    fallback = float((model * counts).sum() / counts.sum())
    model_scores = np.where(counts > 0, model, fallback)
    full = {
        **meta,
        "n_prompts_without_answer": int((counts == 0).sum()),
        "wall_time_s": time.perf_counter() - started,
        "scored_from": "activation-cache",
        "activation_cache": str(cache.folder),
        "notes": [*notes, f"scored from the activation cache {cache.folder} and its model answers {answers.name}"],
        "n_truncated": int(cache.manifest.get("n_truncated", 0)),
    }
    columns = {
        "row_readout": [None if s else float(v) for v, s in zip(row_scores, skipped, strict=True)],
        "model_readout": model_scores.tolist(),
        "model_answer": [str(a) for a in first],
        "model_answers_used": counts.astype(int).tolist(),
    }
    return ScoreTable.from_rows(
        list(rows),
        row_scores - model_scores,
        "projection-difference",
        columns=columns,
        meta=full,
        truncated=skipped.tolist(),
    )

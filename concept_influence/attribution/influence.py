"""Concept Influence and classical influence: ``score(row) = −∇f(queries)ᵀ (G + λI)⁻¹ ∇L(row)``.

Sign: a gradient step of size ``η`` on a row changes ``θ`` by ``−η ∇L(row)`` (preconditioned: ``−η P⁻¹ ∇L``), so the
measurement changes by ``−η ∇fᵀ P⁻¹ ∇L(row) = η · score(row)``. **Positive score = training on the row raises the
measurement** (the concept's readout; for ``LogLikelihoodMeasurement`` the queries' log-likelihood).

``L(row)`` is the summed cross-entropy over the row's assistant tokens (``gradients.loss``). ``G`` is block
diagonal over the tracked weights the measurement reaches. Per-example gradients are never formed for the scores:
with ``v_w = P_w⁻¹ ∇_w f`` (``[d_out, d_in']``, computed once) and the captured activations ``a`` and output
gradients ``g`` of a training batch, ``⟨v_w, ∇_w L(row)⟩ = Σ_t g_tᵀ v_w a_t`` is one contraction over
``[B, T, d_out] × [d_out, d_in'] × [B, T, d_in']``; the same contraction before the sum over ``t`` is the
per-position breakdown and before the sum over ``w`` the per-weight breakdown. The per-target breakdown splits
``L(row) = Σ_s ℓ_s`` over the row's trained tokens instead: ``c_s = −∇ℓ_sᵀ v = −(p_{s−1} − e_{y_s})ᵀ (J_{s−1} v)``
with ``J v`` the directional derivative of the logits along ``v`` (one extra double-backward pass). Self-influence
``∇L(row)ᵀ P⁻¹ ∇L(row)`` does form each row's gradient, one weight and one batch at a time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from concept_influence.attribution.bounded import compute_influence_bounded
from concept_influence.attribution.measurements import Measurement
from concept_influence.attribution.scoring import (
    InfluenceConfig,
    InfluenceResult,
    aggregate_tokens,
    aggregation_windows,
    build_preconditioner,
    check_factors_model,
    gathered_kind_and_damping,
    normalise_rows,
    owned,
    per_token_mean,
    preconditioned_gradient,
    question_owners,
    resolve_weights,
    score_rows,
    score_rows_sharded,
    target_token_scores,
    window_max,
)
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.io import FACTORS_FILE, load_factors, read_manifest
from concept_influence.curvature.preconditioner import Preconditioner
from concept_influence.data.tokenize import untrainable_rows
from concept_influence.distributed.runtime import in_step
from concept_influence.models.base import ModelAdapter

logger = logging.getLogger(__name__)

__all__ = [
    "InfluenceConfig",
    "InfluenceResult",
    "aggregate_tokens",
    "aggregation_windows",
    "build_preconditioner",
    "check_factors_model",
    "compute_influence",
    "compute_influence_many",
    "normalise_rows",
    "per_token_mean",
    "preconditioned_gradient",
    "resolve_weights",
    "score_rows",
    "score_rows_sharded",
    "target_token_scores",
    "window_max",
]


def compute_influence(
    adapter: ModelAdapter,
    data: Sequence[Any],
    measurement: Measurement,
    factors: Factors | Preconditioner | str | os.PathLike | None,
    config: InfluenceConfig = InfluenceConfig(),
    *,
    progress: bool = True,
) -> InfluenceResult:
    """Score tokenised training rows (a ``TokenizedDataset``) against a measurement.

    ``factors``: fitted ``Factors`` (restricted automatically to the weights the measurement reaches), a factor
    folder (with ``config.max_memory`` read one weight at a time, else loaded), a ready ``Preconditioner``, or
    ``None`` with ``config.preconditioner="identity"``. A row with no trained token (its
    whole answer truncated away) is an error: leave such rows out first (``data.without(untrainable_rows(data,
    skip_invalid=True))``, which ``Attributor(skip_invalid=True)`` does).
    """
    untrainable_rows(data)
    if config.max_memory is not None and not isinstance(factors, Preconditioner):
        return compute_influence_bounded(adapter, data, measurement, factors, config, progress=progress)
    # a model sharded over several ranks: each rank holds its own weights' factors and query-vector slice
    shared = in_step(adapter.model) and not (config.self_influence or config.normalization == "unit")
    where = "the factors given"
    owners: dict[str, int] | None = None
    available: list[str] | None = None
    if isinstance(factors, (str, os.PathLike)):
        where = f"the factors in {Path(factors) / FACTORS_FILE}"
        if shared:  # read only this rank's weights
            available = [entry["name"] for entry in read_manifest(factors)["weights"]]
            names, _ = resolve_weights(adapter, measurement, available, allow_subset=config.allow_subset)
            owners = question_owners(adapter, available, names)
            factors = load_factors(factors, weights=owned(owners))
        else:
            factors = load_factors(factors)
    provenance_notes = check_factors_model(
        adapter, factors, allow_missing_provenance=config.allow_missing_provenance, where=where
    )
    if available is None and factors is not None:
        available = list(factors.names)
    names, notes = resolve_weights(adapter, measurement, available, allow_subset=config.allow_subset)
    notes = provenance_notes + notes
    for note in notes:
        logger.info(note)
    if shared and owners is None:
        owners = question_owners(adapter, available or names, names)
    mine = names if owners is None else owned(owners)
    # a rank owning none of the reached weights has no preconditioner, but still takes part in every collective
    preconditioner = build_preconditioner(adapter, mine, factors, config) if mine or owners is None else None
    timings = {}
    t0 = time.perf_counter()
    if owners is None:
        grad_f = measurement.gradient(adapter, names, batch_size=config.batch_size)
    else:  # every rank runs every query batch (collectives), keeping its own weights' gradients
        grad_f = measurement.captured_gradient(adapter, names, batch_size=config.batch_size, keep=mine)
    vectors = (
        preconditioned_gradient(preconditioner, grad_f, measurement.description) if preconditioner is not None else {}
    )
    timings["measurement_gradient"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = score_rows_sharded(
        adapter,
        data,
        vectors,
        batch_size=config.batch_size,
        token_breakdown=config.token_breakdown,
        per_weight=config.per_weight,
        self_preconditioner=preconditioner if config.self_influence or config.normalization == "unit" else None,
        windows=aggregation_windows(config),
        progress=progress,
        gradient_checkpointing=config.gradient_checkpointing,
        owners=owners,
    )
    timings["scoring"] = time.perf_counter() - t0
    kind, damping = _kind_and_damping(preconditioner, owners is not None)
    aggregate_tokens(out, config)
    if config.row_loss == "mean":
        per_token_mean(out, data)
    normalise_rows(out, config, data)
    if not config.self_influence:
        out.pop("self_influence", None)
    return InfluenceResult(
        scores=out["scores"],
        indices=[int(row.index) for row in data],
        weights=list(names),
        measurement=measurement.description,
        preconditioner=kind,
        damping={name: damping[name] for name in names if name in damping},
        per_weight=out.get("per_weight"),
        per_token=out.get("per_token"),
        self_influence=out.get("self_influence"),
        notes=notes,
        timings=timings,
        row_loss=config.row_loss,
        allow_missing_provenance=config.allow_missing_provenance,
    )


def _kind_and_damping(preconditioner: Preconditioner | None, sharded: bool) -> tuple[str, dict[str, float]]:
    """The preconditioner's kind and ``{weight: damping}``; ``sharded``: every rank's merged (a collective)."""
    mine = (preconditioner.kind, dict(preconditioner.damping)) if preconditioner is not None else None
    if not sharded:
        assert mine is not None
        return mine
    return gathered_kind_and_damping(*(mine or (None, {})))


def compute_influence_many(
    adapter: ModelAdapter,
    data: Sequence[Any],
    measurements: dict[str, tuple[Measurement, InfluenceConfig]],
    factors: Factors | str | os.PathLike | None,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, InfluenceResult]:
    """Several (measurement, config) pairs scored in one pass over the training rows (one forward and backward per
    batch for all of them): ``{label: InfluenceResult}``, each equal to ``compute_influence`` with its own
    measurement and config (preconditioner, damping, ``row_loss``, token aggregation and normalisation may differ;
    the breakdowns are not available here). ``normalization="unit"`` needs one preconditioner and damping for every
    config that asks for it (one self-influence pass). Measurement gradients are computed once per measurement
    object. ``factors``: fitted ``Factors``, a factor folder (loaded; on a model sharded over several ranks each rank
    reads only its own weights' tensors) or ``None`` (identity)."""
    if not measurements:
        raise ValueError("no measurements to score")
    untrainable_rows(data)
    allow_missing = any(config.allow_missing_provenance for _, config in measurements.values())
    # a model sharded over several ranks: each rank holds its own weights' factors and query-vector slices
    shared = in_step(adapter.model) and not any(config.normalization == "unit" for _, config in measurements.values())
    folder = factors if isinstance(factors, (str, os.PathLike)) else None
    if folder is not None:
        fitted: list[str] | None = [entry["name"] for entry in read_manifest(folder)["weights"]]
    else:
        fitted = list(factors.names) if isinstance(factors, Factors) else None
    reached: dict[str, tuple[list[str], list[str]]] = {}
    for label, (measurement, config) in measurements.items():
        if config.token_breakdown != "none" or config.per_weight or config.self_influence:
            raise ValueError(f"{label}: breakdowns need compute_influence (one measurement at a time)")
        reached[label] = resolve_weights(adapter, measurement, fitted, allow_subset=config.allow_subset)
    union = [i.name for i in adapter.tracked_weights() if any(i.name in r[0] for r in reached.values())]
    owners = question_owners(adapter, fitted or union, union) if shared else None
    mine = set(union if owners is None else owned(owners))
    if folder is not None:  # sharded: only this rank's weights' tensors are read
        factors = load_factors(folder, weights=[n for n in union if n in mine] if owners is not None else None)
    where = f"the factors in {Path(folder) / FACTORS_FILE}" if folder is not None else "the factors given"
    provenance_notes = check_factors_model(adapter, factors, allow_missing_provenance=allow_missing, where=where)
    prepared: dict[str, tuple[list[str], list[str], Preconditioner | None, dict[str, torch.Tensor]]] = {}
    gradients: dict[int, dict[str, torch.Tensor]] = {}
    self_preconditioner: Preconditioner | None = None
    self_key = None
    for label, (measurement, config) in measurements.items():
        names, notes = reached[label]
        here = [name for name in names if name in mine]
        preconditioner = build_preconditioner(adapter, here, factors, config) if here or owners is None else None
        if config.normalization == "unit":
            key = (config.preconditioner, config.damping, tuple(names))
            if self_key is not None and key != self_key:
                raise ValueError(f"{label}: unit normalisation with a second preconditioner, damping or weight set")
            self_preconditioner, self_key = preconditioner, key
        if id(measurement) not in gradients:
            if owners is None:
                gradients[id(measurement)] = measurement.gradient(adapter, names, batch_size=config.batch_size)
            else:  # every rank runs every query batch (collectives), keeping its own weights' gradients
                gradients[id(measurement)] = measurement.captured_gradient(
                    adapter, names, batch_size=config.batch_size, keep=[n for n in names if n in mine]
                )
        grad_f = {name: gradients[id(measurement)][name] for name in here}
        vectors = (
            preconditioned_gradient(preconditioner, grad_f, measurement.description)
            if preconditioner is not None
            else {}
        )
        prepared[label] = (names, notes, preconditioner, vectors)
    stacked = {}
    for name in union:
        if name not in mine:
            continue
        like = next(p[3][name] for p in prepared.values() if name in p[3])
        stacked[name] = torch.stack([p[3][name] if name in p[3] else torch.zeros_like(like) for p in prepared.values()])
    t0 = time.perf_counter()
    windows = sorted({w for _, config in measurements.values() for w in aggregation_windows(config)})
    columns = [k for k, (_, config) in enumerate(measurements.values()) if aggregation_windows(config)]
    out = score_rows_sharded(
        adapter,
        data,
        stacked,
        batch_size=batch_size,
        self_preconditioner=self_preconditioner,
        windows=windows,
        window_columns=columns,
        progress=progress,
        owners=owners,
        stacked=len(prepared) if owners is not None else 0,
    )
    seconds = time.perf_counter() - t0
    results = {}
    for k, (label, (measurement, config)) in enumerate(measurements.items()):
        names, notes, preconditioner, _ = prepared[label]
        kind, damping = _kind_and_damping(preconditioner, owners is not None)
        single: dict[str, Any] = {
            "scores": out["scores"][:, k].clone(),
            "windows": {w: v[:, k].clone() for w, v in out.get("windows", {}).items()},
        }
        if "self_influence" in out:
            single["self_influence"] = out["self_influence"].clone()
        aggregate_tokens(single, config)
        if config.row_loss == "mean":
            per_token_mean(single, data)
        normalise_rows(single, config, data)
        results[label] = InfluenceResult(
            scores=single["scores"],
            indices=[int(row.index) for row in data],
            weights=list(names),
            measurement=measurement.description,
            preconditioner=kind,
            damping={name: damping[name] for name in names if name in damping},
            notes=provenance_notes + notes,
            timings={"scoring_shared": seconds},
            row_loss=config.row_loss,
            allow_missing_provenance=config.allow_missing_provenance,
        )
    return results

"""Memory-bounded scoring: influence when neither the factors nor every weight's preconditioned vector fit in memory.

The weights the measurement reaches are split into module partitions from ``max_memory``
(``curvature.budget.score_partitions``). For each partition: the measurement gradient of its weights only (the
queries' forward and backward run again; the other weights get no gradient), each weight's factors read from the
factor folder on their own, applied once (``v_w = P_w⁻¹ ∇_w f``) and dropped (``v_w`` is kept in the scoring
precision, float32 for a float32 model), then one pass over the training rows in which every weight's contraction
``−Σ_t g_tᵀ v_w a_t`` is folded in as its output gradient arrives (``score_rows``). Scores, per-weight scores and the
per-position breakdown are sums over weights, so the partitions' results add up to the unbounded ones (tested).

On a model sharded over several ranks (FSDP) the partitions are rank 0's (every rank runs the same passes); in
each, a rank differentiates, reads the factors of and preconditions only the partition's weights it owns (the
sharded fit's owners), and each weight's ``v_w`` is broadcast by its owner inside the backward of the pass over
the rows (``score_rows(owners=...)``), as in the unbounded sharded pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from concept_influence.attribution.measurements import Measurement
from concept_influence.attribution.scoring import (
    InfluenceConfig,
    InfluenceResult,
    aggregate_tokens,
    aggregation_windows,
    gathered_kind_and_damping,
    normalise_rows,
    owned,
    per_token_mean,
    preconditioned_gradient,
    question_owners,
    resolve_weights,
    score_rows_sharded,
)
from concept_influence.curvature.budget import (
    activation_bytes,
    format_size,
    parse_size,
    precondition_workspace_bytes,
    score_partitions,
)
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.fit import adapter_model_shape, weight_shapes
from concept_influence.curvature.io import FACTORS_FILE, FactorMismatchError, load_factors, read_manifest
from concept_influence.curvature.preconditioner import IdentityPreconditioner
from concept_influence.distributed.runtime import broadcast_object, in_step
from concept_influence.gradients.capture import HEAD_CHUNK_ELEMENTS
from concept_influence.models.base import ModelAdapter, WeightInfo
from concept_influence.models.fingerprint import missing_provenance

logger = logging.getLogger(__name__)

FactorSource = Factors | str | os.PathLike | None


def plan_score_partitions(
    adapter: ModelAdapter, infos: Sequence[WeightInfo], max_memory: int | None, *, batch_rows: int, row_tokens: int
) -> list[list[str]]:
    """Weight names per scoring pass so that the process stays under ``max_memory`` bytes: what is left after the
    process's resident memory (model included), one batch's activations and the largest weight's factors goes to
    the partition's measurement gradients and vectors. ``None``: one partition."""
    shapes = weight_shapes(infos)
    if max_memory is None:
        return [[w.name for w in shapes]]
    import psutil

    resident = psutil.Process().memory_info().rss
    activations = activation_bytes(
        adapter_model_shape(adapter), batch_rows, row_tokens, head_chunk_elements=HEAD_CHUNK_ELEMENTS
    )
    workspace = precondition_workspace_bytes(shapes)
    budget = max_memory - resident - activations - workspace
    work_bytes = torch.promote_types(adapter.dtype, torch.float32).itemsize
    try:
        if budget <= 0:
            raise ValueError("nothing is left for the scoring vectors")
        parts = score_partitions(shapes, budget, work_bytes)
    except ValueError as err:
        raise ValueError(
            f"max_memory (--max-memory) {format_size(max_memory)} is too small to score: {err} (after "
            f"{format_size(resident)} resident, {format_size(activations)} for a batch of {batch_rows} "
            f"rows x {row_tokens} tokens and {format_size(workspace)} for the largest weight's factors); "
            "raise it or lower the batch size / max length"
        ) from None
    return [[w.name for w in part] for part in parts]


def _available(
    adapter: ModelAdapter,
    factors: FactorSource,
    *,
    allow_missing_provenance: bool = False,
    notes: list[str] | None = None,
) -> list[str] | None:
    """The fitted weights (``None`` without factors), after checking that they were fitted on this model (factors
    that record no model fingerprint: an error unless ``allow_missing_provenance``, then a note in ``notes``)."""
    if factors is None:
        return None
    if isinstance(factors, Factors):
        fingerprint, names, where = factors.fingerprints.get("model"), factors.names, "the factors given"
    else:
        manifest = read_manifest(factors)
        fingerprint, names = manifest["fingerprints"].get("model"), [e["name"] for e in manifest["weights"]]
        where = f"the factors in {Path(factors) / FACTORS_FILE}"
    if fingerprint is None:
        if not allow_missing_provenance:
            raise missing_provenance(where)
        if notes is not None:
            notes.append(f"{where} record no model fingerprint: used without a check (allow_missing_provenance)")
    elif fingerprint != adapter.fingerprint():
        raise FactorMismatchError(
            f"the factors were fitted for a different model (or changed weights) (model fingerprint: "
            f"factors {fingerprint!r}, this model {adapter.fingerprint()!r}); refit them on this model"
        )
    return names


def _one_weight(adapter: ModelAdapter, factors: FactorSource, name: str, config: InfluenceConfig):
    """The preconditioner of one weight, its factors read on their own from a folder."""
    if factors is None:
        if config.preconditioner != "identity":
            raise ValueError(
                f"the {config.preconditioner} preconditioner needs fitted factors (fit_factors / fit-factors)"
            )
        info = adapter.weight_info(name)
        return IdentityPreconditioner({name: (info.d_out, info.d_in + int(info.has_bias))})
    one = (
        factors.restrict([name]) if isinstance(factors, Factors) else load_factors(Path(factors), weights=[name])
    )  # checked in _available
    return one.preconditioner(config.preconditioner, config.damping)


def compute_influence_bounded(
    adapter: ModelAdapter,
    data: Sequence[Any],
    measurement: Measurement,
    factors: FactorSource,
    config: InfluenceConfig,
    *,
    progress: bool = True,
) -> InfluenceResult:
    """``compute_influence`` under ``config.max_memory`` bytes (see the module docstring). ``factors``: a factor
    folder (read one weight at a time), loaded ``Factors``, or ``None`` for the identity preconditioner.

    Self-influence and unit normalisation (every weight's factors during the pass) are not available here; the
    target breakdown and max/window token aggregation need every weight in one pass (an error when the budget
    asks for several)."""
    if config.self_influence or config.normalization == "unit":
        raise ValueError(
            "self-influence and unit normalisation are not memory-bounded: score without max_memory (--max-memory)"
        )
    provenance_notes: list[str] = []
    available = _available(
        adapter, factors, allow_missing_provenance=config.allow_missing_provenance, notes=provenance_notes
    )
    names, notes = resolve_weights(adapter, measurement, available, allow_subset=config.allow_subset)
    notes = provenance_notes + notes
    limit = parse_size(config.max_memory) if config.max_memory is not None else None
    longest = max((len(row.input_ids) for row in data), default=1)
    sharded = in_step(adapter.model)
    parts = plan_score_partitions(
        adapter,
        [adapter.weight_info(n) for n in names],
        limit,
        batch_rows=min(config.batch_size, max(len(data), 1)),
        row_tokens=longest,
    )
    # sharded: the owners of the fitted weights (as the fit owned them); every rank runs rank 0's partitions
    owners = question_owners(adapter, available or names, names) if sharded else None
    if sharded:
        parts = broadcast_object(parts)
    if len(parts) > 1:
        if config.token_breakdown == "target" or config.token_aggregation != "sum":
            raise ValueError(
                f"--max-memory {format_size(limit or 0)} splits the weights into {len(parts)} scoring "
                "passes; the target token breakdown and max/window token aggregation need one pass: "
                "raise --max-memory"
            )
        notes.append(
            f"scored in {len(parts)} module partitions (passes over the rows) to stay under {format_size(limit or 0)}"
        )
    work_dtype = torch.promote_types(adapter.dtype, torch.float32)
    timings = {"measurement_gradient": 0.0, "scoring": 0.0}
    damping: dict[str, float] = {}
    kind: str | None = config.preconditioner if owners is None else None
    out: dict[str, Any] = {}
    for part in parts:
        t0 = time.perf_counter()
        part_owners = None if owners is None else {name: owners[name] for name in part}
        if part_owners is None:
            mine = part
            grad_f = measurement.gradient(adapter, part, batch_size=config.batch_size)
        else:  # every rank runs every query batch (collectives), keeping its own weights' gradients
            mine = owned(part_owners)
            grad_f = measurement.captured_gradient(adapter, part, batch_size=config.batch_size, keep=mine)
        vectors: dict[str, torch.Tensor] = {}
        for name in mine:
            preconditioner = _one_weight(adapter, factors, name, config)
            vector = preconditioned_gradient(preconditioner, {name: grad_f.pop(name)}, measurement.description)[name]
            vectors[name] = vector.to(work_dtype)
            damping.update(preconditioner.damping)
            kind = preconditioner.kind
            del preconditioner, vector
        timings["measurement_gradient"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        piece = score_rows_sharded(
            adapter,
            data,
            vectors,
            batch_size=config.batch_size,
            token_breakdown=config.token_breakdown,
            per_weight=config.per_weight,
            windows=aggregation_windows(config),
            progress=progress,
            gradient_checkpointing=config.gradient_checkpointing,
            owners=part_owners,
        )
        timings["scoring"] += time.perf_counter() - t0
        del vectors
        _merge(out, piece)
    if owners is not None:
        kind, damping = gathered_kind_and_damping(kind, damping)
    assert kind is not None
    aggregate_tokens(out, config)
    if config.row_loss == "mean":
        per_token_mean(out, data)
    normalise_rows(out, config, data)
    return InfluenceResult(
        scores=out["scores"],
        indices=[int(row.index) for row in data],
        weights=list(names),
        measurement=measurement.description,
        preconditioner=kind,
        damping=damping,
        per_weight=out.get("per_weight"),
        per_token=out.get("per_token"),
        notes=notes,
        timings=timings,
        row_loss=config.row_loss,
        allow_missing_provenance=config.allow_missing_provenance,
    )


def _merge(total: dict[str, Any], piece: dict[str, Any]) -> None:
    """Add one partition's ``score_rows`` results into ``total`` (in place): scores and per-position breakdowns
    add, per-weight scores are disjoint."""
    if not total:
        total.update(piece)
        return
    total["scores"] = total["scores"] + piece["scores"]
    if "per_weight" in piece:
        total["per_weight"].update(piece["per_weight"])
    if "per_token" in piece:
        total["per_token"] = [a + b for a, b in zip(total["per_token"], piece["per_token"], strict=True)]

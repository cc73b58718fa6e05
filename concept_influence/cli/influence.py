"""Gradient-based attribution behind the CLI: ``fit-factors`` and the ``concept-influence``/``influence`` methods of
``attribute`` (``run_gradient_attribution``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import (
    ConceptMeasurement,
    DifferentialMeasurement,
    LogLikelihoodMeasurement,
    Measurement,
    answer_queries,
    tokenize_queries,
)
from concept_influence.attribution.scores import ScoreTable
from concept_influence.cli.common import user_errors
from concept_influence.concepts.base import Concept
from concept_influence.curvature.config import Damping, FactorConfig
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.fit import fit_factors
from concept_influence.curvature.io import data_fingerprint, load_factors
from concept_influence.data.chat import ChatRow
from concept_influence.data.tokenize import tokenize_chat
from concept_influence.models.base import ModelAdapter

logger = logging.getLogger(__name__)

GRADIENT_METHODS = ("concept-influence", "influence")


@dataclass(frozen=True)
class GradientAttributionConfig:
    """Settings of ``run_gradient_attribution``.

    ``preconditioner``/``damping``: the curvature (default EKFAC, 0.1 × mean eigenvalue per weight);
    ``fisher``/``factor_dtype``: used when the factors have to be fitted here; ``max_length``/``batch_size``:
    tokenisation and batching; ``n_samples``/``temperature``/``max_new_tokens``/``seed``: how prompt-only queries
    are answered by the model; ``cache_dir``: where generated answers are cached; ``token_breakdown``:
    ``"target"``/``"position"`` adds each row's per-token contributions as a ``token_scores`` column; ``row_loss``:
    score each row's summed (default) or mean token loss (see ``InfluenceConfig``).
    """

    preconditioner: str = "ekfac"
    damping: Damping = Damping()
    fisher: str = "true"
    factor_dtype: str = "float32"
    max_length: int = 512
    batch_size: int = 8
    n_samples: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    cache_dir: str | None = None
    token_breakdown: str = "none"
    row_loss: str = "sum"


def build_measurement(
    adapter: ModelAdapter,
    concept: Concept | None,
    queries: Sequence[ChatRow],
    method: str,
    config: GradientAttributionConfig,
    *,
    contrast_queries: Sequence[ChatRow] | None = None,
) -> tuple[Measurement, list[ChatRow]]:
    """The measurement of ``method`` on answered queries (prompt-only queries are answered by the model)."""
    if method not in GRADIENT_METHODS:
        raise ValueError(f"unknown gradient method {method!r}; expected one of {GRADIENT_METHODS}")
    answer = dict(n_samples=config.n_samples, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                  seed=config.seed, cache_dir=config.cache_dir)
    answered = answer_queries(adapter, queries, **answer)
    tokenized = tokenize_queries(answered, adapter.tokenizer, config.max_length)
    if method == "influence":
        return LogLikelihoodMeasurement(tokenized), answered
    if concept is None:
        raise ValueError("--method concept-influence needs a concept (--concept FILE)")
    if contrast_queries:
        contrast = tokenize_queries(answer_queries(adapter, contrast_queries, **answer), adapter.tokenizer, config.max_length)
        return DifferentialMeasurement(concept, tokenized, contrast), answered
    return ConceptMeasurement(concept, tokenized), answered


def run_gradient_attribution(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    concept: Concept | None,
    queries: Sequence[ChatRow],
    method: str,
    factors_path: str | os.PathLike | None,
    config: GradientAttributionConfig = GradientAttributionConfig(),
    *,
    contrast_queries: Sequence[ChatRow] | None = None,
    progress: bool = True,
) -> ScoreTable:
    """Score training rows with Concept Influence (``method="concept-influence"``, needs ``concept``) or classical
    influence on the queries' log-likelihood (``method="influence"``).

    ``factors_path``: a folder of fitted factors (checked against this model and data; mismatch is an error), or
    a folder that does not exist yet (the factors are fitted on ``rows`` and saved there), or ``None`` (fitted in
    memory). Only the weights the measurement reaches are fitted and used. Positive score = training on the row
    raises the measurement.
    """
    if adapter.tokenizer is None:
        raise ValueError("gradient attribution needs the model's tokenizer")
    measurement, answered = build_measurement(adapter, concept, queries, method, config, contrast_queries=contrast_queries)
    data = tokenize_chat(rows, adapter.tokenizer, config.max_length)
    names = measurement.weights(adapter)
    factors: Factors | None = None
    notes: list[str] = []
    if config.preconditioner != "identity":
        factor_config = FactorConfig(fisher=config.fisher, preconditioner=config.preconditioner, dtype=config.factor_dtype,
                                     seed=config.seed)
        if factors_path is not None and (Path(factors_path) / "manifest.json").exists():
            factors = load_factors(factors_path, model_fingerprint=adapter.fingerprint(), data_fingerprint=data_fingerprint(data))
            notes.append(f"factors loaded from {factors_path}")
        else:
            factors = fit_factors(adapter, data, factor_config, weights=names, batch_size=config.batch_size,
                                  out_dir=factors_path, progress=progress)
            notes.append(f"factors fitted on {len(data)} rows" + (f" and saved to {factors_path}" if factors_path else ""))
    influence_config = InfluenceConfig(preconditioner=config.preconditioner, damping=config.damping,  # type: ignore[arg-type]
                                       batch_size=config.batch_size, token_breakdown=config.token_breakdown,  # type: ignore[arg-type]
                                       row_loss=config.row_loss)  # type: ignore[arg-type]
    result = compute_influence(adapter, data, measurement, factors, influence_config, progress=progress)
    columns: dict[str, list[Any]] = {}
    if result.per_token is not None:
        columns["token_scores"] = [t.tolist() for t in result.per_token]
    meta = {**result.meta(), "notes": notes + result.notes, "n_queries": len(answered), "method": method,
            "config": asdict(config)}
    return ScoreTable.from_rows(list(rows), result.scores.numpy(), method, columns=columns, meta=meta)


def _load_concept(path: str, adapter: ModelAdapter) -> Concept:
    from concept_influence import concepts

    loader = getattr(concepts, "load_concept", None)
    if loader is None:
        raise ValueError("this build has no concept loader (concept_influence.concepts.load_concept)")
    return loader(path, adapter)


def register(app: typer.Typer) -> None:
    """Add ``fit-factors`` to the CLI."""

    @app.command("fit-factors")
    @user_errors
    def fit_factors_command(
        model: str = typer.Option(..., "--model", help="Model folder or hub name (Hugging Face causal LM)."),
        data: Path = typer.Option(..., "--data", help="Training data: chat JSONL."),
        out: Path = typer.Option(..., "--out", help="Folder for the factors (manifest.json + factors.safetensors)."),
        concept: str | None = typer.Option(None, "--concept", help="Fit only the weights this concept's layer reaches."),
        up_to_layer: int | None = typer.Option(None, "--up-to-layer", help="Fit only blocks 0..L."),
        fisher: str = typer.Option("true", "--fisher", help="'true' (labels sampled from the model) or 'empirical'."),
        preconditioner: str = typer.Option("ekfac", "--preconditioner", help="ekfac | kfac | diagonal."),
        batch_size: int = typer.Option(8, "--batch-size"),
        max_length: int = typer.Option(512, "--max-length"),
        stats_dtype: str = typer.Option("float32", "--stats-dtype", help="Precision of the statistics."),
        seed: int = typer.Option(0, "--seed", help="Seed of the label sampling (true Fisher)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace factors fitted for another model/data."),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Save a resumable state every N batches."),
        device: str | None = typer.Option(None, "--device"),
        dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (float32, bfloat16, float64)."),
    ) -> None:
        """Fit EKFAC (or KFAC/diagonal) factors once, to reuse with `attribute --factors`. Resumes after interruption."""
        from concept_influence.cli.common import load_model
        from concept_influence.data.chat import read_chat_jsonl

        adapter = load_model(model, device, dtype)
        rows = read_chat_jsonl(data)
        tokenized = tokenize_chat(rows, adapter.tokenizer, max_length)
        layer = None
        if concept is not None:
            layer = adapter.check_layer(_load_concept(concept, adapter).layer)
        if up_to_layer is not None:
            layer = adapter.check_layer(up_to_layer) if layer is None else min(layer, adapter.check_layer(up_to_layer))
        infos = adapter.tracked_weights() if layer is None else adapter.weights_up_to(layer)
        if layer is not None:
            typer.echo(f"fitting the {len(infos)} weights of blocks 0..{layer} (a readout at layer {layer} does not reach higher blocks)")
        config = FactorConfig(fisher=fisher, preconditioner=preconditioner, dtype=stats_dtype, seed=seed)  # type: ignore[arg-type]
        factors = fit_factors(adapter, tokenized, config, weights=[i.name for i in infos], batch_size=batch_size,
                              out_dir=out, overwrite=overwrite, checkpoint_every=checkpoint_every)
        assert factors is not None
        typer.echo(f"factors for {len(factors.names)} weights ({', '.join(factors.available())}) on {factors.n_rows} rows, "
                   f"{factors.n_tokens} tokens -> {out}")

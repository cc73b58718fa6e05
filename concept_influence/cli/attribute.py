"""``concept-influence attribute``: score every training row for a concept with one of the methods.

One JSON object per row in ``--out``: ``index``, ``id`` (when present), ``score`` (higher = training on the row
pushes the concept up), ``rank``, the method's extra columns and the row's passthrough fields; ``--out`` plus
``.meta.json`` holds the method, settings and timings.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer

from concept_influence.cli.common import load_model, user_errors

FORWARD_METHODS = ("vector-filter", "projection-difference")
GRADIENT_METHODS = ("concept-influence", "influence")


class Method(str, Enum):
    vector_filter = "vector-filter"
    projection_difference = "projection-difference"
    concept_influence = "concept-influence"
    influence = "influence"


def register(app: typer.Typer) -> None:
    app.command("attribute")(attribute)


@user_errors
def attribute(
    model: str = typer.Option(..., "--model", help="Hugging Face hub name or local folder (from_pretrained)."),
    data: Path = typer.Option(..., "--data", help="Training rows: chat JSONL ({'messages': [...]}) or prompt/completion."),
    method: Method = typer.Option(..., "--method", help="Attribution method."),
    out: Path = typer.Option(..., "--out", help="Scores JSONL to write (atomically)."),
    concept: Path | None = typer.Option(None, "--concept", help="Concept file (train-probe's output). Not needed by --method influence."),
    queries: Path | None = typer.Option(None, "--queries", help="Query prompts JSONL (gradient methods); prompt-only rows are answered by the model."),
    factors: Path | None = typer.Option(None, "--factors", help="Fitted factors folder (fit-factors); fitted here when absent (and saved there if given)."),
    preconditioner: str = typer.Option("ekfac", "--preconditioner", help="ekfac | kfac | diagonal | identity."),
    damping: float = typer.Option(0.1, "--damping", help="Relative damping: λ = this × mean eigenvalue, per weight."),
    absolute_damping: float | None = typer.Option(None, "--absolute-damping", help="Absolute λ instead of the relative rule."),
    row_loss: str = typer.Option("sum", "--row-loss", help="Gradient methods: a row's loss is its tokens' sum (as training weighs it) or mean (length-neutral)."),
    token_breakdown: str = typer.Option("none", "--token-breakdown", help="Gradient methods: none | target | position: add each row's per-token scores as a token_scores column."),
    contrast_queries: Path | None = typer.Option(None, "--contrast-queries", help="concept-influence: measure the concept on --queries minus on these (differential measurement)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_length: int = typer.Option(512, "--max-length", min=2, help="Truncate rows longer than this (reported)."),
    n_samples: int = typer.Option(1, "--n-samples", min=1, help="Model answers sampled per prompt (projection-difference, queries)."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    seed: int = typer.Option(0, "--seed"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Where sampled model answers are cached (default: next to --out)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip bad data lines (each one is reported) instead of failing."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 | float64."),
) -> None:
    """Score every training row for a concept; higher = training on the row pushes the concept up."""
    from concept_influence.data import read_chat_jsonl

    rows = read_chat_jsonl(data, skip_invalid=skip_invalid)
    for line, reason in rows.skipped:
        typer.echo(f"skipped line {line}: {reason}", err=True)
    method_name = method.value
    if method_name != "influence" and concept is None:
        raise ValueError(f"--method {method_name} needs --concept FILE")
    if method_name in GRADIENT_METHODS and queries is None:
        raise ValueError(f"--method {method_name} needs --queries queries.jsonl")
    cache = cache_dir if cache_dir is not None else out.parent / ".answer-cache"
    adapter = load_model(model, device, dtype)
    loaded_concept = None
    if concept is not None:
        from concept_influence.concepts import load_concept

        loaded_concept = load_concept(concept, adapter)
    started = time.perf_counter()
    if method_name == "vector-filter":
        from concept_influence.attribution.forward import vector_filter

        table = vector_filter(adapter, rows, loaded_concept, batch_size=batch_size, max_length=max_length)
    elif method_name == "projection-difference":
        from concept_influence.attribution.forward import projection_difference

        table = projection_difference(adapter, rows, loaded_concept, n_samples=n_samples, temperature=temperature,
                                      max_new_tokens=max_new_tokens, seed=seed, cache_dir=cache, batch_size=batch_size,
                                      max_length=max_length)
    else:
        from concept_influence.cli.influence import GradientAttributionConfig, run_gradient_attribution
        from concept_influence.curvature.config import Damping

        query_rows = read_chat_jsonl(queries, need_assistant=False)
        config = GradientAttributionConfig(
            preconditioner=preconditioner,
            damping=Damping(absolute=absolute_damping) if absolute_damping is not None else Damping(relative=damping),
            max_length=max_length, batch_size=batch_size, n_samples=n_samples, temperature=temperature,
            max_new_tokens=max_new_tokens, seed=seed, cache_dir=str(cache), row_loss=row_loss, token_breakdown=token_breakdown,
        )
        contrast = read_chat_jsonl(contrast_queries, need_assistant=False) if contrast_queries is not None else None
        table = run_gradient_attribution(adapter, rows, loaded_concept, query_rows, method_name, factors, config,
                                         contrast_queries=contrast)
    table.meta.setdefault("wall_time_s", time.perf_counter() - started)
    table.meta.update({"model": model, "data": str(data), "concept": None if concept is None else str(concept)})
    table.write_jsonl(out)
    top = table.to_records(sort=True)[:5]
    typer.echo(f"{method_name}: scored {len(table)} rows in {table.meta['wall_time_s']:.1f}s -> {out}")
    for record in top:
        typer.echo(f"  rank {record['rank']:>4}  index {record['index']:>6}  score {record['score']:+.4g}  id {record.get('id', '-')}")

"""``concept-influence attribute``: score every training row for a concept with one of the registered methods
(a thin wrapper over ``Attributor.attribute``).

One JSON object per row in ``--out``: ``index``, ``id`` (when present), ``score`` (higher = training on the row
pushes the concept up), ``rank``, the method's extra columns and the row's passthrough fields; ``--out`` plus
``.meta.json`` holds the method, settings and timings.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer

from concept_influence.attribution.methods import RECOMMENDED_METHOD, get_method, method_names
from concept_influence.cli.common import check_not_inputs, check_output, local_path, user_errors

Method = Enum("Method", {name.replace("-", "_"): name for name in method_names()}, type=str)  # type: ignore[misc]


def register(app: typer.Typer) -> None:
    app.command("attribute")(attribute)


@user_errors
def attribute(
    model: str = typer.Option(..., "--model", help="Hugging Face hub name or local folder (from_pretrained)."),
    data: Path = typer.Option(..., "--data", help="Training rows: chat JSONL ({'messages': [...]}) or prompt/completion."),
    out: Path = typer.Option(..., "--out", help="Scores JSONL to write (atomically)."),
    method: Method | None = typer.Option(None, "--method", help=f"Attribution method (default: the recommended one, {RECOMMENDED_METHOD})."),  # type: ignore[valid-type]
    concept: Path | None = typer.Option(None, "--concept", help="Concept file (train-probe's output). Not needed by --method influence."),
    queries: Path | None = typer.Option(None, "--queries", help="Query prompts JSONL (gradient methods); prompt-only rows are answered by the model."),
    workdir: Path | None = typer.Option(None, "--workdir", help="Session folder: factors, answers and store kept and reused across runs."),
    store: Path | None = typer.Option(None, "--store", help="Answer from this store folder (build-store) instead of passes over the rows: gradient methods read its gradient store, forward methods (and the forward half of combined-*) its activation cache."),
    exact: bool = typer.Option(False, "--exact", help="Ignore the workdir's caches: every pass over the rows (forward and gradient) runs."),
    factors: Path | None = typer.Option(None, "--factors", help="Fitted factors folder (fit-factors); fitted here when absent (and saved there if given)."),
    preconditioner: str | None = typer.Option(None, "--preconditioner", help="ekfac | kfac | diagonal | identity (default: the method's)."),
    damping: float | None = typer.Option(None, "--damping", help="Relative damping: λ = this × mean eigenvalue, per weight (default 0.1)."),
    absolute_damping: float | None = typer.Option(None, "--absolute-damping", help="Absolute λ instead of the relative rule."),
    row_loss: str | None = typer.Option(None, "--row-loss", help="Gradient methods: a row's loss is its tokens' sum (as training weighs it) or mean (length-neutral)."),
    token_breakdown: str | None = typer.Option(None, "--token-breakdown", help="Gradient methods: none | target | position: add each row's per-token scores as a token_scores column."),
    contrast_queries: Path | None = typer.Option(None, "--contrast-queries", help="concept-influence: measure the concept on --queries minus on these (differential measurement)."),
    keep: str | None = typer.Option(None, "--keep", help="Gradient methods: which sampled query answers to measure on: all | top (the --keep-k most concept-expressing per prompt)."),
    keep_k: int | None = typer.Option(None, "--keep-k", min=1, help="Answers kept per prompt by --keep top and --contrast auto."),
    contrast: str | None = typer.Option(None, "--contrast", help="none | auto: the concept on each prompt's most minus least concept-expressing answers."),
    token_aggregation: str | None = typer.Option(None, "--token-aggregation", help="sum | max | window: a row's score from its per-position contributions."),
    window: int | None = typer.Option(None, "--window", min=1, help="Positions per window for --token-aggregation window."),
    normalization: str | None = typer.Option(None, "--normalization", help="none | length (by sqrt(trained tokens)) | unit (by sqrt(self-influence), RelatIF)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_length: int | None = typer.Option(None, "--max-length", min=2, help="Truncate rows longer than this (reported; default: the model's context, at most 512)."),
    n_samples: int | None = typer.Option(None, "--n-samples", min=1, help="Model answers sampled per prompt (projection-difference, queries; default: the method's)."),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1),
    seed: int = typer.Option(0, "--seed"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Where sampled model answers are cached (default: the workdir, else next to --out)."),
    allow_subset: bool = typer.Option(False, "--allow-subset", help="Gradient methods: when --factors miss weights the concept reaches, score with the covered weights only (default: an error)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip bad data lines (each one is reported) and leave out rows whose whole answer is cut off by --max-length (score null, truncated: true, counted in the meta) instead of failing."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Gradient methods: bound the peak memory (e.g. 3GiB): factors read one weight at a time, weights scored in module partitions (and fitted so, if fitted here)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Gradient methods: recompute the blocks' activations in the backward (less memory on long rows; same scores)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 | float64."),
) -> None:
    """Score every training row for a concept; higher = training on the row pushes the concept up.

    Example: concept-influence attribute --model runs/model --data train.jsonl --concept concepts/evil
    --queries queries.jsonl --workdir runs/evil --out scores.jsonl
    """
    from concept_influence.pipeline import Attributor

    check_output(out)
    check_not_inputs({"--out": out, "--out's .meta.json": out.with_name(out.name + ".meta.json")},
                     {"--data": data, "--concept": concept, "--queries": queries, "--contrast-queries": contrast_queries,
                      "--workdir": workdir, "--store": store, "--factors": factors, "--model": local_path(model)})
    spec = get_method(method.value if method is not None else None)
    if spec.needs_concept and concept is None:
        raise ValueError(f"--method {spec.name} needs --concept FILE")
    if spec.needs_queries and queries is None:
        raise ValueError(f"--method {spec.name} needs --queries queries.jsonl")
    if cache_dir is None and workdir is None:
        cache_dir = out.parent / ".answer-cache"
    att = Attributor(model, data, workdir, device=device, dtype=dtype, max_length=max_length, batch_size=batch_size,
                     seed=seed, skip_invalid=skip_invalid)
    for line, reason in att.rows.skipped:
        typer.echo(f"skipped line {line}: {reason}", err=True)
    flags: dict[str, Any] = dict(
        factors=factors, preconditioner=preconditioner, damping=damping, absolute_damping=absolute_damping,
        row_loss=row_loss, token_breakdown=token_breakdown, contrast_queries=contrast_queries, n_samples=n_samples,
        temperature=temperature, max_new_tokens=max_new_tokens,
        cache_dir=None if cache_dir is None else str(cache_dir), batch_size=batch_size, allow_subset=allow_subset,
        keep=keep, keep_k=keep_k, contrast=contrast, token_aggregation=token_aggregation, window=window,
        normalization=normalization, max_memory=max_memory,
        gradient_checkpointing=gradient_checkpointing or None,
    )
    accepted = spec.options
    # flags left out keep the method's own defaults (a combination's may differ from concept-influence's)
    options: dict[str, Any] = {k: v for k, v in flags.items() if k in accepted and k != "store" and v is not None}
    if "store" in accepted:  # gradient methods read the gradient store, forward methods the activation cache
        options["store"] = False if exact else store
    elif store is not None:
        raise ValueError(f"--store does not apply to --method {spec.name} (it reads no caches)")
    table = att.attribute(concept, queries, None if method is None else spec.name, **options)
    table.meta.update({"model": model, "data": str(data), "concept": None if concept is None else str(concept)})
    table.write_jsonl(out)
    typer.echo(f"{spec.name}: scored {len(table)} rows in {table.meta['wall_time_s']:.1f}s -> {out}")
    for record in table.to_records(sort=True)[:5]:
        typer.echo(f"  rank {record['rank']:>4}  index {record['index']:>6}  score {record['score']:+.4g}  id {record.get('id', '-')}")

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

from concept_influence.attribution.forward import ForwardConfig
from concept_influence.attribution.gradient import GradientAttributionConfig
from concept_influence.attribution.methods import RECOMMENDED_METHOD, get_method, method_names
from concept_influence.attribution.rerank import RerankConfig
from concept_influence.cli.common import (
    batch_size_flag,
    check_not_inputs,
    check_output,
    device_flag,
    dtype_flag,
    fsdp_flag,
    is_main_process,
    local_path,
    model_flag,
    seed_flag,
    shard_of,
    user_errors,
)
from concept_influence.cli.options import OptionGroup, settings_flags
from concept_influence.concepts.answers import AnswerConfig
from concept_influence.settings import help_text, settings_fields

Method = Enum("Method", {name.replace("-", "_"): name for name in method_names()}, type=str)  # type: ignore[misc]


def register(app: typer.Typer) -> None:
    app.command("attribute")(attribute)


COMMAND_OWN = ("batch_size", "cache_dir", "max_length", "seed")
"""Settings the command sets with its own flags (the session's): not generated from the settings."""


def option_groups(gradient: type = GradientAttributionConfig, answers: type = AnswerConfig) -> list[OptionGroup]:
    """The method options ``attribute`` exposes as flags: ``answers``' fields (how query prompts are answered) and
    ``gradient``'s other fields (the gradient methods'), each defaulting to the method's own."""
    answer_names = [n for n in settings_fields(answers) if n not in COMMAND_OWN]
    gradient_names = [
        n
        for n, f in settings_fields(gradient).items()
        if n not in COMMAND_OWN and n not in answer_names and f.metadata.get("cli", True)
    ]
    return [
        OptionGroup(gradient, gradient_names, prefix="Gradient methods: ", optional=True),
        OptionGroup(answers, answer_names, optional=True),
        OptionGroup(ForwardConfig, optional=True),
        OptionGroup(RerankConfig, prefix="combined-* methods: ", optional=True),
    ]


def build_attribute(gradient: type = GradientAttributionConfig, answers: type = AnswerConfig) -> Any:
    """The ``attribute`` command with flags for the fields of the settings classes given (a test adds a field)."""
    return user_errors(settings_flags(*option_groups(gradient, answers))(_attribute))


def _attribute(
    model: str = model_flag(),
    data: Path = typer.Option(
        ..., "--data", help="Training rows: chat JSONL ({'messages': [...]}) or prompt/completion."
    ),
    out: Path = typer.Option(..., "--out", help="Scores JSONL to write (atomically)."),
    method: Method | None = typer.Option(
        None, "--method", help=f"Attribution method (default: the recommended one, {RECOMMENDED_METHOD})."
    ),  # type: ignore[valid-type]
    concept: Path | None = typer.Option(
        None, "--concept", help="Concept file (train-probe's output). Not needed by --method influence."
    ),
    queries: Path | None = typer.Option(
        None, "--queries", help="Query prompts JSONL (gradient methods); prompt-only rows are answered by the model."
    ),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Session folder: factors, answers and store kept and reused across runs."
    ),
    store: Path | None = typer.Option(
        None,
        "--store",
        help=(
            "Answer from this store folder (build-store) instead of passes over the rows: gradient methods read its "
            "gradient store, forward methods (and the forward half of combined-*) its activation cache."
        ),
    ),
    exact: bool = typer.Option(
        False, "--exact", help="Ignore the workdir's caches: every pass over the rows (forward and gradient) runs."
    ),
    factors: Path | None = typer.Option(
        None,
        "--factors",
        help="Fitted factors folder (fit-factors); fitted here when absent (and saved there if given).",
    ),
    contrast_queries: Path | None = typer.Option(
        None,
        "--contrast-queries",
        help="concept-influence: measure the concept on --queries minus on these (differential measurement).",
    ),
    batch_size: int = batch_size_flag(),
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        min=2,
        help="Truncate rows longer than this (reported; default: the model's context, at most 512).",
    ),
    seed: int = seed_flag(),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=help_text(AnswerConfig, "cache_dir")),
    skip_invalid: bool = typer.Option(
        False,
        "--skip-invalid",
        help=(
            "Skip bad data lines (each one is reported) and leave out rows whose whole answer is cut off by "
            "--max-length (score null, truncated: true, counted in the meta) instead of failing."
        ),
    ),
    device: str | None = device_flag(),
    fsdp: bool = fsdp_flag(),
    dtype: str | None = dtype_flag(),
    *,
    options: dict[str, Any],
) -> None:
    """Score every training row for a concept; higher = training on the row pushes the concept up.

    Example: concept-influence attribute --model runs/model --data train.jsonl --concept concepts/evil
    --queries queries.jsonl --workdir runs/evil --out scores.jsonl
    """
    from concept_influence.pipeline import Attributor

    check_output(out)
    check_not_inputs(
        {"--out": out, "--out's .meta.json": out.with_name(out.name + ".meta.json")},
        {
            "--data": data,
            "--concept": concept,
            "--queries": queries,
            "--contrast-queries": contrast_queries,
            "--workdir": workdir,
            "--store": store,
            "--factors": factors,
            "--model": local_path(model),
        },
    )
    spec = get_method(method.value if method is not None else None)
    if spec.needs_concept and concept is None:
        raise ValueError(f"--method {spec.name} needs --concept FILE")
    if spec.needs_queries and queries is None:
        raise ValueError(f"--method {spec.name} needs --queries queries.jsonl")
    if cache_dir is None and workdir is None:
        cache_dir = out.parent / ".answer-cache"
    att = Attributor(
        model,
        data,
        workdir,
        device=device,
        dtype=dtype,
        shard=shard_of(fsdp),
        max_length=max_length,
        batch_size=batch_size,
        seed=seed,
        skip_invalid=skip_invalid,
    )
    for line, reason in att.rows.skipped:
        typer.echo(f"skipped line {line}: {reason}", err=True)
    flags: dict[str, Any] = {
        **options,
        "factors": factors,
        "contrast_queries": contrast_queries,
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "batch_size": batch_size,
    }
    accepted = spec.options
    # flags left out keep the method's own defaults (a combination's may differ from concept-influence's)
    options: dict[str, Any] = {k: v for k, v in flags.items() if k in accepted and k != "store" and v is not None}
    if "store" in accepted:  # gradient methods read the gradient store, forward methods the activation cache
        options["store"] = False if exact else store
    elif store is not None:
        raise ValueError(f"--store does not apply to --method {spec.name} (it reads no caches)")
    table = att.attribute(concept, queries, None if method is None else spec.name, **options)
    table.meta.update({"model": model, "data": str(data), "concept": None if concept is None else str(concept)})
    if not is_main_process():  # under torchrun every rank holds the same table: rank 0 writes and prints it
        return
    table.write_jsonl(out)
    typer.echo(f"{spec.name}: scored {len(table)} rows in {table.meta['wall_time_s']:.1f}s -> {out}")
    for record in table.to_records(sort=True)[:5]:
        typer.echo(
            f"  rank {record['rank']:>4}  index {record['index']:>6}  score {record['score']:+.4g}  id "
            f"{record.get('id', '-')}"
        )


attribute = build_attribute()

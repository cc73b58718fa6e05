"""``concept-influence report``: one self-contained HTML file with, when the rows carry a label field, precision-
recall curves and precision at k per method, then score histograms (one panel per method), agreement between
methods, removal curves, the ranked rows (token highlights where ``token_scores`` exist) and metadata."""

from __future__ import annotations

from pathlib import Path

import typer

from concept_influence.cli.common import check_not_inputs, check_output, local_path, user_errors
from concept_influence.cli.evaluate import CONTEXT, scores_paths


def register(app: typer.Typer) -> None:
    app.command("report", context_settings=CONTEXT)(report)


@user_errors
def report(
    ctx: typer.Context,
    scores: list[Path] = typer.Option(
        ..., "--scores", help="Scores JSONL files from `attribute` (space-separated or repeated)."
    ),
    data: Path = typer.Option(..., "--data", help="The training rows (chat JSONL) the scores files score."),
    out: Path = typer.Option(..., "--out", help="HTML file to write (atomically)."),
    evaluation: Path | None = typer.Option(
        None, "--evaluation", help="An `evaluate` output folder (or its evaluation.json)."
    ),
    top: int = typer.Option(50, "--top", min=1, help="Rows shown per method."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer for token highlights (default: the scores' model folder)."
    ),
    title: str = typer.Option("concept_influence report", "--title"),
    allow_other_data: bool = typer.Option(
        False,
        "--allow-other-data",
        help="Use scores made on other data (another hash, or no hash and no ids); recorded in the report's metadata.",
    ),
    label_field: str | None = typer.Option(
        None,
        "--label-field",
        help="A data field that marks the rows to find (e.g. data_origin): the report opens with "
        "precision-recall curves and precision at k per method. Default: data_origin when the rows have it.",
    ),
    positive: str | None = typer.Option(
        None,
        "--positive",
        help="The --label-field value of the rows to find (default: 'planted', or true for a true/false field).",
    ),
    no_labels: bool = typer.Option(
        False, "--no-labels", help="No precision-recall section, even when the rows have data_origin."
    ),
) -> None:
    """Write a self-contained HTML report (no network needed) of one or more scores files.

    Example: concept-influence report --scores vf.jsonl ci.jsonl --data train.jsonl --evaluation eval/ --out report.html
    """
    from concept_influence.report.build import write_report

    if no_labels and (label_field is not None or positive is not None):
        raise ValueError("--no-labels cannot go with --label-field or --positive")
    paths = scores_paths(scores, ctx)
    check_output(out)
    check_not_inputs(
        {"--out": out},
        {
            "--scores": paths,
            "--scores' .meta.json": [p.with_name(p.name + ".meta.json") for p in paths],
            "--data": data,
            "--evaluation": evaluation,
            "--evaluation's evaluation.json": None if evaluation is None else evaluation / "evaluation.json",
            "--tokenizer": local_path(tokenizer),
        },
    )
    written = write_report(
        paths,
        data,
        out,
        evaluation=evaluation,
        top=top,
        tokenizer=tokenizer,
        title=title,
        label_field=label_field,
        positive=positive,
        labels=not no_labels,
        allow_other_data=allow_other_data,
    )
    labelled = f", labels {written.label_field}" if written.label_field else ""
    typer.echo(
        f"report: {written.n_tables} scores file(s), {written.n_rows} rows{labelled} -> {out} "
        f"({written.n_bytes / 1e6:.1f} MB)"
    )

"""``concept-influence filter``: drop the top-scoring rows (or whole groups) from a training file.

The kept rows are copied byte for byte in their original order; ``--out`` plus ``.manifest.json`` records what was
removed and on what basis (scores file, method, concept, threshold).
"""

from __future__ import annotations

from pathlib import Path

import typer

from concept_influence.cli.common import check_not_inputs, check_output, user_errors


def register(app: typer.Typer) -> None:
    app.command("filter")(filter_command)


@user_errors
def filter_command(
    data: Path = typer.Option(..., "--data", help="Training rows (chat JSONL) that the scores file scores."),
    scores: Path = typer.Option(..., "--scores", help="Scores JSONL from `attribute` (one record per data row)."),
    out: Path = typer.Option(..., "--out", help="Filtered JSONL to write (atomically); a .manifest.json goes next to it."),
    remove_top: float | None = typer.Option(None, "--remove-top", help="Remove this fraction of rows (or groups) with the highest scores."),
    remove_top_k: int | None = typer.Option(None, "--remove-top-k", help="Remove the K highest-scoring rows (or groups)."),
    threshold: float | None = typer.Option(None, "--threshold", help="Remove every row (or group) whose score is >= S."),
    by: str | None = typer.Option(None, "--by", help="Rank whole groups: the values of this data field (e.g. source)."),
    aggregate: str = typer.Option("mean", "--aggregate", help="--by: a group's score is the mean or sum of its rows' scores."),
    allow_other_data: bool = typer.Option(False, "--allow-other-data", help="Use scores made on other data (another hash, or no hash and no ids); recorded in the manifest."),
) -> None:
    """Remove the rows (or, with --by, whole groups) that push the concept up most; keep the rest exactly as they were.

    Example: concept-influence filter --data train.jsonl --scores scores.jsonl --remove-top 0.1 --out filtered.jsonl
    """
    from concept_influence.evaluate.filter import FilterRule, filter_file, manifest_path

    check_output(out)
    check_not_inputs({"--out": out, "--out's manifest": manifest_path(out)},
                     {"--data": data, "--scores": scores, "--scores' .meta.json": scores.with_name(scores.name + ".meta.json")})
    rule = FilterRule(remove_top=remove_top, remove_top_k=remove_top_k, threshold=threshold, by=by,
                      aggregate=aggregate)  # type: ignore[arg-type]
    result = filter_file(data, scores, out, rule, allow_other_data=allow_other_data)
    unit = f"groups of {by}" if by else "rows"
    typer.echo(f"removed {len(result.removed)} rows ({len(result.removed_units)} {unit}), kept {len(result.kept)} -> {out}")
    if by:
        for value in result.removed_units[:10]:
            typer.echo(f"  removed {by}={value!r}  score {result.unit_scores[value]:+.4g}")
    typer.echo(f"manifest: {manifest_path(out)}")

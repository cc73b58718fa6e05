"""``concept-influence filter``: drop the top-scoring rows (or whole groups) from a training file.

The kept rows are copied byte for byte in their original order; ``--out`` plus ``.manifest.json`` records what was
removed and on what basis (scores file, method, concept, threshold).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from concept_influence.cli.common import check_not_inputs, check_output, user_errors
from concept_influence.cli.options import OptionGroup, settings_flags
from concept_influence.evaluate.filter import FilterRule


def register(app: typer.Typer) -> None:
    app.command("filter")(filter_command)


@user_errors
@settings_flags(OptionGroup(FilterRule))
def filter_command(
    data: Path = typer.Option(..., "--data", help="Training rows (chat JSONL) that the scores file scores."),
    scores: Path = typer.Option(..., "--scores", help="Scores JSONL from `attribute` (one record per data row)."),
    out: Path = typer.Option(
        ..., "--out", help="Filtered JSONL to write (atomically); a .manifest.json goes next to it."
    ),
    allow_other_data: bool = typer.Option(
        False,
        "--allow-other-data",
        help="Use scores made on other data (another hash, or no hash and no ids); recorded in the manifest.",
    ),
    *,
    options: dict[str, Any],
) -> None:
    """Remove the rows (or, with --by, whole groups) that push the concept up most; keep the rest exactly as they were.

    Example: concept-influence filter --data train.jsonl --scores scores.jsonl --remove-top 0.1 --out filtered.jsonl
    """
    from concept_influence.evaluate.filter import filter_file, manifest_path

    check_output(out)
    check_not_inputs(
        {"--out": out, "--out's manifest": manifest_path(out)},
        {"--data": data, "--scores": scores, "--scores' .meta.json": scores.with_name(scores.name + ".meta.json")},
    )
    rule = FilterRule(**options)
    by = rule.by
    result = filter_file(data, scores, out, rule, allow_other_data=allow_other_data)
    unit = f"groups of {by}" if by else "rows"
    typer.echo(
        f"removed {len(result.removed)} rows ({len(result.removed_units)} {unit}), kept {len(result.kept)} -> {out}"
    )
    if by:
        for value in result.removed_units[:10]:
            typer.echo(f"  removed {by}={value!r}  score {result.unit_scores[value]:+.4g}")
    typer.echo(f"manifest: {manifest_path(out)}")

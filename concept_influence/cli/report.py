"""``concept-influence report``: one self-contained HTML file with the ranked rows (token highlights where
``token_scores`` exist), score histograms, agreement between methods, removal curves and metadata."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from concept_influence.cli.common import check_not_inputs, check_output, local_path, user_errors
from concept_influence.cli.evaluate import CONTEXT, scores_paths, table_names


def register(app: typer.Typer) -> None:
    app.command("report", context_settings=CONTEXT)(report)


def _tokenizer_for(tables: list, explicit: str | None):
    """The tokenizer named by --tokenizer, else the scores' model when it is a local folder (no download)."""
    candidates = [explicit] if explicit else [t.meta.get("model") for t in tables if "token_scores" in t.columns]
    for name in candidates:
        if name and (explicit or Path(name).is_dir()):
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(name, local_files_only=not explicit)
            except OSError as err:
                if explicit:
                    raise ValueError(f"--tokenizer {explicit}: cannot load it ({err})") from None
    return None


@user_errors
def report(
    ctx: typer.Context,
    scores: list[Path] = typer.Option(..., "--scores", help="Scores JSONL files from `attribute` (space-separated or repeated)."),
    data: Path = typer.Option(..., "--data", help="The training rows (chat JSONL) the scores files score."),
    out: Path = typer.Option(..., "--out", help="HTML file to write (atomically)."),
    evaluation: Path | None = typer.Option(None, "--evaluation", help="An `evaluate` output folder (or its evaluation.json)."),
    top: int = typer.Option(50, "--top", min=1, help="Rows shown per method."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer for token highlights (default: the scores' model folder)."),
    title: str = typer.Option("concept_influence report", "--title"),
    allow_other_data: bool = typer.Option(False, "--allow-other-data", help="Use scores made on other data (another hash, or no hash and no ids); recorded in the report's metadata."),
) -> None:
    """Write a self-contained HTML report (no network needed) of one or more scores files.

    Example: concept-influence report --scores vf.jsonl ci.jsonl --data train.jsonl --evaluation eval/ --out report.html
    """
    from concept_influence.attribution.scores import ScoreTable
    from concept_influence.data import read_chat_jsonl, write_text_atomic
    from concept_influence.evaluate.filter import check_data_provenance
    from concept_influence.report import render_report, token_strings

    paths = scores_paths(scores, ctx)
    check_output(out)
    check_not_inputs({"--out": out}, {"--scores": paths, "--scores' .meta.json": [p.with_name(p.name + ".meta.json") for p in paths],
                                      "--data": data, "--evaluation": evaluation,
                                      "--evaluation's evaluation.json": None if evaluation is None else evaluation / "evaluation.json",
                                      "--tokenizer": local_path(tokenizer)})
    rows = read_chat_jsonl(data)
    tables = [ScoreTable.read_jsonl(p) for p in paths]
    overrides = []
    for path, table in zip(paths, tables, strict=True):
        table.meta["path"] = str(path)
        override = check_data_provenance(table, data, n_rows=len(rows), allow_other_data=allow_other_data,
                                         scores_name=f"--scores {path}")
        if override is not None:
            overrides.append(override)
    evaluation_data = None
    if evaluation is not None:
        path = evaluation / "evaluation.json" if evaluation.is_dir() else evaluation
        if not path.exists():
            raise FileNotFoundError(f"--evaluation {evaluation}: no evaluation.json there")
        try:
            evaluation_data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--evaluation {path}: not JSON ({err})") from None
        if evaluation_data.get("format") != "concept_influence.evaluation":
            raise ValueError(f"--evaluation {path}: not an evaluation.json written by `evaluate`")
    tokens = None
    tok = _tokenizer_for(tables, tokenizer)
    if tok is not None:
        shown = set()
        for table in tables:
            if "token_scores" in table.columns:
                shown |= {int(table.index[i]) for i in table.order()[:top]}
        tokens = token_strings([r for r in rows if r.index in shown], tok)
    html = render_report(table_names(paths, tables), rows, evaluation=evaluation_data, tokens=tokens, top=top, title=title,
                         extra_meta={"data": str(data), "scores": [str(p) for p in paths],
                                     "evaluation": None if evaluation is None else str(evaluation),
                                     **({"allow_other_data": True, "other_data": overrides} if overrides else {})},
                         data_name=str(data))
    write_text_atomic(out, html)
    typer.echo(f"report: {len(tables)} scores file(s), {len(rows)} rows -> {out} ({len(html) / 1e6:.1f} MB)")

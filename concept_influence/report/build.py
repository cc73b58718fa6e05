"""Writing a report from files: the scores JSONL files of ``attribute`` (or of the demo), the training rows they
score and, optionally, an ``evaluate`` output. ``concept-influence report`` and the demo both call
``write_report``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concept_influence.attribution.scores import ScoreTable, token_strings
from concept_influence.data.chat import read_chat_jsonl
from concept_influence.evaluate.filter import check_data_provenance
from concept_influence.files import write_text_atomic
from concept_influence.report.html import render_report, resolve_labels


@dataclass(frozen=True)
class WrittenReport:
    path: Path
    n_tables: int
    n_rows: int
    n_bytes: int
    label_field: str | None


def table_names(paths: Sequence[Path], tables: Sequence[Any]) -> dict[str, Any]:
    """Name each table by its method, or by its file name when two share a method."""
    methods = [t.meta.get("method", t.method) for t in tables]
    return {(m if methods.count(m) == 1 else p.stem): t for p, m, t in zip(paths, methods, tables, strict=True)}


def _tokenizer_for(tables: Sequence[Any], explicit: str | None):
    """The tokenizer named by ``tokenizer``, else the scores' model when it is a local folder (no download)."""
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


def read_evaluation(evaluation: str | os.PathLike) -> dict[str, Any]:
    """The dict of an ``evaluate`` output folder's ``evaluation.json`` (or of that file)."""
    evaluation = Path(evaluation)
    path = evaluation / "evaluation.json" if evaluation.is_dir() else evaluation
    if not path.exists():
        raise FileNotFoundError(f"--evaluation {evaluation}: no evaluation.json there")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--evaluation {path}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != "concept_influence.evaluation":
        raise ValueError(f"--evaluation {path}: not an evaluation.json written by `evaluate`")
    return data


def write_report(
    scores: Sequence[str | os.PathLike],
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    evaluation: str | os.PathLike | None = None,
    top: int = 50,
    tokenizer: str | None = None,
    title: str = "concept_influence report",
    label_field: str | None = None,
    positive: str | None = None,
    labels: bool = True,
    allow_other_data: bool = False,
) -> WrittenReport:
    """Read the scores files and the rows, render the report (``render_report``) and write it to ``out``
    atomically. ``label_field`` / ``positive`` / ``labels``: see ``render_report``. Scores made on other data
    than ``data`` are refused (``evaluate.filter.check_data_provenance``) unless ``allow_other_data``, which the
    report's metadata then records."""
    paths = [Path(p) for p in scores]
    rows = read_chat_jsonl(data)
    tables = [ScoreTable.read_jsonl(p) for p in paths]
    overrides = []
    for path, table in zip(paths, tables, strict=True):
        table.meta["path"] = str(path)
        override = check_data_provenance(
            table, data, n_rows=len(rows), allow_other_data=allow_other_data, scores_name=f"--scores {path}"
        )
        if override is not None:
            overrides.append(override)
    evaluation_data = read_evaluation(evaluation) if evaluation is not None else None
    tokens = None
    tok = _tokenizer_for(tables, tokenizer)
    if tok is not None:
        shown = set()
        for table in tables:
            if "token_scores" in table.columns:
                shown |= {int(table.index[i]) for i in table.order()[:top]}
        tokens = token_strings([r for r in rows if r.index in shown], tok)
    html = render_report(
        table_names(paths, tables),
        rows,
        evaluation=evaluation_data,
        tokens=tokens,
        top=top,
        title=title,
        extra_meta={
            "data": str(data),
            "scores": [str(p) for p in paths],
            "evaluation": None if evaluation is None else str(evaluation),
            **({"allow_other_data": True, "other_data": overrides} if overrides else {}),
        },
        data_name=str(data),
        label_field=label_field,
        positive=positive,
        labels=labels,
    )
    resolved = resolve_labels(rows, label_field, positive) if labels else None
    write_text_atomic(Path(out), html)
    return WrittenReport(
        Path(out),
        len(tables),
        len(rows),
        len(html.encode("utf-8")),
        None if resolved is None else f"{resolved[0]}={resolved[1]}",
    )

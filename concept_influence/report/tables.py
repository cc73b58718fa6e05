"""The HTML report of score tables held in memory (``Attributor.report``): token highlights from a tokenizer, the
evaluation from a dict or an ``evaluate`` folder, written atomically when asked. ``report.build.write_report`` is
the same from files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from concept_influence.attribution.scores import ScoreTable, tables_by_method, token_strings
from concept_influence.data.chat import ChatRow
from concept_influence.files import write_text_atomic
from concept_influence.report.build import read_evaluation
from concept_influence.report.html import render_report


def report_tables(
    tables: ScoreTable | dict[str, ScoreTable] | Sequence[ScoreTable],
    rows: Sequence[ChatRow],
    *,
    tokenizer: Any = None,
    max_length: int = 512,
    evaluation: dict[str, Any] | str | os.PathLike | None = None,
    top: int = 50,
    title: str = "concept_influence report",
    extra_meta: dict[str, Any] | None = None,
    label_field: str | None = None,
    positive: str | None = None,
    labels: bool = True,
    out: str | os.PathLike | None = None,
) -> str:
    """``render_report`` of ``tables`` over ``rows`` (token highlights of the shown rows when a table has
    ``token_scores`` and a ``tokenizer`` is given); written to ``out`` when given. Returns the HTML."""
    tables = tables_by_method(tables)
    if isinstance(evaluation, (str, os.PathLike)):
        evaluation = read_evaluation(Path(evaluation))
    tokens = None
    if any("token_scores" in t.columns for t in tables.values()) and tokenizer is not None:
        shown = {int(t.index[i]) for t in tables.values() for i in t.order()[:top]}
        tokens = token_strings([r for r in rows if r.index in shown], tokenizer, max_length)
    html = render_report(
        tables,
        list(rows),
        evaluation=evaluation,
        tokens=tokens,
        top=top,
        title=title,
        extra_meta=extra_meta,
        label_field=label_field,
        positive=positive,
        labels=labels,
    )
    if out is not None:
        write_text_atomic(out, html)
    return html

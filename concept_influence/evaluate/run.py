"""Counterfactual retraining of score tables, from what a session holds: its rows, tables, a concept and queries
(``Attributor.evaluate`` is this function with the session's model as the concept's reader)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from concept_influence.attribution.scores import ScoreTable, tables_by_method
from concept_influence.concepts.base import Concept
from concept_influence.data.chat import ChatRow
from concept_influence.evaluate.counterfactual import EvaluationConfig, evaluate_removals
from concept_influence.models import load_adapter
from concept_influence.models.base import ModelAdapter


def evaluate_tables(
    rows: Sequence[ChatRow],
    tables: ScoreTable | dict[str, ScoreTable] | Sequence[ScoreTable],
    concept: Concept,
    queries: Sequence[ChatRow],
    *,
    base: Any,
    out: str | os.PathLike,
    config: EvaluationConfig | None = None,
    judge: Any = None,
    oracle: Sequence[int] | None = None,
    reader: ModelAdapter | str | os.PathLike | None = None,
    device: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``evaluate_removals`` of ``tables`` over ``rows``: fine-tune ``base`` (a path, hub name or adapter; loaded on
    ``device``) on the rows minus each table's top/bottom/random rows and measure ``concept`` on each model's
    answers to ``queries``, read by ``reader`` (an adapter or a model to load; ``None``: ``base``)."""
    base_adapter = base if isinstance(base, ModelAdapter) else load_adapter(base, device=device)
    reader_adapter = reader if isinstance(reader, ModelAdapter) or reader is None else load_adapter(reader)
    judge_name = getattr(judge, "__qualname__", None) if judge is not None else None
    return evaluate_removals(
        base_adapter,
        list(rows),
        tables_by_method(tables),
        concept,
        list(queries),
        config or EvaluationConfig(),
        out,
        reader=reader_adapter,
        judge=judge,
        judge_name=judge_name,
        oracle=oracle,
        progress=progress,
    )

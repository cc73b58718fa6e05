"""The scores table every attribution method returns: one score per training row, keyed by row index and id,
with the row's passthrough fields. Higher score = training on the row pushes the concept (or measurement) up."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from concept_influence.data.chat import ChatRow, DataFormatError, write_json_atomic, write_jsonl_atomic

RESERVED = ("index", "id", "score", "rank")


@dataclass
class ScoreTable:
    """``scores[i]`` belongs to the row with original index ``index[i]``.

    ``columns``: extra per-row values (e.g. ``model_answer_score`` of Projection Difference), written next to the
    score; ``fields``: each row's passthrough fields; ``meta``: method, concept, timings, config (JSON sidecar).
    """

    method: str
    index: list[int]
    scores: np.ndarray
    ids: list[Any] = field(default_factory=list)
    fields: list[dict[str, Any]] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        n = len(self.index)
        if self.scores.shape[0] != n:
            raise ValueError(f"{self.method}: {self.scores.shape[0]} scores for {n} rows")
        if not self.ids:
            self.ids = [None] * n
        if not self.fields:
            self.fields = [{} for _ in range(n)]
        for name, values in self.columns.items():
            if len(values) != n:
                raise ValueError(f"{self.method}: column {name!r} has {len(values)} values for {n} rows")

    @classmethod
    def from_rows(cls, rows: Sequence[ChatRow], scores: Any, method: str, *, columns: dict[str, list[Any]] | None = None,
                  meta: dict[str, Any] | None = None) -> ScoreTable:
        scores = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
        table = cls(method=method, index=[r.index for r in rows], scores=scores, ids=[r.id for r in rows],
                    fields=[dict(r.fields) for r in rows], columns=dict(columns or {}), meta=dict(meta or {}))
        return table.attach(rows=rows)

    def attach(self, *, rows: Sequence[ChatRow] | None = None, tokenizer: Any = None) -> ScoreTable:
        """Remember the data rows (and tokenizer) for display: the Jupyter view shows their text and, with a
        tokenizer, ``token_scores`` highlights. Not saved to disk. Returns ``self``."""
        display = dict(getattr(self, "_display", {}))
        if rows is not None:
            display["rows"] = list(rows)
        if tokenizer is not None:
            display["tokenizer"] = tokenizer
        self._display = display
        return self

    def _repr_html_(self) -> str:
        """Jupyter display: the ranked rows with token highlights (``concept_influence.report.table_html``)."""
        from concept_influence.report.rows import table_html

        display = getattr(self, "_display", {})
        return table_html(self, rows=display.get("rows"), tokenizer=display.get("tokenizer"))

    def __len__(self) -> int:
        return len(self.index)

    def order(self) -> np.ndarray:
        """Positions sorted by score, highest first (ties broken by original index, so the order is stable)."""
        return np.lexsort((np.asarray(self.index), -self.scores))

    def ranks(self) -> np.ndarray:
        """1-based rank of each row (1 = highest score)."""
        ranks = np.empty(len(self), dtype=np.int64)
        ranks[self.order()] = np.arange(1, len(self) + 1)
        return ranks

    def field_values(self, name: str) -> list[Any]:
        return [f.get(name) for f in self.fields]

    def to_records(self, *, sort: bool = False) -> list[dict[str, Any]]:
        ranks = self.ranks()
        positions = self.order() if sort else range(len(self))
        records = []
        for i in positions:
            record: dict[str, Any] = {"index": int(self.index[i])}
            if self.ids[i] is not None:
                record["id"] = self.ids[i]
            record["score"] = float(self.scores[i])
            record["rank"] = int(ranks[i])
            for name, values in self.columns.items():
                record[name] = _jsonable(values[i])
            for key, value in self.fields[i].items():
                if key not in record:
                    record[key] = value
            records.append(record)
        return records

    def write_jsonl(self, path: str | os.PathLike, *, sort: bool = False) -> Path:
        """Write one JSON object per row (atomically) and ``<path>.meta.json`` with ``meta``."""
        path = Path(path)
        write_jsonl_atomic(path, self.to_records(sort=sort))
        write_json_atomic(meta_path(path), {"method": self.method, "n_rows": len(self), **self.meta})
        return path

    @classmethod
    def read_jsonl(cls, path: str | os.PathLike) -> ScoreTable:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"scores file not found: {path}")
        index, scores, ids, fields = [], [], [], []
        with path.open(encoding="utf-8") as handle:
            for line_no, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                    index.append(int(record["index"]))
                    scores.append(float(record["score"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise DataFormatError(f"{path}:{line_no}: not a scores record ({err})") from None
                ids.append(record.get("id"))
                fields.append({k: v for k, v in record.items() if k not in RESERVED})
        meta: dict[str, Any] = {}
        if meta_path(path).exists():
            meta = json.loads(meta_path(path).read_text())
        return cls(method=meta.get("method", "unknown"), index=index, scores=np.array(scores), ids=ids, fields=fields, meta=meta)


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value

"""Filtering training data by a scores table: choose the rows (or whole groups of rows) to remove, and write the kept
rows exactly as they were, with a manifest of what was removed and why.

Rows are ranked by score, highest first (ties by original index, as ``ScoreTable.order``). With ``by=FIELD`` the
units are the distinct values of that field, ranked by the mean (or sum) score of their rows; removing a unit
removes all its rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from concept_influence.attribution.scores import ScoreTable
from concept_influence.data.chat import ChatDataset, read_chat_jsonl, write_json_atomic, write_text_atomic
from concept_influence.files import file_sha256, same_path
from concept_influence.settings import option

Aggregate = Literal["mean", "sum"]


@dataclass(frozen=True)
class FilterRule:
    """Exactly one of ``remove_top`` (fraction of units, in (0, 1]), ``remove_top_k`` (number of units) or
    ``threshold`` (remove every unit whose score is >= it). ``by``: rank groups of rows by this field;
    ``aggregate``: a group's score is the ``mean`` or ``sum`` of its rows' scores. ``end="bottom"`` removes the
    lowest-scoring units instead (used by counterfactual evaluation)."""

    remove_top: float | None = option(None, help="Remove this fraction of rows (or groups) with the highest scores.")
    remove_top_k: int | None = option(None, help="Remove the K highest-scoring rows (or groups).")
    threshold: float | None = option(None, help="Remove every row (or group) whose score is >= S.")
    by: str | None = option(None, help="Rank whole groups: the values of this data field (e.g. source).")
    aggregate: Aggregate = option("mean", help="--by: a group's score is the mean or sum of its rows' scores.")
    end: Literal["top", "bottom"] = option("top", help="Remove the highest (top) or lowest (bottom) units.", cli=False)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.remove_top, self.remove_top_k, self.threshold)]
        if sum(given) != 1:
            raise ValueError("give exactly one of --remove-top FRACTION, --remove-top-k K or --threshold S")
        if self.remove_top is not None and not 0.0 < self.remove_top <= 1.0:
            raise ValueError(f"--remove-top is a fraction in (0, 1], got {self.remove_top}")
        if self.remove_top_k is not None and self.remove_top_k < 0:
            raise ValueError(f"--remove-top-k must be >= 0, got {self.remove_top_k}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"--threshold must be a finite number, got {self.threshold}")
        if self.aggregate not in ("mean", "sum"):
            raise ValueError(f"aggregate must be 'mean' or 'sum', got {self.aggregate!r}")
        if self.end not in ("top", "bottom"):
            raise ValueError(f"end must be 'top' or 'bottom', got {self.end!r}")

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class FilterResult:
    """``removed``/``kept``: original row indices (sorted); ``unit_scores``: each unit's score (row or group);
    ``removed_units``: the removed units, best first; ``cutoff``: the lowest removed unit score (top) or the
    given threshold."""

    removed: list[int]
    kept: list[int]
    removed_units: list[Any]
    unit_scores: dict[Any, float]
    cutoff: float | None
    rule: FilterRule
    manifest: dict[str, Any] = field(default_factory=dict)


def check_alignment(
    rows: Sequence[Any], table: ScoreTable, *, data_name: str = "data", scores_name: str = "scores"
) -> np.ndarray:
    """``scores[i]`` for data row ``i`` ``[n]`` (NaN for rows the method left out as truncated); mismatched row
    counts, indices or ids are errors."""
    n = len(rows)
    if len(table) != n:
        raise ValueError(
            f"{scores_name} has {len(table)} rows but {data_name} has {n}: they must describe the same rows"
        )
    out = np.full(n, np.nan)
    seen = np.zeros(n, dtype=bool)
    truncated = list(getattr(table, "truncated", None) or [False] * len(table))
    for position, (index, row_id) in enumerate(zip(table.index, table.ids, strict=True)):
        if not 0 <= index < n:
            raise ValueError(f"{scores_name}: row {position} has index {index}, outside the {n} rows of {data_name}")
        if seen[index]:
            raise ValueError(f"{scores_name}: index {index} appears twice")
        seen[index] = True
        data_id = rows[index].fields.get("id")
        if row_id is not None and data_id is not None and row_id != data_id:
            raise ValueError(
                f"{scores_name}: index {index} has id {row_id!r} but {data_name} row {index} has id {data_id!r}"
            )
        if (row_id is None) != (data_id is None):
            raise ValueError(
                f"{scores_name}: index {index} has id {row_id!r} but {data_name} row {index} has id {data_id!r}"
            )
        out[index] = table.scores[position]
        if not truncated[position] and not np.isfinite(out[index]):
            raise ValueError(f"{scores_name}: row {index} has a non-finite score ({out[index]})")
    return out


def check_data_provenance(
    table: ScoreTable,
    data: str | os.PathLike,
    *,
    n_rows: int | None = None,
    allow_other_data: bool = False,
    scores_name: str = "scores",
    data_flag: str = "--data",
) -> dict[str, Any] | None:
    """Refuse a scores table made on other data than the file ``data``: its meta records the SHA-256 of the data
    it scored (``data_sha256``, written by ``attribute``), and that must be the hash of ``data``'s bytes. A table
    without that hash is accepted only when its rows carry ids (``check_alignment`` matches them); otherwise
    nothing ties it to ``data`` and it is refused (``n_rows``: the data's row count; when it differs from the
    table's, ``check_alignment`` gives the clearer error instead). ``allow_other_data`` (``--allow-other-data``) accepts
    it anyway and returns what was overridden (to record in the output's metadata); ``None`` when nothing was."""
    recorded = table.meta.get("data_sha256")
    if n_rows is not None and n_rows != len(table):
        return None  # check_alignment refuses it, naming both row counts
    actual = file_sha256(data)
    if recorded and recorded == actual:
        return None
    if recorded:
        problem = (
            f"{scores_name} was computed on other data ({table.meta.get('data') or 'unnamed'}, SHA-256 "
            f"{str(recorded)[:16]}...) than {data_flag} {data} (SHA-256 {actual[:16]}...)"
        )
    elif all(i is None for i in table.ids):
        problem = (
            f"{scores_name} records no hash of the data it scored and its rows have no ids, so nothing shows "
            f"that it scores {data_flag} {data}"
        )
    else:
        return None  # no hash, but every row's id is matched with the data's by check_alignment
    if not allow_other_data:
        raise ValueError(f"{problem}; pass --allow-other-data to use it anyway")
    return {
        "scores": scores_name,
        "data": str(data),
        "data_sha256": actual,
        "scores_data": table.meta.get("data"),
        "scores_data_sha256": recorded,
        "reason": problem,
    }


def _units(
    rows: Sequence[Any], scores: np.ndarray, by: str | None, aggregate: Aggregate
) -> tuple[list[Any], np.ndarray, list[list[int]]]:
    if by is None:
        return list(range(len(rows))), scores, [[i] for i in range(len(rows))]
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        if by not in row.fields:
            raise ValueError(f"--by {by}: data row {i} (line {row.line}) has no field {by!r}")
        value = row.fields[by]
        key = value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)
        groups.setdefault(key, []).append(i)
    keys = list(groups)

    def reduce(values: np.ndarray) -> float:
        values = values[np.isfinite(values)]
        if values.size == 0:
            return float("nan")
        return float(values.mean() if aggregate == "mean" else values.sum())

    return keys, np.array([reduce(scores[groups[k]]) for k in keys]), [groups[k] for k in keys]


def select_removal(rows: Sequence[Any], scores: np.ndarray, rule: FilterRule) -> FilterResult:
    """Apply ``rule`` to per-row ``scores`` ``[n]`` (aligned with ``rows``)."""
    keys, unit_scores, members = _units(rows, np.asarray(scores, dtype=np.float64), rule.by, rule.aggregate)
    sign = -1.0 if rule.end == "top" else 1.0
    scored = np.flatnonzero(np.isfinite(unit_scores))  # unscored units (truncated rows) are never removed
    order = scored[np.lexsort((scored, sign * unit_scores[scored]))]  # best first, ties by first appearance
    if rule.threshold is not None:
        chosen = [
            u
            for u in order
            if (unit_scores[u] >= rule.threshold if rule.end == "top" else unit_scores[u] <= rule.threshold)
        ]
        cutoff: float | None = rule.threshold
    else:
        k = rule.remove_top_k if rule.remove_top_k is not None else int(round(rule.remove_top * len(order)))  # type: ignore[operator]
        chosen = list(order[:k])
        cutoff = float(unit_scores[chosen[-1]]) if chosen else None
    removed = sorted(i for u in chosen for i in members[u])
    removed_set = set(removed)
    return FilterResult(
        removed=removed,
        kept=[i for i in range(len(rows)) if i not in removed_set],
        removed_units=[keys[u] for u in chosen],
        unit_scores={keys[u]: float(unit_scores[u]) for u in range(len(keys))},  # NaN: unscored
        cutoff=cutoff,
        rule=rule,
    )


def filter_scores(
    rows: Sequence[Any], table: ScoreTable, rule: FilterRule, *, data_name: str = "data", scores_name: str = "scores"
) -> FilterResult:
    """Check that ``table`` scores exactly ``rows``, then choose what ``rule`` removes (the names go in errors)."""
    return select_removal(rows, check_alignment(rows, table, data_name=data_name, scores_name=scores_name), rule)


def filter_file(
    data: str | os.PathLike,
    scores: str | os.PathLike,
    out: str | os.PathLike,
    rule: FilterRule,
    *,
    allow_other_data: bool = False,
) -> FilterResult:
    """Write the rows of ``data`` that ``rule`` keeps to ``out`` byte for byte (original lines, original order) and
    ``<out>.manifest.json`` with what was removed and on what basis. Scores made on other data are refused
    (``check_data_provenance``) unless ``allow_other_data``, which the manifest then records."""
    data, scores, out = Path(data), Path(scores), Path(out)
    for flag, source in (("--data", data), ("--scores", scores)):
        for target in (out, manifest_path(out)):
            if same_path(target, source):
                raise ValueError(f"--out {out} would overwrite {flag} {source}: choose another file")
    rows = read_chat_jsonl(data)
    table = ScoreTable.read_jsonl(scores)
    override = check_data_provenance(
        table, data, n_rows=len(rows), allow_other_data=allow_other_data, scores_name=f"--scores {scores}"
    )
    result = filter_scores(rows, table, rule, data_name=str(data), scores_name=str(scores))
    write_text_atomic(out, "".join(_raw_lines(data, rows, result.kept)))
    scores_by_index = check_alignment(rows, table, data_name=str(data), scores_name=str(scores))
    result.manifest = {
        "format": "concept_influence.filter",
        "data": str(data),
        "scores": str(scores),
        "out": str(out),
        "data_sha256": file_sha256(data),
        "allow_other_data": override is not None,
        **({"other_data": override} if override is not None else {}),
        "method": table.meta.get("method", table.method),
        "concept": table.meta.get("concept") or table.meta.get("measurement"),
        "rule": rule.describe(),
        "threshold": result.cutoff,
        "n_rows": len(rows),
        "n_removed": len(result.removed),
        "n_kept": len(result.kept),
        "removed_groups": (
            [{"value": v, "score": result.unit_scores[v]} for v in result.removed_units]
            if rule.by is not None
            else None
        ),
        "removed": [
            {
                "index": i,
                "line": rows[i].line,
                **({"id": rows[i].id} if rows[i].id is not None else {}),
                "score": float(scores_by_index[i]),
            }
            for i in result.removed
        ],
    }
    write_json_atomic(manifest_path(out), result.manifest)
    return result


def manifest_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")


def _raw_lines(path: Path, rows: ChatDataset, keep: Sequence[int]) -> list[str]:
    """The original text of the kept rows' lines (newline-terminated), in file order. Lines are split on ``\n``
    only, as ``read_chat_jsonl`` splits them (a bare ``\r`` is JSON whitespace inside a row, not a line break)."""
    wanted = {rows[i].line for i in keep}
    lines = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no in wanted:
                text = raw.decode("utf-8")  # the reader accepted this line, so it is UTF-8
                lines.append(text if text.endswith("\n") else text + "\n")
    return lines

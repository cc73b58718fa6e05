"""The scores table every attribution method returns: one score per training row, keyed by row index and id,
with the row's passthrough fields. Higher score = training on the row pushes the concept (or measurement) up.

Also the table's ranked rows as HTML (conversation text, scores, per-token highlights): the Jupyter display of a
``ScoreTable`` and the rows of the HTML report (``report.rows`` re-exports them). Every piece of row text goes
through ``html.escape``: training data is untrusted and must never become markup or script."""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from concept_influence.data.chat import (
    ChatRow,
    DataFormatError,
    capped_lines,
    line_cap,
    parse_json_line,
    write_json_atomic,
)
from concept_influence.data.tokenize import tokenize_chat
from concept_influence.files import read_json_file, write_text_atomic
from concept_influence.numerics import NonFiniteError

RESERVED = ("index", "id", "score", "rank")
COLUMNS_KEY = "columns"  # in the ``.meta.json`` sidecar: the names of the table's method columns
KNOWN_COLUMNS = ("token_scores",)  # restored as columns from a file without a (valid) sidecar


@dataclass
class ScoreTable:
    """``scores[i]`` belongs to the row with original index ``index[i]``.

    ``columns``: extra per-row values (e.g. ``model_answer_score`` of Projection Difference), written next to the
    score; ``fields``: each row's passthrough fields; ``meta``: method, concept, timings, config (JSON sidecar).
    ``truncated[i]``: row ``i`` lost its whole answer to truncation and was left out (``--skip-invalid``): its
    score is NaN here and ``null`` in files, it has no rank and ``order``/``top`` (hence filtering) skip it.
    Every other score must be finite (a ``NonFiniteError`` names the row otherwise).
    """

    method: str
    index: list[int]
    scores: np.ndarray
    ids: list[Any] = field(default_factory=list)
    fields: list[dict[str, Any]] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        n = len(self.index)
        if self.scores.shape[0] != n:
            raise ValueError(f"{self.method}: {self.scores.shape[0]} scores for {n} rows")
        self.truncated = [bool(t) for t in self.truncated] if self.truncated else [False] * n
        if len(self.truncated) != n:
            raise ValueError(f"{self.method}: {len(self.truncated)} truncation flags for {n} rows")
        self.scores[np.asarray(self.truncated, dtype=bool)] = np.nan
        bad = np.flatnonzero(~np.isfinite(self.scores) & ~np.asarray(self.truncated, dtype=bool))
        if bad.size:
            i = int(bad[0])
            raise NonFiniteError(
                f"{self.method} scores: row {self.index[i]} has score {self.scores[i]}"
                + (f" ({bad.size - 1} more rows)" if bad.size > 1 else "")
                + "; refusing to rank or write non-finite scores"
            )
        if not self.ids:
            self.ids = [None] * n
        if not self.fields:
            self.fields = [{} for _ in range(n)]
        for name, values in self.columns.items():
            if len(values) != n:
                raise ValueError(f"{self.method}: column {name!r} has {len(values)} values for {n} rows")

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[ChatRow],
        scores: Any,
        method: str,
        *,
        columns: dict[str, list[Any]] | None = None,
        meta: dict[str, Any] | None = None,
        truncated: Sequence[bool] | None = None,
    ) -> ScoreTable:
        """A table over ``rows`` (``truncated``: rows left out, see the class docstring; counted in ``meta``)."""
        scores = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
        meta = dict(meta or {})
        if truncated is not None and any(truncated):
            meta["n_skipped_truncated"] = int(sum(bool(t) for t in truncated))
        table = cls(
            method=method,
            index=[r.index for r in rows],
            scores=scores,
            ids=[r.id for r in rows],
            fields=[dict(r.fields) for r in rows],
            columns=dict(columns or {}),
            meta=meta,
            truncated=list(truncated or []),
        )
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

    def __len__(self) -> int:
        return len(self.index)

    @property
    def valid(self) -> np.ndarray:
        """``[N]`` bool: rows that have a score (not left out as truncated)."""
        return ~np.asarray(self.truncated, dtype=bool)

    def order(self) -> np.ndarray:
        """Positions of the scored rows sorted by score, highest first (ties broken by original index, so the
        order is stable); rows left out as truncated are not in it."""
        valid = np.flatnonzero(self.valid)
        keys = np.lexsort((np.asarray(self.index)[valid], -self.scores[valid]))
        return valid[keys]

    def ranks(self) -> np.ndarray:
        """1-based rank of each row (1 = highest score; 0 for rows left out as truncated)."""
        ranks = np.zeros(len(self), dtype=np.int64)
        order = self.order()
        ranks[order] = np.arange(1, len(order) + 1)
        return ranks

    def top(self, k: int = 20) -> ScoreTable:
        """The ``k`` highest-scoring rows, best first, as a table (same columns, fields and meta; ranks stay the
        global ones since they are the top ``k``). Displays as an HTML table in Jupyter."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        keep = self.order()[:k]
        return self.subset(keep)

    def subset(self, positions: Any) -> ScoreTable:
        """The rows at ``positions`` (in that order) as a new table."""
        keep = [int(i) for i in positions]
        return ScoreTable(
            method=self.method,
            index=[self.index[i] for i in keep],
            scores=self.scores[keep],
            ids=[self.ids[i] for i in keep],
            fields=[self.fields[i] for i in keep],
            columns={name: [values[i] for i in keep] for name, values in self.columns.items()},
            meta=dict(self.meta),
            truncated=[self.truncated[i] for i in keep],
        ).attach(**getattr(self, "_display", {}))

    def to_pandas(self, *, sort: bool = False):
        """A ``pandas.DataFrame`` with the CLI's columns (``index``, ``id``, ``score``, ``rank``, method columns,
        passthrough fields); pandas is an optional dependency."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - pandas is optional
            raise ImportError("ScoreTable.to_pandas needs pandas: pip install pandas") from err
        return pd.DataFrame.from_records(self.to_records(sort=sort))

    def __repr__(self) -> str:
        lines = [f"ScoreTable({self.method!r}, {len(self)} rows)"]
        for record in [r for r in self.to_records(sort=True) if r["score"] is not None][:10]:
            lines.append(
                f"  rank {record['rank']:>5}  index {record['index']:>6}  score {record['score']:+.4g}"
                + (f"  id {record['id']}" if "id" in record else "")
            )
        if len(self) > 10:
            lines.append("  ...")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Jupyter display: the ranked rows (text of attached rows, token highlights with an attached tokenizer),
        rendered by ``table_html``."""
        display = getattr(self, "_display", {})
        return table_html(self, rows=display.get("rows"), tokenizer=display.get("tokenizer"))

    def field_values(self, name: str) -> list[Any]:
        return [f.get(name) for f in self.fields]

    def to_records(self, *, sort: bool = False) -> list[dict[str, Any]]:
        """One dict per row (``sort``: best first, rows left out as truncated last); a left-out row has
        ``score: None``, ``rank: None``, ``truncated: True``."""
        ranks = self.ranks()
        positions = [*self.order(), *np.flatnonzero(~self.valid)] if sort else range(len(self))
        records = []
        for i in positions:
            record: dict[str, Any] = {"index": int(self.index[i])}
            if self.ids[i] is not None:
                record["id"] = self.ids[i]
            if self.truncated[i]:
                record.update(score=None, rank=None, truncated=True)
            else:
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
        """Write one JSON object per row (atomically) and ``<path>.meta.json`` with ``meta``. The sidecar records
        the scores file's SHA-256, so a sidecar left from another version of the file (a run killed between the
        two writes) is recognised and ignored by ``read_jsonl``, never mixed with the wrong scores. It also names
        the method's ``columns`` (e.g. ``token_scores``), so ``read_jsonl`` restores them as columns, not fields."""
        path = Path(path)
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in self.to_records(sort=sort))
        write_text_atomic(path, text)
        write_json_atomic(
            meta_path(path),
            {
                "method": self.method,
                "n_rows": len(self),
                "n_skipped_truncated": int(sum(self.truncated)),
                **self.meta,
                COLUMNS_KEY: list(self.columns),
                "scores_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            },
        )
        return path

    @classmethod
    def read_jsonl(cls, path: str | os.PathLike) -> ScoreTable:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"scores file not found: {path}")
        index, scores, ids, fields, truncated = [], [], [], [], []
        limit = line_cap()
        with path.open("rb") as handle:
            for line_no, (raw, whole) in enumerate(capped_lines(handle, limit), start=1):
                if not whole:
                    raise DataFormatError(
                        f"{path}:{line_no}: line longer than {limit:,} bytes (the cap on a line; raise "
                        "it with CONCEPT_INFLUENCE_MAX_LINE_BYTES=N)"
                    )
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFormatError(
                        f"{path}:{line_no}: not UTF-8 text (byte {err.start}: {err.reason})"
                    ) from None
                if not text.strip():
                    continue
                try:
                    record = parse_json_line(text, f"{path}:{line_no}")
                    skipped = record.get("score") is None and record.get("truncated") is True
                    score = math.nan if skipped else float(record["score"])
                    if not math.isfinite(score) and not skipped:
                        raise ValueError(f"score {record['score']!r} is not a finite number")
                    index.append(int(record["index"]))
                    scores.append(score)
                    truncated.append(skipped)
                except DataFormatError:
                    raise
                except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
                    raise DataFormatError(f"{path}:{line_no}: not a scores record ({err})") from None
                ids.append(record.get("id"))
                fields.append(
                    {k: v for k, v in record.items() if k not in RESERVED and not (k == "truncated" and skipped)}
                )
        meta: dict[str, Any] = {}
        if meta_path(path).exists():
            meta = read_json_file(meta_path(path), error=DataFormatError, object_only=False)
            digest = meta.get("scores_sha256") if isinstance(meta, dict) else None
            if not isinstance(meta, dict) or (digest and digest != hashlib.sha256(path.read_bytes()).hexdigest()):
                warnings.warn(
                    f"{meta_path(path)} belongs to another version of {path} (an interrupted write?); ignoring it",
                    stacklevel=2,
                )
                meta = {}
        names = meta.pop(COLUMNS_KEY, None)
        names = (
            [str(n) for n in names]
            if isinstance(names, list)
            else [n for n in KNOWN_COLUMNS if all(n in f for f in fields)]
        )
        columns = {name: [f.pop(name, None) for f in fields] for name in names if name not in RESERVED}
        return cls(
            method=meta.get("method", "unknown"),
            index=index,
            scores=np.array(scores),
            ids=ids,
            fields=fields,
            columns=columns,
            meta=meta,
            truncated=truncated,
        )


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(_jsonable(value), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


# ---- the ranked rows as HTML (Jupyter display, report) ----------------------------------------------------------
STYLE = """
.ci-rows{border-collapse:collapse;font:13px/1.45 system-ui,sans-serif;width:100%}
.ci-rows th,.ci-rows td{border-bottom:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
.ci-rows td.num{font-family:monospace;white-space:nowrap}
.ci-text{white-space:pre-wrap;max-width:70em}
.ci-role{font-weight:600;color:#555}
.ci-tok{border-radius:2px}
.ci-tokens{margin-top:4px;padding-top:4px;border-top:1px dashed #ccc;font-family:monospace;font-size:12px}
.ci-fields{color:#666;font-size:12px}
.ci-tier{white-space:nowrap}
"""


def token_strings(rows: Sequence[Any], tokenizer: Any, max_length: int = 512) -> dict[int, list[str]]:
    """``{row index: [token text, ...]}`` for the rows as ``attribute`` tokenised them (chat template), so that
    ``token_scores`` can be laid over them."""
    data = tokenize_chat(list(rows), tokenizer, max_length, warn=False)
    out = {}
    for row, tokenized in zip(rows, data.rows, strict=True):
        out[row.index] = [tokenizer.decode([t]) for t in tokenized.input_ids]
    return out


def fmt_number(value: Any, digits: int = 4, *, sign: bool = False) -> str:
    """A number as text with at most ``digits`` significant digits (``4.001741886138916`` -> ``4.002``); integers
    and anything that is not a number are shown as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):+d}" if sign else str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:{'+' if sign else ''}.{digits}g}"


TIER_NAMES = {1: "tier 1: Concept Influence > 0", 2: "tier 2: Concept Influence ≤ 0"}


def tier_notes(table: ScoreTable) -> dict[int, str] | None:
    """For a ``tiered`` fusion (``combine.fuse``: tier 1 scores in (2, 3], tier 2 in (0, 1]): ``{position: "tier
    1, #3 of 187"}`` (the third of tier 1's 187 rows, by Vector Filter) for every scored row, which says what its score
    means; ``None`` for any other table. Every tier-1 row ranks above every tier-2 row, so the rank inside tier 2 is the
    rank minus tier 1's size."""
    if table.meta.get("fusion") != "tiered":
        return None
    ranks = table.ranks()
    valid = table.valid
    first = valid & (table.scores > 1.5)
    n_first, n_second = int(first.sum()), int((valid & ~first).sum())
    notes = {}
    for i in np.flatnonzero(valid):
        if first[i]:
            notes[int(i)] = f"tier 1, #{int(ranks[i])} of {n_first}"
        else:
            notes[int(i)] = f"tier 2, #{int(ranks[i]) - n_first} of {n_second}"
    return notes


def tier_summary(table: ScoreTable) -> str | None:
    """One paragraph (plain text) that explains a ``tiered`` table's scores, with its tier sizes."""
    if table.meta.get("fusion") != "tiered":
        return None
    valid = table.valid
    n_first = int((valid & (table.scores > 1.5)).sum())
    return (
        f"How to read this score: two tiers. Tier 1 ({n_first} rows) holds every row whose Concept Influence is "
        "positive (training on it would push the concept up); they are ranked by Vector Filter (how strongly the "
        "row voices the concept) and scored 2 + the row's Vector Filter percentile among all rows, so in (2, 3] "
        f"(+3: the highest Vector Filter score of all). Tier 2 ({int(valid.sum()) - n_first} rows) holds the others, "
        "ranked by Concept Influence and scored by its percentile, in (0, 1]: the rows whose training would lower "
        'the concept most come last. "tier 1, #3 of N": the row is the third of tier 1\'s N rows. forward_score is '
        "the row's Vector Filter score, gradient_score its Concept Influence."
    )


def _conversation_html(messages: Sequence[Mapping[str, str]]) -> str:
    parts = []
    for message in messages:
        parts.append(f'<span class="ci-role">{html.escape(message["role"])}:</span> {html.escape(message["content"])}')
    return "<br>".join(parts)


def _tokens_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Tokens with a background whose colour is the sign (red: raises the concept, blue: lowers it) and whose
    opacity is the score relative to the row's largest absolute token score."""
    finite = [abs(float(s)) for s in scores if math.isfinite(float(s))]
    peak = max(finite) if finite else 0.0
    spans = []
    for token, score in zip(tokens, scores, strict=True):
        score = float(score)
        alpha = min(1.0, abs(score) / peak) * 0.85 if peak > 0 and math.isfinite(score) else 0.0
        color = f"rgba(220,40,40,{alpha:.3f})" if score > 0 else f"rgba(40,90,220,{alpha:.3f})"
        spans.append(
            f'<span class="ci-tok" style="background:{color}" title="{score:+.3g}">{html.escape(token)}</span>'
        )
    return "".join(spans)


def rows_table_html(
    table: ScoreTable,
    *,
    rows: Sequence[Any] | None = None,
    tokens: Mapping[int, Sequence[str]] | None = None,
    top: int = 20,
    fields: Sequence[str] | None = None,
) -> str:
    """The ``top`` highest-scoring rows of ``table`` as an HTML table (rank, index, id, score, fields, text).

    ``rows``: the data rows (``ChatRow``, by index) for the conversation text; ``tokens``: per-row token strings,
    used with the table's ``token_scores`` column for highlights.
    """
    by_index = {r.index: r for r in rows} if rows is not None else {}
    token_scores = table.columns.get("token_scores")
    ranks = table.ranks()
    order = table.order()[:top]
    scalar_columns = {
        name: values
        for name, values in table.columns.items()
        if name != "model_answer" and all(v is None or isinstance(v, (str, int, float, bool)) for v in values)
    }
    if fields is None:
        seen: dict[str, None] = dict.fromkeys(scalar_columns)  # e.g. a fusion's forward_score and gradient_score
        for i in order:
            for key, value in table.fields[i].items():
                if isinstance(value, (str, int, float, bool)) and key not in ("messages", "prompt", "completion", "id"):
                    seen.setdefault(key, None)
        fields = list(seen)[:4]
    notes = tier_notes(table)
    heads = ["rank", "index", "id", "score", *(["tier, rank in tier"] if notes is not None else []), *fields, "text"]
    header = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    body = []
    for i in order:
        index = int(table.index[i])
        row = by_index.get(index)
        cells = [
            str(int(ranks[i])),
            str(index),
            html.escape(str(table.ids[i] if table.ids[i] is not None else "")),
            fmt_number(float(table.scores[i]), sign=True),
        ]
        cells = [f'<td class="num">{c}</td>' for c in cells]
        if notes is not None:
            cells.append(f'<td class="ci-fields ci-tier">{html.escape(notes.get(int(i), ""))}</td>')
        values = [scalar_columns[f][i] if f in scalar_columns else table.fields[i].get(f, "") for f in fields]
        cells += [f'<td class="ci-fields">{html.escape(fmt_number("" if v is None else v))}</td>' for v in values]
        text = ""
        if row is not None:
            text = _conversation_html(row.messages)
        if "model_answer" in table.columns:
            text += (
                f'<br><span class="ci-role">model answer:</span> {html.escape(str(table.columns["model_answer"][i]))}'
            )
        if (
            token_scores is not None
            and tokens is not None
            and index in tokens
            and len(tokens[index]) == len(token_scores[i])
        ):
            text += f'<div class="ci-tokens">{_tokens_html(tokens[index], token_scores[i])}</div>'
        body.append("<tr>" + "".join(cells) + f'<td class="ci-text">{text}</td></tr>')
    return f'<table class="ci-rows"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def table_html(table: ScoreTable, *, rows: Sequence[Any] | None = None, tokenizer: Any = None, top: int = 20) -> str:
    """A self-contained HTML fragment for Jupyter: a title line, then the ranked rows with token highlights (when
    the table has ``token_scores`` and a tokenizer is known)."""
    tokens = None
    if tokenizer is not None and rows is not None and "token_scores" in table.columns:
        shown = {int(table.index[i]) for i in table.order()[:top]}
        tokens = token_strings([r for r in rows if r.index in shown], tokenizer)
    title = (
        f"<p><b>{html.escape(table.method)}</b>: {len(table)} rows scored; top {min(top, len(table))} "
        "(higher score = training on the row pushes the concept up)</p>"
    )
    return f"<div><style>{STYLE}</style>{title}{rows_table_html(table, rows=rows, tokens=tokens, top=top)}</div>"


def tables_by_method(tables: ScoreTable | dict[str, ScoreTable] | Sequence[ScoreTable]) -> dict[str, ScoreTable]:
    """``{name: table}`` of one table, a dict of them or a list (named by their methods)."""
    if isinstance(tables, ScoreTable):
        return {tables.method: tables}
    if isinstance(tables, dict):
        return tables
    return {t.method: t for t in tables}

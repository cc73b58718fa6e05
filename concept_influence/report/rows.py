"""Ranked rows as HTML: conversation text, scores and per-token highlights. Shared by the HTML report and the
Jupyter display of a ``ScoreTable``. Every piece of row text goes through ``html.escape``: training data is
untrusted and must never become markup or script."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from concept_influence.attribution.scores import ScoreTable

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
    from concept_influence.data.tokenize import tokenize_chat

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
    1, #3 of 187"}`` (the third of tier 1's 187 rows, by Vector Filter) for every scored row, which says what its score means; ``None`` for any other
    table. Every tier-1 row ranks above every tier-2 row, so the rank inside tier 2 is the rank minus tier 1's size."""
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
    return (f"How to read this score: two tiers. Tier 1 ({n_first} rows) holds every row whose Concept Influence is "
            "positive (training on it would push the concept up); they are ranked by Vector Filter (how strongly the "
            "row voices the concept) and scored 2 + the row's Vector Filter percentile among all rows, so in (2, 3] "
            f"(+3: the highest Vector Filter score of all). Tier 2 ({int(valid.sum()) - n_first} rows) holds the others, "
            "ranked by Concept Influence and scored by its percentile, in (0, 1]: the rows whose training would lower "
            "the concept most come last. \"tier 1, #3 of N\": the row is the third of tier 1's N rows. forward_score is the row's Vector Filter score, gradient_score its Concept "
            "Influence.")


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
        spans.append(f'<span class="ci-tok" style="background:{color}" title="{score:+.3g}">{html.escape(token)}</span>')
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
    scalar_columns = {name: values for name, values in table.columns.items()
                      if name != "model_answer" and all(v is None or isinstance(v, (str, int, float, bool)) for v in values)}
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
        cells = [str(int(ranks[i])), str(index), html.escape(str(table.ids[i] if table.ids[i] is not None else "")),
                 fmt_number(float(table.scores[i]), sign=True)]
        cells = [f'<td class="num">{c}</td>' for c in cells]
        if notes is not None:
            cells.append(f'<td class="ci-fields ci-tier">{html.escape(notes.get(int(i), ""))}</td>')
        values = [scalar_columns[f][i] if f in scalar_columns else table.fields[i].get(f, "") for f in fields]
        cells += [f'<td class="ci-fields">{html.escape(fmt_number("" if v is None else v))}</td>' for v in values]
        text = ""
        if row is not None:
            text = _conversation_html(row.messages)
        if "model_answer" in table.columns:
            text += f'<br><span class="ci-role">model answer:</span> {html.escape(str(table.columns["model_answer"][i]))}'
        if token_scores is not None and tokens is not None and index in tokens and len(tokens[index]) == len(token_scores[i]):
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
    title = (f"<p><b>{html.escape(table.method)}</b>: {len(table)} rows scored; top {min(top, len(table))} "
             "(higher score = training on the row pushes the concept up)</p>")
    return f"<div><style>{STYLE}</style>{title}{rows_table_html(table, rows=rows, tokens=tokens, top=top)}</div>"

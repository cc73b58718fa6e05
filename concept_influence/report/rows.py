"""Ranked rows as HTML: conversation text, scores and per-token highlights. Shared by the HTML report and the
Jupyter display of a ``ScoreTable``, and defined next to it (``attribution.scores``); re-exported here."""

from concept_influence.attribution.scores import (
    STYLE,
    TIER_NAMES,
    fmt_number,
    rows_table_html,
    table_html,
    tier_notes,
    tier_summary,
    token_strings,
)

__all__ = [
    "STYLE",
    "TIER_NAMES",
    "fmt_number",
    "rows_table_html",
    "table_html",
    "tier_notes",
    "tier_summary",
    "token_strings",
]

"""Ranked rows as HTML: conversation text, scores and per-token highlights. Shared by the HTML report and the
Jupyter display of a ``ScoreTable``, and defined next to it (``attribution.scores``); re-exported here."""

from concept_influence.attribution.scores import STYLE, rows_table_html, table_html, token_strings

__all__ = ["STYLE", "rows_table_html", "table_html", "token_strings"]

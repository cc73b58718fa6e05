"""Seeing the results: the self-contained HTML report, plots, and the Jupyter display of score tables."""

from concept_influence.report.html import render_report
from concept_influence.report.plots import histogram_png, removal_curve_png
from concept_influence.report.rows import rows_table_html, table_html, token_strings

__all__ = ["histogram_png", "removal_curve_png", "render_report", "rows_table_html", "table_html", "token_strings"]

"""Seeing the results: the self-contained HTML report, plots, and the Jupyter display of score tables."""

from concept_influence.report.build import write_report
from concept_influence.report.html import render_report, resolve_labels
from concept_influence.report.plots import (
    histogram_panels_png,
    histogram_png,
    precision_recall_png,
    removal_curve_png,
)
from concept_influence.report.rows import fmt_number, rows_table_html, table_html, token_strings

__all__ = [
    "fmt_number",
    "histogram_panels_png",
    "histogram_png",
    "precision_recall_png",
    "removal_curve_png",
    "render_report",
    "resolve_labels",
    "rows_table_html",
    "table_html",
    "token_strings",
    "write_report",
]

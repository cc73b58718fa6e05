"""Plots for the report, rendered to PNG bytes: defined in ``concept_influence.plots`` (below ``evaluate``, which
draws the removal curve, and ``report``); re-exported here."""

from concept_influence.plots import (
    data_uri,
    histogram_panels_png,
    histogram_png,
    precision_recall_png,
    removal_curve_png,
)

__all__ = ["data_uri", "histogram_panels_png", "histogram_png", "precision_recall_png", "removal_curve_png"]

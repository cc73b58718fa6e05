"""Plots for evaluations and reports (defined in ``concept_influence.plots``, shared with ``evaluate``; re-exported here)."""

from concept_influence.plots import data_uri, histogram_png, removal_curve_png

__all__ = ["data_uri", "histogram_png", "removal_curve_png"]

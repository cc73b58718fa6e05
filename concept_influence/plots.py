"""Plots for evaluations and reports, rendered to PNG bytes (matplotlib, Agg backend, no display needed).

A module of its own below ``evaluate`` (which writes the removal curve) and ``report`` (``report.plots`` re-exports it)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _figure(ncols: int = 1, width: float = 5.5, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)


def _png(fig) -> bytes:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def removal_curve_png(evaluation: Mapping[str, Any]) -> bytes:
    """Measurement after removing each fraction (remove-top, remove-bottom per method, random), with 95% CIs over
    seeds; the full and base models as horizontal lines and the oracle as a star. One panel per metric."""
    metrics = list(evaluation.get("metrics", ["probe"]))
    fig, axes = _figure(len(metrics))
    colors = iter(["C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9"])
    styles = {name: next(colors, "C7") for name in evaluation.get("results", {})}
    for ax, metric in zip(axes[0], metrics, strict=True):
        def pick(entry: Mapping[str, Any], metric: str = metric) -> tuple[float, list[float]]:
            block = entry if metric == "probe" else entry[metric]
            return block["mean"], block["ci"]

        random_drawn = False
        for name, per_fraction in evaluation.get("results", {}).items():
            fractions = sorted(per_fraction.values(), key=lambda e: e["fraction"])
            xs = [0.0] + [e["fraction"] for e in fractions]
            for kind, style in (("remove_top", "-o"), ("remove_bottom", ":v")):
                points = [pick(evaluation["full"])] + [pick(e[kind]) for e in fractions]
                _line(ax, xs, points, style, styles[name], f"{name} {kind.replace('_', ' ')}")
            if not random_drawn:
                points = [pick(evaluation["full"])] + [pick(e["random"]) for e in fractions]
                _line(ax, xs, points, "--s", "0.4", "random removal")
                random_drawn = True
        ax.axhline(pick(evaluation["full"])[0], color="k", lw=0.8, label="full data")
        ax.axhline(pick(evaluation["base"])[0], color="k", lw=0.8, ls="--", label="base model")
        if "oracle" in evaluation:
            mean, ci = pick(evaluation["oracle"])
            ax.errorbar([evaluation["oracle"]["fraction"]], [mean], yerr=[[mean - ci[0]], [ci[1] - mean]], fmt="*",
                        color="C3", ms=12, capsize=3, label="oracle (planted rows)")
        ax.set_xlabel("fraction of rows removed")
        ax.set_ylabel("probe readout of own answers" if metric == "probe" else "judge trait rate")
        ax.set_title(f"{metric}: mean and 95% CI over {evaluation.get('seeds', '?')} seeds", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    return _png(fig)


def _line(ax, xs: Sequence[float], points: Sequence[tuple[float, list[float]]], style: str, color: str, label: str) -> None:
    means = np.array([p[0] for p in points])
    lo = np.array([p[1][0] for p in points])
    hi = np.array([p[1][1] for p in points])
    ax.plot(xs, means, style, color=color, label=label, ms=4)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.15)


def histogram_png(series: Mapping[str, Sequence[float]], *, title: str, xlabel: str = "score") -> bytes:
    """Overlaid histograms of several named score series."""
    fig, axes = _figure(1, 5.0, 3.2)
    ax = axes[0][0]
    for name, values in series.items():
        ax.hist(np.asarray(values, dtype=np.float64), bins=40, alpha=0.5, label=f"{name} ({len(values)})")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _png(fig)

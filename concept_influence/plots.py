"""Plots for evaluations and reports, rendered to PNG bytes (matplotlib, Agg backend, no display needed).

A module of its own below ``evaluate`` (which writes the removal curve) and ``report`` (``report.plots`` re-exports
it)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _figure(ncols: int = 1, width: float = 5.5, height: float = 3.6, nrows: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def _png(fig) -> bytes:
    """The figure as PNG bytes. Every text in it (titles, legends, tick labels) is drawn literally: labels come
    from the data (field values, file names), and matplotlib would parse ``$...$`` in them as mathtext (``$\\foo{$``
    raised ValueError and no report was written)."""
    from matplotlib import pyplot as plt

    literal_texts(fig)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def literal_texts(fig: Any) -> None:
    """Draw every text of a figure literally (no mathtext): call before saving a figure whose labels come from data."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_parse_math(False)


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
            ax.errorbar(
                [evaluation["oracle"]["fraction"]],
                [mean],
                yerr=[[mean - ci[0]], [ci[1] - mean]],
                fmt="*",
                color="C3",
                ms=12,
                capsize=3,
                label="oracle (planted rows)",
            )
        ax.set_xlabel("fraction of rows removed")
        ax.set_ylabel("probe readout of own answers" if metric == "probe" else "judge trait rate")
        ax.set_title(f"{metric}: mean and 95% CI over {evaluation.get('seeds', '?')} seeds", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    return _png(fig)


def _line(
    ax, xs: Sequence[float], points: Sequence[tuple[float, list[float]]], style: str, color: str, label: str
) -> None:
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


def histogram_panels_png(
    panels: Mapping[str, Mapping[str, Sequence[float]]], *, xlabel: str = "score", max_cols: int = 3
) -> bytes:
    """One panel per method (``panels``: method -> {group: scores}), each on its own x axis: methods' scores have
    different scales, and on one shared axis all but the widest collapse to a spike. Within a panel the groups
    share the method's bins and keep one colour each across panels; NaN (rows left out) are dropped."""
    ncols = max(1, min(max_cols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = _figure(ncols, 4.0, 2.8, nrows=nrows)
    groups = list(dict.fromkeys(g for series in panels.values() for g in series))
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    for ax, (name, series) in zip(axes.ravel(), panels.items(), strict=False):
        values = {g: np.asarray(v, dtype=np.float64) for g, v in series.items()}
        values = {g: v[np.isfinite(v)] for g, v in values.items()}
        every = np.concatenate([v for v in values.values()]) if values else np.zeros(0)
        bins = np.histogram_bin_edges(every, bins=40) if every.size else 40
        for group, v in values.items():
            ax.hist(
                v, bins=bins, alpha=0.55 if len(values) > 1 else 0.8, color=colors[group], label=f"{group} ({v.size})"
            )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("rows", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(values) > 1:
            ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    return _png(fig)


def precision_recall_png(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    precision_at: Mapping[str, Sequence[float]],
    base_rate: float,
    *,
    highlight: str | None = None,
) -> bytes:
    """Left: precision-recall curve per method (``curves``: method -> (recall, precision)); right: precision among
    each method's top k rows against k (``precision_at``: method -> precision for k = 1..n). The dashed line is
    chance (the share of positive rows); ``highlight`` (the recommended method) is drawn thicker."""
    fig, axes = _figure(2, 5.2, 3.8)
    pr, topk = axes[0]
    for i, (name, (recall, precision)) in enumerate(curves.items()):
        pr.plot(recall, precision, color=f"C{i % 10}", lw=2.4 if name == highlight else 1.2, label=name)
    for i, (name, precision) in enumerate(precision_at.items()):
        ks = np.arange(1, len(precision) + 1)
        topk.plot(ks, precision, color=f"C{i % 10}", lw=2.4 if name == highlight else 1.2, label=name)
    for ax in (pr, topk):
        ax.axhline(base_rate, color="0.4", ls="--", lw=0.8, label=f"chance ({base_rate:.3g})")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("precision")
        ax.tick_params(labelsize=8)
    pr.set_xlabel("recall (share of the labelled rows found)")
    pr.set_xlim(0, 1)
    pr.set_title("precision-recall curves", fontsize=9)
    topk.set_xscale("log")
    topk.set_xlabel("k (rows flagged, best first; log scale)")
    topk.set_title("precision in each method's top k rows", fontsize=9)
    pr.legend(fontsize=7, loc="best")
    return _png(fig)

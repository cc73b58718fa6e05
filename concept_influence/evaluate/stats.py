"""Small statistics for evaluation: mean with a t confidence interval, Spearman correlation, bootstrap intervals."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float | list[float] | int]:
    """``{"mean", "ci": [lo, hi], "n", "values"}``: Student-t interval of the mean over ``values`` (a single value
    gives a degenerate interval ``[v, v]``)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci of no values")
    mean = float(x.mean())
    if x.size < 2:
        lo = hi = mean
    else:
        half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
        lo, hi = mean - half, mean + half
    return {"mean": mean, "ci": [lo, hi], "n": int(x.size), "values": [float(v) for v in x]}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two equal-length sequences of >= 2 values, got {a.shape} and {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(a, b).statistic)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> list[float]:
    """Percentile interval of ``statistic(indices)`` over ``resamples`` seeded resamples of ``range(n)``."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(resamples)]
    return [float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, 0.5 + level / 2))]

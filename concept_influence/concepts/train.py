"""From a concept spec to a concept: labelled conversations -> activations -> probe or diff of means, at one
layer (``train_concept``) or at every layer with held-out AUC per layer (``layer_sweep``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from concept_influence.concepts.activations import (
    LabelledConversations,
    labelled_conversations,
    response_mean_activations,
)
from concept_influence.concepts.base import DirectionConcept
from concept_influence.concepts.probe import DiffOfMeans, LinearProbe
from concept_influence.concepts.spec import ConceptSpec
from concept_influence.data.atomic import atomic_file
from concept_influence.models.base import ModelAdapter


@dataclass(frozen=True)
class ProbeConfig:
    """``method``: ``"probe"`` (logistic regression, the default) or ``"diff_of_means"``; generation settings for
    instruction pairs (``n_samples`` answers per instruction and question, seeded); ``C``: inverse regularisation
    of the probe; ``test_size``: fraction of questions held out for the reported metrics."""

    method: Literal["probe", "diff_of_means"] = "probe"
    n_samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    C: float = 1.0
    test_size: float = 0.25
    batch_size: int = 32
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.method not in ("probe", "diff_of_means"):
            raise ValueError(f"method must be 'probe' or 'diff_of_means', got {self.method!r}")
        if not 0 < self.test_size < 1:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")

    def estimator(self) -> LinearProbe | DiffOfMeans:
        if self.method == "probe":
            return LinearProbe(C=self.C, test_size=self.test_size, random_state=self.seed)
        return DiffOfMeans(test_size=self.test_size, random_state=self.seed)


def _labelled(adapter: ModelAdapter, spec: ConceptSpec, config: ProbeConfig, judge: Callable[[str], float] | None,
              cache_dir: str | os.PathLike | None, progress: bool) -> LabelledConversations:
    return labelled_conversations(adapter, spec, n_samples=config.n_samples, temperature=config.temperature,
                                  max_new_tokens=config.max_new_tokens, seed=config.seed, judge=judge, cache_dir=cache_dir,
                                  progress=progress)


def train_concept(
    adapter: ModelAdapter,
    spec: ConceptSpec,
    layer: int,
    config: ProbeConfig = ProbeConfig(),
    *,
    judge: Callable[[str], float] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> DirectionConcept:
    """Train a direction for ``spec`` at ``resid.{layer}``; ``concept.metrics`` holds held-out AUC/accuracy (by
    question) and the sizes of the labelled set."""
    layer = adapter.check_layer(layer)
    data = _labelled(adapter, spec, config, judge, cache_dir, progress)
    acts = response_mean_activations(adapter, data.conversations, [layer], batch_size=config.batch_size,
                                     max_length=config.max_length, progress=progress)[layer]
    estimator = config.estimator().fit(acts, data.labels, groups=data.groups)
    concept = estimator.to_concept(layer)
    concept.metrics.update({"labelled": data.meta})
    concept.extra.update({"spec": spec.name, "spec_fingerprint": spec.fingerprint(), "config": asdict(config)})
    return concept


@dataclass
class LayerSweep:
    """Held-out metrics of a probe at each layer. ``rows``: ``{"layer", "heldout_auc", "heldout_accuracy", ...}``."""

    rows: list[dict[str, Any]]
    spec: str
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        """The layer with the highest held-out AUC (the earliest on ties)."""
        return max(self.rows, key=lambda r: (r["heldout_auc"], -r["layer"]))["layer"]

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'held-out AUC':>12}  {'accuracy':>8}"]
        for row in self.rows:
            mark = "  <- best" if row["layer"] == self.best_layer else ""
            lines.append(f"{row['layer']:>5}  {row['heldout_auc']:>12.3f}  {row['heldout_accuracy']:>8.3f}{mark}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Save a PNG of held-out AUC against layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        layers = [r["layer"] for r in self.rows]
        ax.plot(layers, [r["heldout_auc"] for r in self.rows], marker="o", label="held-out AUC")
        ax.plot(layers, [r["heldout_accuracy"] for r in self.rows], marker="s", linestyle="--", label="held-out accuracy")
        ax.axvline(self.best_layer, color="grey", linewidth=0.8)
        ax.set_xlabel("layer (output of block l)")
        ax.set_ylabel("score")
        ax.set_ylim(0.4, 1.02)
        ax.set_title(f"{self.spec}: {self.method} per layer")
        ax.legend(loc="lower right")
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
        plt.close(fig)
        return path


def layer_sweep(
    adapter: ModelAdapter,
    spec: ConceptSpec,
    layers: Sequence[int] | None = None,
    config: ProbeConfig = ProbeConfig(),
    *,
    judge: Callable[[str], float] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> LayerSweep:
    """Fit the estimator at every layer (default: all) on the same labelled set; one forward pass reads all layers."""
    layers = [adapter.check_layer(layer) for layer in (range(adapter.n_layers) if layers is None else layers)]
    data = _labelled(adapter, spec, config, judge, cache_dir, progress)
    acts = response_mean_activations(adapter, data.conversations, layers, batch_size=config.batch_size,
                                     max_length=config.max_length, progress=progress)
    rows = []
    for layer in layers:
        estimator = config.estimator().fit(acts[layer], data.labels, groups=data.groups)
        rows.append({"layer": layer, **estimator.metrics_})
    return LayerSweep(rows, spec.name, config.method, meta=data.meta)


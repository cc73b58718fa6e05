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
    response_readouts,
)
from concept_influence.concepts.answers import AnswerConfig
from concept_influence.concepts.base import Concept, DirectionConcept
from concept_influence.concepts.construction import (
    CONSTRUCTIONS,
    ConstructedDirection,
    StanceRows,
    construct_direction,
)
from concept_influence.concepts.probe import DiffOfMeans, LinearProbe, heldout_split
from concept_influence.concepts.spec import ConceptSpec
from concept_influence.concepts.stance import (
    StanceProbes,
    format_score,
    reading_scores,
    separation_auc,
    stance_probes,
)
from concept_influence.files import atomic_file
from concept_influence.models.base import ModelAdapter
from concept_influence.plots import literal_texts
from concept_influence.settings import option, same_as


@dataclass(frozen=True)
class ProbeConfig:
    """``method``: ``"probe"`` (logistic regression, the default) or ``"diff_of_means"``; generation settings for
    instruction pairs (``n_samples`` answers per instruction and question, seeded); ``C``: inverse regularisation
    of the probe; ``test_size``: fraction of questions held out for the reported metrics.

    ``select_layer_by``: how a layer sweep picks its layer. ``"heldout_auc"`` (default): the highest held-out AUC
    (earliest on ties). ``"stance"``: among the layers whose held-out AUC is within ``auc_tolerance`` of the best,
    the one whose readout best separates positive answers from negative answers that use the trait's words
    (``stance_auc``, see ``concepts.stance``), then the lower ``vocabulary_confound``. (On the built-in organisms
    the stance AUC of the spec's own answers is 0.94-0.99 at every layer, so it does not choose better yet; the
    default stays until the method study shows the stance rule's worst case is better.) ``lexicon_size``: words
    in the trait lexicon that finds the word-matched negatives."""

    method: Literal["probe", "diff_of_means"] = option(
        "probe", help="probe (logistic regression) | diff_of_means (persona vector)."
    )
    n_samples: int = option(4, help="Answers sampled per instruction and question.", min=1)
    temperature: float = same_as(AnswerConfig, "temperature")
    max_new_tokens: int = same_as(AnswerConfig, "max_new_tokens")
    seed: int = option(0, help="Seed of the sampled answers and of the held-out split.")
    C: float = option(1.0, help="Inverse regularisation strength of the probe.", flag="--C")
    test_size: float = option(0.25, help="Share of the questions held out for the reported metrics.")
    batch_size: int = option(32, help="Rows per forward pass when reading activations.", min=1)
    max_length: int = option(512, help="Truncate rows longer than this.", min=2)
    select_layer_by: Literal["stance", "heldout_auc"] = option(
        "heldout_auc",
        help="How a sweep picks the layer: heldout_auc (the best held-out AUC) | stance (the best stance "
        "AUC among the layers within 0.02 of the best held-out AUC, then the lower vocabulary "
        "confound).",
    )
    auc_tolerance: float = option(0.02, help="select_layer_by=stance: the held-out AUC margin of the candidate layers.")
    lexicon_size: int = option(40, help="Words in the trait lexicon that finds the word-matched negatives.", min=1)
    construction: Literal["plain", "vocab-projected", "contrast", "contrast-projected", "order", "order-projected"] = (
        option(
            "plain",
            help="How the direction is built (concepts/construction.py): plain (the method on all labelled answers) | "
            "vocab-projected (plain without its component along the vocabulary direction: word-matched negatives "
            "minus other negatives) | contrast (fitted on positives against word-matched negatives only) | "
            "contrast-projected | order (positives minus their word-shuffled copies) | order-projected.",
        )
    )

    def __post_init__(self) -> None:
        if self.method not in ("probe", "diff_of_means"):
            raise ValueError(f"method must be 'probe' or 'diff_of_means', got {self.method!r}")
        if self.select_layer_by not in ("stance", "heldout_auc"):
            raise ValueError(f"select_layer_by must be 'stance' or 'heldout_auc', got {self.select_layer_by!r}")
        if not 0 <= self.auc_tolerance < 0.5:
            raise ValueError(f"auc_tolerance must be in [0, 0.5), got {self.auc_tolerance}")
        if self.construction not in CONSTRUCTIONS:
            raise ValueError(f"construction must be one of {', '.join(CONSTRUCTIONS)}, got {self.construction!r}")
        if not 0 < self.test_size < 1:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")

    def estimator(self) -> LinearProbe | DiffOfMeans:
        if self.method == "probe":
            return LinearProbe(C=self.C, test_size=self.test_size, random_state=self.seed)
        return DiffOfMeans(test_size=self.test_size, random_state=self.seed)


def _labelled(
    adapter: ModelAdapter,
    spec: ConceptSpec,
    config: ProbeConfig,
    judge: Callable[[str], float] | None,
    cache_dir: str | os.PathLike | None,
    progress: bool,
) -> LabelledConversations:
    return labelled_conversations(
        adapter,
        spec,
        n_samples=config.n_samples,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        judge=judge,
        cache_dir=cache_dir,
        progress=progress,
    )


def _answers(data: LabelledConversations) -> list[str]:
    return [conversation[-1]["content"] for conversation in data.conversations]


def _stance_inputs(
    adapter: ModelAdapter, data: LabelledConversations, layers: Sequence[int], config: ProbeConfig, progress: bool
) -> tuple[StanceProbes, dict[int, Any]]:
    """The word-matched negatives and shuffled positives of a labelled set, and the shuffled texts' activations."""
    probes = stance_probes(_answers(data), data.labels, lexicon_size=config.lexicon_size, seed=config.seed)
    shuffled = [
        [*data.conversations[i][:-1], {"role": "assistant", "content": text}] for i, text in probes.shuffled.items()
    ]
    if not shuffled:
        return probes, {layer: None for layer in layers}
    acts = response_mean_activations(
        adapter, shuffled, layers, batch_size=config.batch_size, max_length=config.max_length, progress=progress
    )
    return probes, acts


def _reading_metrics(
    acts: Any, shuffled_acts: Any, data: LabelledConversations, probes: StanceProbes, config: ProbeConfig
) -> dict[str, Any]:
    """``stance_auc``, ``vocabulary_confound`` (``concepts.stance``) of an estimator fitted on the held-out split's
    training questions, measured on its held-out questions."""
    import numpy as np

    y = np.asarray(data.labels)
    train, test = heldout_split(y, data.groups, config.test_size, config.seed)
    if config.construction == "plain":
        estimator = config.estimator().fit(acts[train], y[train], groups=[data.groups[i] for i in train])
        readout = estimator.decision_function(acts)
        shuffled_readout = estimator.decision_function(shuffled_acts) if shuffled_acts is not None else np.zeros(0)
    else:
        X = _numpy(acts)
        unit = construct_direction(
            config.construction, config.estimator, X, y, _stance_rows(probes, shuffled_acts, y), train
        )
        readout = X @ unit
        shuffled_readout = _numpy(shuffled_acts) @ unit if shuffled_acts is not None else np.zeros(0)
    return reading_scores(readout, data.labels, shuffled_readout, list(probes.shuffled), probes.matched, test)


def _numpy(acts: Any) -> Any:
    """Activations ``[n, d]`` (a tensor or an array) as a float64 array."""
    import numpy as np

    return acts.double().numpy() if hasattr(acts, "double") else np.asarray(acts, dtype=np.float64)


def _stance_rows(probes: StanceProbes, shuffled_acts: Any, y: Any) -> StanceRows:
    import numpy as np

    matched = np.zeros(len(y), dtype=bool)
    matched[np.asarray(probes.matched, dtype=int)] = True
    shuffled = None if shuffled_acts is None else _numpy(shuffled_acts)
    return StanceRows(matched, np.asarray(list(probes.shuffled), dtype=int), shuffled)


def _fit_estimator(
    acts: Any, data: LabelledConversations, probes: StanceProbes, shuffled_acts: Any, config: ProbeConfig
) -> Any:
    """The estimator of ``config.method`` fitted on all labelled answers (``construction="plain"``), or the
    direction ``config.construction`` builds from them (``ConstructedDirection``); both have ``metrics_``."""
    if config.construction == "plain":
        return config.estimator().fit(acts, data.labels, groups=data.groups)
    return ConstructedDirection(
        config.construction, config.estimator, config.method, config.test_size, config.seed
    ).fit(_numpy(acts), data.labels, _stance_rows(probes, shuffled_acts, data.labels), groups=data.groups)


def concept_reading(
    adapter: ModelAdapter,
    concept: Concept,
    spec: ConceptSpec,
    config: ProbeConfig = ProbeConfig(),
    *,
    judge: Callable[[str], float] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """What any concept reads (an SAE feature, a loaded persona vector: nothing is fitted here), on the held-out
    questions of ``spec``'s labelled answers (the split ``train_concept`` holds out): ``spec_auc`` (ROC-AUC of its
    readout, positive vs negative answers), ``stance_auc`` and ``vocabulary_confound`` (``concepts.stance``)."""
    import numpy as np

    data = _labelled(adapter, spec, config, judge, cache_dir, progress)
    readout = response_readouts(
        adapter, data.conversations, concept, batch_size=config.batch_size, max_length=config.max_length
    ).numpy()
    probes = stance_probes(_answers(data), data.labels, lexicon_size=config.lexicon_size, seed=config.seed)
    shuffled_conversations = [
        [*data.conversations[i][:-1], {"role": "assistant", "content": text}] for i, text in probes.shuffled.items()
    ]
    shuffled = (
        response_readouts(
            adapter, shuffled_conversations, concept, batch_size=config.batch_size, max_length=config.max_length
        ).numpy()
        if shuffled_conversations
        else np.zeros(0)
    )
    y = np.asarray(data.labels)
    _, test = heldout_split(y, data.groups, config.test_size, config.seed)
    held = np.asarray(sorted(int(i) for i in test))
    out = {
        "spec_auc": separation_auc(readout[held][y[held] == 1], readout[held][y[held] == 0]),
        "reading_spec": spec.name,
    }
    out.update(reading_scores(readout, data.labels, shuffled, list(probes.shuffled), probes.matched, held))
    return out


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
    question), what the concept reads (held-out ``stance_auc`` and ``vocabulary_confound``, ``concepts.stance``)
    and the sizes of the labelled set."""
    layer = adapter.check_layer(layer)
    data = _labelled(adapter, spec, config, judge, cache_dir, progress)
    acts = response_mean_activations(
        adapter,
        data.conversations,
        [layer],
        batch_size=config.batch_size,
        max_length=config.max_length,
        progress=progress,
    )[layer]
    probes, shuffled = _stance_inputs(adapter, data, [layer], config, progress)
    concept = _fit_estimator(acts, data, probes, shuffled[layer], config).to_concept(layer)
    concept.metrics.update(_reading_metrics(acts, shuffled[layer], data, probes, config))
    concept.metrics.update({"labelled": data.meta, "lexicon": [w for w, _ in probes.lexicon]})
    concept.extra.update({"spec": spec.name, "spec_fingerprint": spec.fingerprint(), "config": asdict(config)})
    return concept


@dataclass
class LayerSweep:
    """Held-out metrics of a probe at each layer. ``rows``: ``{"layer", "heldout_auc", "heldout_accuracy",
    "stance_auc", "vocabulary_confound", "n_matched_negatives", ...}``; ``select_by`` / ``auc_tolerance``: the rule
    ``best_layer`` follows (``ProbeConfig.select_layer_by``)."""

    rows: list[dict[str, Any]]
    spec: str
    method: str
    meta: dict[str, Any] = field(default_factory=dict)
    select_by: str = "heldout_auc"
    auc_tolerance: float = 0.02

    def _candidates(self) -> list[dict[str, Any]]:
        top = max(r["heldout_auc"] for r in self.rows)
        return [r for r in self.rows if r["heldout_auc"] >= top - self.auc_tolerance]

    def _by_stance(self) -> bool:
        return self.select_by == "stance" and all(r.get("stance_auc") is not None for r in self._candidates())

    @property
    def best_layer(self) -> int:
        """The chosen layer: by stance among the layers within ``auc_tolerance`` of the best held-out AUC (stance
        AUC to 2 decimals, then the lower vocabulary confound, then the earlier layer), or by held-out AUC alone
        (earliest on ties) when ``select_by="heldout_auc"`` or the stance cannot be measured (too few negative
        answers use the trait's words)."""
        if self._by_stance():

            def key(r: dict[str, Any]) -> tuple[float, float, int]:
                confound = r.get("vocabulary_confound")
                return round(r["stance_auc"], 2), -(confound if confound is not None else 1.0), -r["layer"]

            return max(self._candidates(), key=key)["layer"]
        return max(self.rows, key=lambda r: (r["heldout_auc"], -r["layer"]))["layer"]

    @property
    def reason(self) -> str:
        """One sentence: which layer and why."""
        best = next(r for r in self.rows if r["layer"] == self.best_layer)
        top = max(r["heldout_auc"] for r in self.rows)
        if self._by_stance():
            return (
                f"layer {best['layer']}: the best stance AUC ({best['stance_auc']:.3f}: it separates trait answers "
                f"from {best['n_matched_negatives']} held-out negative answers that use the trait's words; "
                f"vocabulary confound {format_score(best.get('vocabulary_confound'))}) among the "
                f"{len(self._candidates())} layers within {self.auc_tolerance:g} of the best held-out AUC "
                f"({top:.3f})"
            )
        why = (
            "the rule select_layer_by='heldout_auc'"
            if self.select_by != "stance"
            else "too few negative answers use the trait's words to measure stance"
        )
        return (
            f"layer {best['layer']}: the best held-out AUC ({best['heldout_auc']:.3f}; {why}); there its stance AUC "
            f"is {format_score(best.get('stance_auc'))} and its vocabulary confound "
            f"{format_score(best.get('vocabulary_confound'))}"
        )

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'held-out AUC':>12}  {'accuracy':>8}  {'stance AUC':>10}  {'vocab. confound':>15}"]
        for row in self.rows:
            mark = "  <- chosen" if row["layer"] == self.best_layer else ""
            lines.append(
                f"{row['layer']:>5}  {row['heldout_auc']:>12.3f}  {row['heldout_accuracy']:>8.3f}  "
                f"{format_score(row.get('stance_auc')):>10}  {format_score(row.get('vocabulary_confound')):>15}{mark}"
            )
        lines.append(self.reason)
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
        ax.plot(
            layers, [r["heldout_accuracy"] for r in self.rows], marker="s", linestyle="--", label="held-out accuracy"
        )
        for key, label, marker in (
            ("stance_auc", "stance AUC", "^"),
            ("vocabulary_confound", "vocabulary confound", "v"),
        ):
            values = [r.get(key) for r in self.rows]
            if any(v is not None for v in values):
                ax.plot(layers, [float("nan") if v is None else v for v in values], marker=marker, label=label)
        ax.axvline(self.best_layer, color="grey", linewidth=0.8)
        ax.set_xlabel("layer (output of block l)")
        ax.set_xticks(layers)
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{self.spec}: {self.method} per layer")
        ax.legend(loc="lower right")
        literal_texts(fig)  # the spec's name is in the title: no mathtext
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
    """Fit the estimator at every layer (default: all) on the same labelled set, with what each layer's concept
    reads (stance AUC, vocabulary confound); one forward pass reads all layers (and one more the shuffled answers).
    ``best_layer`` / ``reason`` follow ``config.select_layer_by``."""
    layers = [adapter.check_layer(layer) for layer in (range(adapter.n_layers) if layers is None else layers)]
    data = _labelled(adapter, spec, config, judge, cache_dir, progress)
    acts = response_mean_activations(
        adapter,
        data.conversations,
        layers,
        batch_size=config.batch_size,
        max_length=config.max_length,
        progress=progress,
    )
    probes, shuffled = _stance_inputs(adapter, data, layers, config, progress)
    rows = []
    for layer in layers:
        estimator = _fit_estimator(acts[layer], data, probes, shuffled[layer], config)
        rows.append(
            {
                "layer": layer,
                **estimator.metrics_,
                **_reading_metrics(acts[layer], shuffled[layer], data, probes, config),
            }
        )
    meta = {**data.meta, "lexicon": [w for w, _ in probes.lexicon]}
    method = config.method if config.construction == "plain" else f"{config.method}, {config.construction}"
    return LayerSweep(
        rows, spec.name, method, meta=meta, select_by=config.select_layer_by, auc_tolerance=config.auc_tolerance
    )

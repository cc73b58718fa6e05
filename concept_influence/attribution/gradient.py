"""The gradient-attribution pipeline (moved out of the CLI): turn query prompts into a measurement, get curvature
factors (loaded, checked against fingerprints, or fitted), score every training row, and return a ``ScoreTable``.

``run_gradient_attribution`` serves the ``concept-influence`` and ``influence`` methods of ``Attributor.attribute``
and of ``concept-influence attribute``. Positive score = training on the row raises the measurement.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from concept_influence.attribution.influence import InfluenceConfig, InfluenceResult, compute_influence
from concept_influence.attribution.measurements import (
    ConceptMeasurement,
    DifferentialMeasurement,
    LogLikelihoodMeasurement,
    Measurement,
    answer_queries,
    answer_readouts,
    select_answers,
    tokenize_queries,
)
from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.answers import AnswerConfig
from concept_influence.concepts.base import Concept
from concept_influence.curvature.config import FactorConfig, FisherType
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.fit import fit_factors
from concept_influence.curvature.io import data_fingerprint, has_factors, load_factors, read_manifest
from concept_influence.data.chat import ChatRow
from concept_influence.data.tokenize import TokenizedDataset, tokenize_chat, untrainable_rows
from concept_influence.distributed.runtime import in_step
from concept_influence.models.base import ModelAdapter
from concept_influence.settings import deprecated_aliases, option, same_as, settings_fields

logger = logging.getLogger(__name__)

GRADIENT_METHODS = ("concept-influence", "influence")


@deprecated_aliases(factor_dtype="dtype")
@dataclass(frozen=True)
class GradientAttributionConfig(InfluenceConfig):
    """Settings of ``run_gradient_attribution`` and of the gradient methods: every option once, with its help.

    The scoring options are ``InfluenceConfig``'s (inherited: ``preconditioner``, ``damping``, ``row_loss``,
    ``token_aggregation`` ...); ``fisher``/``dtype`` (the factors' precision; ``factor_dtype`` is its deprecated
    name) are ``FactorConfig``'s, used when the factors have to be fitted here; ``n_samples``/``temperature``/
    ``max_new_tokens``/``seed``/``cache_dir`` are ``AnswerConfig``'s (how prompt-only queries are answered);
    ``keep``/``keep_k``/``contrast`` choose which sampled answers the measurement uses. ``max_length``:
    tokenisation. ``max_memory`` and ``gradient_checkpointing`` do not change the scores. ``allow_missing_provenance``:
    use factors that record no model fingerprint (default: an error naming the file; recorded in the scores' meta).
    """

    fisher: FisherType = same_as(FactorConfig, "fisher")
    dtype: Literal["float32", "float64"] = same_as(FactorConfig, "dtype", flag="--factor-dtype")
    max_length: int = option(512, help="Tokenisation length of rows and queries.", cli=False)
    n_samples: int = same_as(AnswerConfig, "n_samples")
    temperature: float = same_as(AnswerConfig, "temperature")
    max_new_tokens: int = same_as(AnswerConfig, "max_new_tokens")
    seed: int = same_as(AnswerConfig, "seed")
    cache_dir: str | None = same_as(AnswerConfig, "cache_dir")
    keep: Literal["all", "top"] = option(
        "all",
        help="Which sampled query answers to measure on: all | top (the --keep-k most concept-expressing "
        "per prompt; given answers are always used).",
    )
    keep_k: int = option(1, help="Answers kept per prompt by --keep top and --contrast auto.", min=1)
    contrast: Literal["none", "auto"] = option(
        "none", help="none | auto: the concept on each prompt's most minus least concept-expressing answers."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep not in ("all", "top"):
            raise ValueError(f"keep must be 'all' or 'top', got {self.keep!r}")
        if self.contrast not in ("none", "auto"):
            raise ValueError(f"contrast must be 'none' or 'auto', got {self.contrast!r}")
        if self.keep_k < 1 or self.n_samples < 1:
            raise ValueError(f"keep_k and n_samples must be positive, got {self.keep_k}, {self.n_samples}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for a scores file's metadata (with ``factor_dtype``, the old name of ``dtype``)."""
        return {**asdict(self), "factor_dtype": self.dtype}

    def answer_config(self) -> AnswerConfig:
        return AnswerConfig(**{name: getattr(self, name) for name in settings_fields(AnswerConfig)})

    def factor_config(self) -> FactorConfig:
        """The fit these settings need (EKFAC fits support every preconditioner but identity's none)."""
        return FactorConfig(
            fisher=self.fisher,
            preconditioner=self.preconditioner,
            dtype=self.dtype,
            seed=self.seed,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def influence_config(self) -> InfluenceConfig:
        return InfluenceConfig(**{name: getattr(self, name) for name in settings_fields(InfluenceConfig)})


def build_measurement(
    adapter: ModelAdapter,
    concept: Concept | None,
    queries: Sequence[ChatRow],
    method: str,
    config: GradientAttributionConfig,
    *,
    contrast_queries: Sequence[ChatRow] | None = None,
    token_cache: dict[str, TokenizedDataset] | None = None,
) -> tuple[Measurement, list[ChatRow]]:
    """The measurement of ``method`` on answered queries (prompt-only queries are answered by the model).
    ``token_cache``: a dict (e.g. a session's) where tokenised query sets are kept by their content, so asking
    again about the same queries does not tokenise them again."""

    def tokenize(rows: Sequence[ChatRow]) -> TokenizedDataset:
        if token_cache is None:
            return tokenize_queries(rows, adapter.tokenizer, config.max_length)
        key = _rows_key(rows, config.max_length)
        if key not in token_cache:
            token_cache[key] = tokenize_queries(rows, adapter.tokenizer, config.max_length)
        return token_cache[key]

    if method not in GRADIENT_METHODS:
        raise ValueError(f"unknown gradient method {method!r}; expected one of {GRADIENT_METHODS}")
    if method == "concept-influence" and concept is None:
        raise ValueError("--method concept-influence needs a concept (--concept FILE)")
    answer = asdict(config.answer_config())
    answered = answer_queries(adapter, queries, **answer)
    if method == "influence":
        return LogLikelihoodMeasurement(tokenize(answered)), answered
    assert concept is not None
    if config.keep != "all" or config.contrast == "auto":
        if contrast_queries and config.contrast == "auto":
            raise ValueError(
                "contrast='auto' builds the contrast from the sampled answers; do not also give contrast queries"
            )
        readouts = answer_readouts(
            adapter, answered, concept, batch_size=config.batch_size, max_length=config.max_length
        )
        top = select_answers(
            answered, readouts, "top" if config.keep == "top" or config.contrast == "auto" else "all", config.keep_k
        )
        if config.contrast == "auto":
            bottom = select_answers(answered, readouts, "bottom", config.keep_k)
            return DifferentialMeasurement(concept, tokenize(top), tokenize(bottom)), top + bottom
        answered = top
    tokenized = tokenize(answered)
    if contrast_queries:
        contrast = tokenize(answer_queries(adapter, contrast_queries, **answer))
        return DifferentialMeasurement(concept, tokenized, contrast), answered
    return ConceptMeasurement(concept, tokenized), answered


def _rows_key(rows: Sequence[ChatRow], max_length: int) -> str:
    """A digest of answered query rows (indices and messages) and the tokenisation length."""
    import hashlib
    import json

    payload = json.dumps([max_length, [[r.index, r.messages] for r in rows]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_factors_for_scoring(
    path: str | os.PathLike,
    adapter: ModelAdapter,
    data: TokenizedDataset,
    *,
    lazy: bool = False,
    allow_missing_provenance: bool = False,
) -> tuple[Factors | Path, list[str]]:
    """Factors from a folder, checked against the model; against the data too unless they were fitted on purpose
    on a sample or other rows (their ``provenance``), in which case the note says what they were fitted on.
    ``lazy``: check the fingerprints only and return the folder (for scoring that reads one weight at a time).
    ``allow_missing_provenance``: factors that record no model or data fingerprint are used (a note says so)."""
    provenance = read_manifest(path).get("provenance") or {}
    fingerprint = data_fingerprint(data)
    loaded = load_factors(
        path,
        model_fingerprint=adapter.fingerprint(),
        data_fingerprint=None if provenance else fingerprint,
        weights=[] if lazy else None,
        allow_missing_provenance=allow_missing_provenance,
    )
    source: Factors | Path = Path(path) if lazy else loaded
    unchecked = [k for k in ("model", "data") if loaded.fingerprints.get(k) is None]
    caveat = (
        [
            f"the factors in {path} record no {' or '.join(unchecked)} fingerprint: used without a check "
            "(allow_missing_provenance)"
        ]
        if unchecked
        else []
    )
    if not provenance or loaded.fingerprints.get("data") == fingerprint:
        return source, [f"factors {'read one weight at a time' if lazy else 'loaded'} from {path}", *caveat]
    what = (
        f"a seeded sample of {provenance.get('rows')} of {provenance.get('sample_of')} rows"
        if "sample_of" in provenance
        else f"{provenance.get('rows')} other rows"
    )
    return source, [
        f"factors loaded from {path}, fitted on {what} of {provenance.get('source')} (data fingerprint "
        f"{loaded.fingerprints.get('data')}), scoring {len(data)} rows (data fingerprint {fingerprint})"
    ]


def factors_record(factors: Factors | str | os.PathLike | None, data: TokenizedDataset) -> dict[str, Any] | None:
    """What the factors were fitted on, for a scores file's metadata (``same_data``: fitted on the scored rows)."""
    if factors is None:
        return None
    if not isinstance(factors, Factors):
        factors = load_factors(factors, weights=[])  # the manifest only
    return {
        "rows": factors.n_rows,
        "tokens": factors.n_tokens,
        "data_fingerprint": factors.fingerprints.get("data"),
        "scored_rows": len(data),
        "same_data": factors.fingerprints.get("data") == data_fingerprint(data),
        "provenance": dict(factors.provenance),
    }


def obtain_factors(
    adapter: ModelAdapter,
    data: TokenizedDataset,
    factors: Factors | str | os.PathLike | None,
    config: GradientAttributionConfig,
    weights: Sequence[str],
    *,
    progress: bool = True,
    sharded_ok: bool = False,
) -> tuple[Factors | Path | None, list[str]]:
    """Factors for ``weights`` and a note saying where they came from: given ``Factors`` are used as they are; a
    folder with a fit is loaded (checked against this model and data: a mismatch is an error); otherwise they are
    fitted on ``data`` (and saved to the folder when one is given). ``None`` for the identity preconditioner.
    With ``config.max_memory`` a folder is returned instead of loaded factors (scoring reads one weight at a time)
    and a fit here runs under the same bound; with ``sharded_ok`` on a model sharded over several ranks too (the
    caller's ``compute_influence`` then reads each rank's own weights)."""
    if config.preconditioner == "identity":
        return None, []
    if isinstance(factors, Factors):
        return factors, ["factors given in memory"]  # checked against the model where they are used
    # a folder, not loaded factors, when scoring reads them itself: one weight at a time (max_memory) or, for an
    # exact pass (``sharded_ok``) on a model sharded over several ranks, each rank its own weights'
    lazy = config.max_memory is not None or (sharded_ok and in_step(adapter.model))
    if factors is not None and has_factors(factors):
        return load_factors_for_scoring(
            factors, adapter, data, lazy=lazy, allow_missing_provenance=config.allow_missing_provenance
        )
    fitted = fit_factors(
        adapter,
        data,
        config.factor_config(),
        weights=list(weights),
        batch_size=config.batch_size,
        out_dir=factors,
        progress=progress,
        max_memory=config.max_memory,
        load_result=not (lazy and factors is not None),
    )
    note = [f"factors fitted on {len(data)} rows" + (f" and saved to {factors}" if factors else "")]
    if fitted is None:  # bounded, on disk
        return Path(factors), note  # type: ignore[arg-type]
    return fitted, note


def result_table(
    rows: Sequence[ChatRow],
    result: InfluenceResult,
    method: str,
    *,
    notes: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
) -> ScoreTable:
    """An ``InfluenceResult`` as a ``ScoreTable`` over ``rows``: breakdowns become columns (``token_scores``,
    ``weight_scores``, ``self_influence``), the rest goes to ``meta``. Rows the result does not score (left out
    because truncation removed their whole answer, see ``untrainable_rows``) are marked ``truncated``."""
    rows = list(rows)
    position = {int(i): p for p, i in enumerate(result.indices)}
    if len(position) != len(result.indices):
        raise ValueError("the scored rows have duplicate indices")
    where = [position.get(int(r.index)) for r in rows]
    if len(rows) - where.count(None) != len(result.indices):
        raise ValueError(f"{len(result.indices)} scores do not match the {len(rows)} training rows")

    def spread(values: list[Any], missing: Any = None) -> list[Any]:
        return [missing if p is None else values[p] for p in where]

    columns: dict[str, list[Any]] = {}
    if result.per_token is not None:
        columns["token_scores"] = spread([t.tolist() for t in result.per_token])
    if result.per_weight is not None:
        names = list(result.per_weight)
        values = [result.per_weight[n].tolist() for n in names]
        columns["weight_scores"] = spread(
            [{n: v[i] for n, v in zip(names, values, strict=True)} for i in range(len(result.indices))]
        )
    if result.self_influence is not None:
        columns["self_influence"] = spread(result.self_influence.tolist())
    full_meta = {**result.meta(), "notes": list(notes) + result.notes, "method": method, **(meta or {})}
    scores = spread(result.scores.tolist(), float("nan"))
    return ScoreTable.from_rows(
        rows, scores, method, columns=columns, meta=full_meta, truncated=[p is None for p in where]
    )


def run_gradient_attribution(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    concept: Concept | None,
    queries: Sequence[ChatRow],
    method: str,
    factors_path: Factors | str | os.PathLike | None,
    config: GradientAttributionConfig = GradientAttributionConfig(),
    *,
    contrast_queries: Sequence[ChatRow] | None = None,
    train: TokenizedDataset | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
) -> ScoreTable:
    """Score training rows with Concept Influence (``method="concept-influence"``, needs ``concept``) or classical
    influence on the queries' log-likelihood (``method="influence"``).

    ``factors_path``: fitted ``Factors``, a folder of fitted factors (checked against this model and data; mismatch
    is an error), a folder that does not exist yet (the factors are fitted on ``rows`` and saved there), or
    ``None`` (fitted in memory). Only the weights the measurement reaches are fitted and used. ``train``: ``rows``
    already tokenised (saves the work). A row whose whole answer is truncated away is an error; ``skip_invalid``
    leaves such rows out of the fit and the scores (marked ``truncated``). Positive score = training on the row
    raises the measurement.
    """
    if adapter.tokenizer is None:
        raise ValueError("gradient attribution needs the model's tokenizer")
    measurement, answered = build_measurement(
        adapter, concept, queries, method, config, contrast_queries=contrast_queries
    )
    data = train if train is not None else tokenize_chat(rows, adapter.tokenizer, config.max_length)
    if skip_invalid:
        data = data.without(untrainable_rows(data, skip_invalid=True))
    factors, notes = obtain_factors(
        adapter, data, factors_path, config, measurement.weights(adapter), progress=progress
    )
    result = compute_influence(adapter, data, measurement, factors, config.influence_config(), progress=progress)
    return result_table(
        rows,
        result,
        method,
        notes=notes,
        meta={"n_queries": len(answered), "config": config.to_dict(), "factors_fit": factors_record(factors, data)},
    )

"""The registry of attribution methods: name -> function, and the method run when none is named.

A method is a function ``fn(session, concept, queries, **options) -> ScoreTable`` where ``session`` is the
``Attributor`` (see ``MethodSession``: model, training rows, and ``engine``, the gradient methods'
``GradientEngine``), ``concept`` a ``Concept`` (or ``None`` when the method needs none) and ``queries`` a list of
``ChatRow`` (or ``None``). Its options come from its settings class (``register_method(settings=...)``: the
gradient methods' are ``GradientAttributionConfig``'s fields) or else its keyword-only parameters:
``Attributor.attribute`` refuses any other option with a ``ValueError`` naming it and the method. Gradient methods
also take ``store`` (see ``Attributor.attribute``). Register a new method with ``@register_method(...)``; the CLI's
``--method`` choices come from this registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from concept_influence.attribution.cached import (
    is_linear,
    projection_difference_from_cache,
    serves,
    vector_filter_from_cache,
)
from concept_influence.attribution.combine import FUSIONS, fuse
from concept_influence.attribution.engine import GradientEngine
from concept_influence.attribution.forward import projection_difference, vector_filter
from concept_influence.attribution.gradient import GradientAttributionConfig
from concept_influence.attribution.influence import InfluenceConfig
from concept_influence.attribution.rerank import RerankConfig, counterfactual_effects, rerank, top_candidates
from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.answers import AnswerConfig
from concept_influence.concepts.base import Concept
from concept_influence.data.chat import ChatDataset, ChatRow
from concept_influence.models.base import ModelAdapter
from concept_influence.settings import check_known, option_defaults, rename_deprecated, settings_fields
from concept_influence.store.activations import build_answer_means, resolve_activation_cache


class MethodSession(Protocol):
    """What a method reads of the session it is given (``pipeline.Attributor``: a protocol here, not an import of
    the session's module): the model, the training rows and their settings, and ``engine``, the gradient methods'
    ``GradientEngine`` (attribution layer; it keeps the factors and stores). Methods call the engine, never back
    into the session."""

    adapter: ModelAdapter
    max_length: int
    batch_size: int
    seed: int
    skip_invalid: bool
    progress: bool
    engine: GradientEngine

    @property
    def rows(self) -> ChatDataset: ...

    @property
    def answer_cache(self) -> Path | None: ...

    @property
    def store_dir(self) -> Path | None: ...

    def model_fingerprint(self) -> str: ...

    def data_fingerprint(self) -> str: ...


MethodFn = Callable[..., ScoreTable]

RECOMMENDED_METHOD = "combined-tiered"
"""The method ``Attributor.attribute`` and ``concept-influence attribute`` run when none is named."""


@dataclass(frozen=True)
class Method:
    """A registered method. ``kind``: ``"forward"`` (forward passes only) or ``"gradient"`` (curvature + gradients;
    reads factors and stores); ``needs_concept`` / ``needs_queries``: what a question must give.

    ``settings``: the settings dataclass its options come from (``None``: its keyword-only parameters are its
    options); ``option_names``: which of the settings' fields (default: all of them); ``defaults``: this method's
    own defaults for some of them; ``extra``: options that are not settings (``store``, ``factors`` ...) and their
    defaults."""

    name: str
    fn: MethodFn
    kind: Literal["forward", "gradient"]
    needs_concept: bool
    needs_queries: bool
    description: str
    settings: type | None = None
    option_names: tuple[str, ...] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def options(self) -> dict[str, Any]:
        """The method's options and their defaults (read from its settings class, or its keyword-only parameters)."""
        if self.settings is None:
            params = inspect.signature(self.fn).parameters.values()
            return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        names = self.option_names if self.option_names is not None else tuple(settings_fields(self.settings))
        found = option_defaults(self.settings, names)
        return {**{k: self.defaults.get(k, v) for k, v in found.items()}, **self.extra}

    @property
    def aliases(self) -> dict[str, str]:
        """Deprecated option names and their current ones (``factor_dtype`` -> ``dtype``)."""
        return dict(getattr(self.settings, "__deprecated_aliases__", {}))

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with deprecated names renamed (a ``DeprecationWarning`` each); an unknown option is a
        ``ValueError`` naming it and the method."""
        options = rename_deprecated(options, self.aliases, f"method {self.name!r}")
        allowed = self.options
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option {unknown[0]!r}"
                + (f" (nor {unknown[1:]})" if len(unknown) > 1 else "")
                + f"; its options are: {', '.join(sorted(allowed)) or 'none'}"
            )
        return options


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    kind: Literal["forward", "gradient"],
    needs_concept: bool = True,
    needs_queries: bool = False,
    description: str = "",
    settings: type | None = None,
    option_names: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register ``fn`` under ``name`` (replacing an earlier registration of the same name). With
    ``settings`` (a settings dataclass, see ``concept_influence.settings``) the method's options are its fields
    (``option_names``: some of them; ``defaults``: this method's defaults) plus ``extra``, and ``fn`` takes them as
    ``**options``; without, its keyword-only parameters are its options."""
    if kind not in ("forward", "gradient"):
        raise ValueError(f"method kind must be 'forward' or 'gradient', got {kind!r}")

    def decorate(fn: MethodFn) -> MethodFn:
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        METHODS[name] = Method(
            name,
            fn,
            kind,
            needs_concept,
            needs_queries,
            doc,
            settings,
            None if option_names is None else tuple(option_names),
            dict(defaults or {}),
            dict(extra or {}),
        )
        return fn

    return decorate


def get_method(name: str | None) -> Method:
    """The registered method ``name`` (``None``: ``RECOMMENDED_METHOD``); unknown names are a ``ValueError``."""
    name = RECOMMENDED_METHOD if name is None else name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}")
    return METHODS[name]


def method_names() -> list[str]:
    return list(METHODS)


# ---- the built-in methods ------------------------------------------------------------------------------------------
@register_method("vector-filter", kind="forward", description="the concept's readout on each row's own answer")
def _vector_filter(
    session: MethodSession,
    concept: Concept,
    queries: Sequence[ChatRow] | None,
    *,
    reduction: str | None = None,
    token_readouts: bool = False,
    batch_size: int | None = None,
    localise: str = "none",
    store: Any = None,
) -> ScoreTable:
    """``store``: ``None`` reads the workdir's activation cache when it serves the question, ``False`` forces the
    forward pass, a path reads that store folder's cache (``meta["scored_from"]`` says which). ``localise``: see
    ``vector_filter`` (a sentence-level readout needs the tokens: a forward pass)."""
    return _forward_scores(
        session,
        concept,
        reduction,
        token_readouts,
        batch_size,
        store,
        required=store is not None and store is not False,
        localise=localise,
    )


def _forward_scores(
    session: MethodSession,
    concept: Concept,
    reduction: str | None,
    token_readouts: bool,
    batch_size: int | None,
    store: Any,
    *,
    required: bool,
    localise: str = "none",
) -> ScoreTable:
    """Vector Filter from the activation cache when it serves the question, else by its forward pass."""
    wanted = concept.reduction if reduction is None else reduction
    cache, notes = resolve_activation_cache(session, store, required=required)
    if cache is not None:
        if localise != "none":
            why = f"localise={localise!r} reads each sentence's tokens: forward pass"
        elif token_readouts or wanted == "per_token":
            why = "token_readouts asked: forward pass"
        else:
            why = serves(cache, concept, wanted)
        if why is None:
            return vector_filter_from_cache(cache, session.rows, concept, max_length=session.max_length)
        notes = [why]
    table = vector_filter(
        session.adapter,
        session.rows,
        concept,
        batch_size=batch_size or session.batch_size,
        max_length=session.max_length,
        reduction=reduction,
        token_readouts=token_readouts,  # type: ignore[arg-type]
        localise=localise,
        skip_invalid=session.skip_invalid,
        progress=session.progress,
    )
    table.meta.update({"scored_from": "forward-pass", "notes": [*table.meta.get("notes", []), *notes]})
    return table


@register_method(
    "projection-difference",
    kind="forward",
    settings=AnswerConfig,
    defaults={"max_new_tokens": 64, "seed": None},
    extra={"batch_size": None, "store": None},
    description="the row's answer's readout minus that of the model's own answers to its prompt",
)
def _projection_difference(
    session: MethodSession, concept: Concept, queries: Sequence[ChatRow] | None, **options: Any
) -> ScoreTable:
    """``store``: as Vector Filter's; the model's answers' means are read once per sampling setting and kept in
    the activation cache."""
    options = {**METHODS["projection-difference"].options, **options}
    n_samples, temperature, max_new_tokens = options["n_samples"], options["temperature"], options["max_new_tokens"]
    store = options["store"]
    seed = session.seed if options["seed"] is None else options["seed"]
    cache_dir = options["cache_dir"] if options["cache_dir"] is not None else session.answer_cache
    batch_size = options["batch_size"] or session.batch_size
    cache, notes = resolve_activation_cache(session, store, required=store is not None and store is not False)
    if cache is not None:
        why = serves(cache, concept, concept.reduction)
        if why is None and not is_linear(concept):
            why = f"{type(concept).__name__} is not linear: Projection Difference from the cache needs a direction"
        if why is None and concept.reduction == "mean":
            answers = build_answer_means(
                session.adapter,
                session.rows,
                cache,
                n_samples=n_samples,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                seed=seed,
                batch_size=batch_size,
                max_length=session.max_length,
                cache_dir=cache_dir,
                progress=session.progress,
            )
            meta = {
                "layer": concept.layer,
                "concept": repr(concept),
                "n_samples": n_samples,
                "temperature": temperature,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
                "max_length": session.max_length,
                "sign": "positive = the row's answer expresses the concept more than the model's own answers",
            }
            return projection_difference_from_cache(cache, answers, session.rows, concept, meta=meta)  # type: ignore[arg-type]
        notes = [why or ""]
    table = projection_difference(
        session.adapter,
        session.rows,
        concept,
        n_samples=n_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        cache_dir=cache_dir,
        batch_size=batch_size,
        max_length=session.max_length,
        skip_invalid=session.skip_invalid,
        progress=session.progress,
    )
    table.meta.update({"scored_from": "forward-pass", "notes": [*table.meta.get("notes", []), *notes]})
    return table


SESSION_SETTINGS = ("max_length", "seed")
"""Gradient settings the session sets (its ``max_length`` and ``seed``): not method options."""
GRADIENT_OPTIONS = tuple(name for name in settings_fields(GradientAttributionConfig) if name not in SESSION_SETTINGS)
"""The gradient methods' options: ``GradientAttributionConfig``'s fields but the session's."""
SESSION_DEFAULTS: dict[str, Any] = {"batch_size": None, "cache_dir": None}
"""Options whose default is the session's (``None``: the session's batch size, its workdir's answer cache)."""
_CONCEPT_ONLY = ("keep", "keep_k", "contrast", "token_aggregation", "window", "normalization")


def gradient_config(session: MethodSession, **options: Any) -> GradientAttributionConfig:
    """The ``GradientAttributionConfig`` of a gradient method's ``options`` (its fields; ``factor_dtype`` is the
    deprecated name of ``dtype``) in ``session``: ``max_length`` and ``seed`` are the session's, ``batch_size`` and
    ``cache_dir`` default to the session's. An unknown option is a ``TypeError`` naming it."""
    if options.get("batch_size") is None:
        options["batch_size"] = session.batch_size
    if options.get("cache_dir") is None:
        options["cache_dir"] = session.answer_cache
    if options["cache_dir"] is not None:
        options["cache_dir"] = str(options["cache_dir"])
    options = rename_deprecated(options, GradientAttributionConfig.__deprecated_aliases__, "gradient_config")  # type: ignore[attr-defined]
    check_known(options, GRADIENT_OPTIONS, "gradient_config")
    return GradientAttributionConfig(max_length=session.max_length, seed=session.seed, **options)


def _gradient(
    session: MethodSession,
    method: str,
    concept: Concept | None,
    queries: Sequence[ChatRow],
    *,
    contrast_queries: Any = None,
    factors: Any = None,
    store: Any = None,
    **options: Any,
) -> ScoreTable:
    config = gradient_config(session, **options)
    return session.engine.attribute(
        method, concept, queries, config, contrast_queries=contrast_queries, factors=factors, store=store
    )


@register_method(
    "concept-influence",
    kind="gradient",
    needs_queries=True,
    settings=GradientAttributionConfig,
    option_names=GRADIENT_OPTIONS,
    defaults=SESSION_DEFAULTS,
    extra={"contrast_queries": None, "factors": None, "store": None},
    description="EKFAC influence of each row on the concept's readout over the queries' answers",
)
def _concept_influence(
    session: MethodSession, concept: Concept, queries: Sequence[ChatRow], **options: Any
) -> ScoreTable:
    """Pure EKFAC Concept Influence. Method variants: ``n_samples``/``keep``/``keep_k`` (which query answers),
    ``contrast="auto"`` (most minus least concept-expressing answers), ``row_loss``/``normalization`` (row
    normalisation), ``token_aggregation``/``window``, ``preconditioner``/``damping`` (curvature). The options are
    ``GradientAttributionConfig``'s fields (see ``METHODS["concept-influence"].options``)."""
    return _gradient(session, "concept-influence", concept, queries, **options)


@register_method(
    "influence",
    kind="gradient",
    needs_concept=False,
    needs_queries=True,
    settings=GradientAttributionConfig,
    defaults=SESSION_DEFAULTS,
    option_names=[n for n in GRADIENT_OPTIONS if n not in _CONCEPT_ONLY],
    extra={"factors": None, "store": None},
    description="classical EKFAC influence on the log-likelihood of the queries' answers",
)
def _influence(
    session: MethodSession, concept: Concept | None, queries: Sequence[ChatRow], **options: Any
) -> ScoreTable:
    return _gradient(session, "influence", None, queries, **options)


# ---- combinations of forward and gradient evidence -------------------------------------------------------------------
def _combination(
    session: MethodSession,
    concept: Concept,
    queries: Sequence[ChatRow],
    fusion: str,
    gradient_options: dict[str, Any],
    store: Any,
) -> ScoreTable:
    """Vector Filter and Concept Influence on the same rows, fused (``attribution.combine.fuse``); both component
    scores are kept as columns and the settings of each in ``meta``."""
    forward = _forward_scores(session, concept, None, False, None, store, required=False)
    gradient = _concept_influence(session, concept, queries, store=store, **gradient_options)
    # rows left out as truncated (skip_invalid) by either component are left out of the fusion too
    skipped = ~(forward.valid & gradient.valid)
    scores = np.full(len(forward), np.nan)
    scores[~skipped] = fuse(forward.scores[~skipped], gradient.scores[~skipped], fusion)  # type: ignore[arg-type]
    parts = {
        "forward": forward.meta.get("scored_from"),
        "gradient": {"store": "gradient-store", "exact": "gradient-pass"}.get(
            gradient.meta.get("scored_from"), gradient.meta.get("scored_from")
        ),
    }
    meta = {
        **gradient.meta,
        "fusion": fusion,
        "components": {"forward": "vector-filter", "gradient": "concept-influence"},
        "scored_from": f"{parts['forward']} + {parts['gradient']}",
        "scored_from_parts": parts,
        "notes": [*forward.meta.get("notes", []), *gradient.meta.get("notes", [])],
        "gradient_options": {
            **{k: v for k, v in gradient_options.items() if k != "factors"},
            "factor_dtype": gradient_options.get("dtype"),
        },  # the old name, kept for readers
        "sign": "higher = the row voices the concept and training on it raises the concept",
    }
    columns = {
        name: [None if s else float(v) for v, s in zip(table.scores, skipped, strict=True)]
        for name, table in (("forward_score", forward), ("gradient_score", gradient))
    }
    return ScoreTable.from_rows(
        list(session.rows), scores, "combination", columns=columns, meta=meta, truncated=skipped.tolist()
    )


def register_combination(name: str, fusion: str, description: str, **defaults: Any) -> None:
    """Register the fusion ``fusion`` of Vector Filter with Concept Influence as method ``name``; ``defaults``
    override Concept Influence's option defaults (e.g. ``keep="top"``)."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    ci = METHODS["concept-influence"]
    unknown = set(defaults) - set(ci.options) - {"store"}
    if unknown:
        raise ValueError(f"concept-influence has no option {sorted(unknown)}")
    own = {**ci.defaults, **defaults}

    def combination(
        session: MethodSession, concept: Concept, queries: Sequence[ChatRow], *, store: Any = None, **options: Any
    ) -> ScoreTable:
        merged = {**{k: v for k, v in METHODS[name].options.items() if k != "store"}, **options}
        rerank_options = RerankConfig(**{k: merged.pop(k) for k in settings_fields(RerankConfig)})
        table = _combination(session, concept, queries, fusion, merged, store)
        return _rerank(session, table, concept, queries, merged, rerank_options) if rerank_options.rerank_top else table

    # the options are Concept Influence's (with this combination's defaults) plus ``store``
    combination.__doc__ = description
    register_method(
        name,
        kind="gradient",
        needs_queries=True,
        description=description,
        settings=ci.settings,
        option_names=ci.option_names,
        defaults=own,
        extra={**ci.extra, **option_defaults(RerankConfig)},
    )(combination)


def _rerank(
    session: MethodSession,
    table: ScoreTable,
    concept: Concept,
    queries: Sequence[ChatRow],
    gradient_options: dict[str, Any],
    settings: RerankConfig,
) -> ScoreTable:
    """The counterfactual re-ranking stage (``attribution.rerank``): the top ``rerank_top`` rows of ``table``
    re-ordered by what a real SGD step on each does to the concept over the model's own query answers; the measured
    change is the ``counterfactual_effect`` column (None for rows not re-ranked)."""
    config = gradient_config(session, **{k: v for k, v in gradient_options.items() if k in GRADIENT_OPTIONS})
    measurement, _ = session.engine.measurement(
        "concept-influence", concept, queries, config, contrast_queries=gradient_options.get("contrast_queries")
    )
    candidates = top_candidates(table.scores, settings.rerank_top)
    train = session.engine.train
    position_of = {int(row.index): p for p, row in enumerate(train)}
    effects = counterfactual_effects(
        session.adapter,
        train,
        [position_of[int(table.index[c])] for c in candidates],
        measurement,
        lr=settings.rerank_lr,
        steps=settings.rerank_steps,
        batch_size=config.batch_size,
    )
    column: list[float | None] = [None] * len(table)
    for c, effect in zip(candidates, effects, strict=True):
        column[int(c)] = float(effect)
    meta = {
        **table.meta,
        "rerank": {
            **asdict(settings),
            "n_reranked": int(len(candidates)),
            "n_lowering": int((effects <= 0).sum()),
            "what": "top rows re-ordered by the measured change of the concept after a real "
            "SGD step on each; those that lower it follow every other row",
        },
    }
    columns = {name: table.columns[name] for name in table.columns} if table.columns else {}
    columns["counterfactual_effect"] = column
    return ScoreTable.from_rows(
        list(session.rows),
        rerank(table.scores, effects, candidates),
        table.method,
        columns=columns,
        meta=meta,
        truncated=(~table.valid).tolist(),
    )


_COMBINATIONS = {
    "rank": "mean percentile rank of Vector Filter and Concept Influence",
    "zscore": "sum of the z-scores of Vector Filter and Concept Influence",
    "gate": "Vector Filter, rows that Concept Influence says lower the concept placed below all others",
    "signed": "Vector Filter's percentile rank times the sign of Concept Influence (rows that would lower the concept "
    "are ranked from the bottom)",
    "product": "Vector Filter's percentile rank times Concept Influence's centred percentile rank",
    "tiered": "rows that training would push the concept up (Concept Influence > 0) ranked by Vector Filter, then all "
    "other rows ranked by Concept Influence (the rows training would push down most come last)",
}
COMBINATION_GRADIENT_DEFAULTS: dict[str, Any] = {"preconditioner": "identity"}
"""Concept Influence's option defaults inside every ``combined-*`` method (the method study's best setting for the
gradient component of a fusion: see the README's method study; ``--preconditioner ekfac`` etc. override them)."""

for _fusion, _description in _COMBINATIONS.items():
    register_combination(f"combined-{_fusion}", _fusion, _description, **COMBINATION_GRADIENT_DEFAULTS)


def recommended_gradient_config() -> Any:
    """The ``InfluenceConfig`` of the recommended method's gradient component at its default options (``None`` when
    the recommended method is not a combination), for callers that score it inside their own pass (the demo)."""
    if not RECOMMENDED_METHOD.startswith("combined-"):
        return None
    options = METHODS[RECOMMENDED_METHOD].options
    return InfluenceConfig(**{k: options[k] for k in settings_fields(InfluenceConfig) if k != "batch_size"})


def cache_needs(methods: Sequence[str]) -> dict[str, Any]:
    """``{"activations": bool, "answers": bool, "gradients": None | "identity" | "eigen"}``: the caches ``methods``
    read (``store.caches``): forward methods and ``combined-*`` the activation cache; gradient methods a gradient
    store, the identity store (no EKFAC fit) when their preconditioner is the identity, else the EKFAC eigen store."""
    out: dict[str, Any] = {"activations": False, "answers": False, "gradients": None}
    for name in methods:
        spec = get_method(name)
        if spec.kind == "forward" or spec.name.startswith("combined-"):
            out["activations"] = True
        if spec.name == "projection-difference":
            out["answers"] = True
        if spec.kind == "gradient":
            identity = spec.options.get("preconditioner") == "identity"
            wanted = "identity" if identity else "eigen"
            out["gradients"] = "eigen" if "eigen" in (wanted, out["gradients"]) else "identity"
    return out

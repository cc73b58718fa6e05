"""The registry of attribution methods: name -> function, and the method run when none is named.

A method is a function ``fn(session, concept, queries, **options) -> ScoreTable`` where ``session`` is the
``Attributor`` (model, training rows, workdir caches), ``concept`` a ``Concept`` (or ``None`` when the method
needs none) and ``queries`` a list of ``ChatRow`` (or ``None``). Its keyword-only parameters are its options:
``Attributor.attribute`` refuses any other option with a ``ValueError`` naming it and the method. Gradient methods
also take ``store`` (see ``Attributor.attribute``). Register a new method with ``@register_method(...)``; the CLI's
``--method`` choices come from this registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from concept_influence.attribution.forward import projection_difference, vector_filter
from concept_influence.attribution.gradient import GradientAttributionConfig
from concept_influence.attribution.influence import InfluenceConfig
from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.base import Concept
from concept_influence.curvature.config import Damping
from concept_influence.data.chat import ChatDataset, ChatRow
from concept_influence.models.base import ModelAdapter
from concept_influence.store.activations import build_answer_means, resolve_activation_cache


class MethodSession(Protocol):
    """What a method reads of the session it is given (``pipeline.Attributor``, which calls the methods: a protocol
    here, not an import of the session's module). ``gradient_attribution`` is the gradient methods' engine."""

    adapter: ModelAdapter
    max_length: int
    batch_size: int
    seed: int
    skip_invalid: bool
    progress: bool

    @property
    def rows(self) -> ChatDataset: ...

    @property
    def answer_cache(self) -> Path | None: ...

    @property
    def store_dir(self) -> Path | None: ...

    def model_fingerprint(self) -> str: ...

    def data_fingerprint(self) -> str: ...

    def gradient_attribution(self, method: str, concept: Concept | None, queries: Sequence[ChatRow],
                             config: GradientAttributionConfig, *, contrast_queries: Sequence[ChatRow] | None = None,
                             factors: Any = None, store: Any = None) -> ScoreTable: ...

MethodFn = Callable[..., ScoreTable]

RECOMMENDED_METHOD = "combined-tiered"
"""The method ``Attributor.attribute`` and ``concept-influence attribute`` run when none is named."""


@dataclass(frozen=True)
class Method:
    """A registered method. ``kind``: ``"forward"`` (forward passes only) or ``"gradient"`` (curvature + gradients;
    reads factors and stores); ``needs_concept`` / ``needs_queries``: what a question must give."""

    name: str
    fn: MethodFn
    kind: Literal["forward", "gradient"]
    needs_concept: bool
    needs_queries: bool
    description: str

    @property
    def options(self) -> dict[str, Any]:
        """The method's options and their defaults (its keyword-only parameters)."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def check_options(self, options: dict[str, Any]) -> None:
        allowed = self.options
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"method {self.name!r} has no option {unknown[0]!r}"
                             + (f" (nor {unknown[1:]})" if len(unknown) > 1 else "")
                             + f"; its options are: {', '.join(sorted(allowed)) or 'none'}")


METHODS: dict[str, Method] = {}


def register_method(name: str, *, kind: Literal["forward", "gradient"], needs_concept: bool = True,
                    needs_queries: bool = False, description: str = "") -> Callable[[MethodFn], MethodFn]:
    """Decorator: register ``fn`` under ``name`` (replacing an earlier registration of the same name)."""
    if kind not in ("forward", "gradient"):
        raise ValueError(f"method kind must be 'forward' or 'gradient', got {kind!r}")

    def decorate(fn: MethodFn) -> MethodFn:
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        METHODS[name] = Method(name, fn, kind, needs_concept, needs_queries, doc)
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
def _vector_filter(session: MethodSession, concept: Concept, queries: Sequence[ChatRow] | None, *,
                   reduction: str | None = None, token_readouts: bool = False, batch_size: int | None = None,
                   store: Any = None) -> ScoreTable:
    """``store``: ``None`` reads the workdir's activation cache when it serves the question, ``False`` forces the
    forward pass, a path reads that store folder's cache (``meta["scored_from"]`` says which)."""
    return _forward_scores(session, concept, reduction, token_readouts, batch_size, store,
                           required=store is not None and store is not False)


def _forward_scores(session: MethodSession, concept: Concept, reduction: str | None, token_readouts: bool,
                    batch_size: int | None, store: Any, *, required: bool) -> ScoreTable:
    """Vector Filter from the activation cache when it serves the question, else by its forward pass."""
    wanted = concept.reduction if reduction is None else reduction
    cache, notes = resolve_activation_cache(session, store, required=required)
    if cache is not None:
        why = "token_readouts asked: forward pass" if token_readouts or wanted == "per_token" else serves(cache, concept, wanted)
        if why is None:
            return vector_filter_from_cache(cache, session.rows, concept, max_length=session.max_length)
        notes = [why]
    table = vector_filter(session.adapter, session.rows, concept, batch_size=batch_size or session.batch_size,
                          max_length=session.max_length, reduction=reduction, token_readouts=token_readouts,  # type: ignore[arg-type]
                          skip_invalid=session.skip_invalid, progress=session.progress)
    table.meta.update({"scored_from": "forward-pass", "notes": [*table.meta.get("notes", []), *notes]})
    return table


@register_method("projection-difference", kind="forward",
                 description="the row's answer's readout minus that of the model's own answers to its prompt")
def _projection_difference(session: MethodSession, concept: Concept, queries: Sequence[ChatRow] | None, *,
                           n_samples: int = 1, temperature: float = 1.0, max_new_tokens: int = 64,
                           seed: int | None = None, cache_dir: str | None = None,
                           batch_size: int | None = None, store: Any = None) -> ScoreTable:
    """``store``: as Vector Filter's; the model's answers' means are read once per sampling setting and kept in
    the activation cache."""
    seed = session.seed if seed is None else seed
    cache_dir = cache_dir if cache_dir is not None else session.answer_cache
    batch_size = batch_size or session.batch_size
    cache, notes = resolve_activation_cache(session, store, required=store is not None and store is not False)
    if cache is not None:
        why = serves(cache, concept, concept.reduction)
        if why is None and not is_linear(concept):
            why = f"{type(concept).__name__} is not linear: Projection Difference from the cache needs a direction"
        if why is None and concept.reduction == "mean":
            answers = build_answer_means(session.adapter, session.rows, cache, n_samples=n_samples,
                                         temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                         batch_size=batch_size, max_length=session.max_length, cache_dir=cache_dir,
                                         progress=session.progress)
            meta = {"layer": concept.layer, "concept": repr(concept), "n_samples": n_samples, "temperature": temperature,
                    "max_new_tokens": max_new_tokens, "seed": seed, "max_length": session.max_length,
                    "sign": "positive = the row's answer expresses the concept more than the model's own answers"}
            return projection_difference_from_cache(cache, answers, session.rows, concept, meta=meta)  # type: ignore[arg-type]
        notes = [why or ""]
    table = projection_difference(session.adapter, session.rows, concept, n_samples=n_samples, temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=seed, cache_dir=cache_dir, batch_size=batch_size,
                                  max_length=session.max_length, skip_invalid=session.skip_invalid,
                                  progress=session.progress)
    table.meta.update({"scored_from": "forward-pass", "notes": [*table.meta.get("notes", []), *notes]})
    return table


def _damping(damping: float | Damping, absolute_damping: float | None) -> Damping:
    """The ``Damping`` of a method's ``damping`` / ``absolute_damping`` options."""
    if isinstance(damping, Damping):
        return damping
    if absolute_damping is not None:
        return Damping(absolute=absolute_damping)
    return Damping(relative=float(damping))


def gradient_config(session: MethodSession, *, preconditioner: str = "ekfac", damping: float | Damping = 0.1,
                     absolute_damping: float | None = None, row_loss: str = "sum", token_breakdown: str = "none",
                     per_weight: bool = False, self_influence: bool = False, n_samples: int = 1,
                     temperature: float = 1.0, max_new_tokens: int = 48, fisher: str = "true",
                     factor_dtype: str = "float32", cache_dir: str | None = None,
                     batch_size: int | None = None, allow_subset: bool = False, keep: str = "all", keep_k: int = 1,
                     contrast: str = "none", token_aggregation: str = "sum", window: int = 8,
                     normalization: str = "none", max_memory: int | str | None = None,
                     gradient_checkpointing: bool = False) -> GradientAttributionConfig:
    """The ``GradientAttributionConfig`` of a gradient method's options in ``session``."""
    resolved = _damping(damping, absolute_damping)
    return GradientAttributionConfig(
        preconditioner=preconditioner, damping=resolved, fisher=fisher, factor_dtype=factor_dtype,
        max_length=session.max_length, batch_size=batch_size or session.batch_size, n_samples=n_samples,
        temperature=temperature, max_new_tokens=max_new_tokens, seed=session.seed,
        cache_dir=str(cache_dir) if cache_dir is not None else (str(session.answer_cache) if session.answer_cache else None),
        token_breakdown=token_breakdown, row_loss=row_loss, per_weight=per_weight, self_influence=self_influence,
        allow_subset=allow_subset, keep=keep, keep_k=keep_k, contrast=contrast, token_aggregation=token_aggregation,
        window=window, normalization=normalization, max_memory=max_memory,
        gradient_checkpointing=gradient_checkpointing,
    )


def _gradient(session: MethodSession, method: str, concept: Concept | None, queries: Sequence[ChatRow], *,
              contrast_queries: Any, factors: Any, store: Any, **options: Any) -> ScoreTable:
    config = gradient_config(session, **options)
    return session.gradient_attribution(method, concept, queries, config, contrast_queries=contrast_queries,
                                        factors=factors, store=store)


@register_method("concept-influence", kind="gradient", needs_queries=True,
                 description="EKFAC influence of each row on the concept's readout over the queries' answers")
def _concept_influence(session: MethodSession, concept: Concept, queries: Sequence[ChatRow], *,
                       contrast_queries: Any = None, preconditioner: str = "ekfac", damping: float | Damping = 0.1,
                       absolute_damping: float | None = None, row_loss: str = "sum", token_breakdown: str = "none",
                       per_weight: bool = False, self_influence: bool = False, n_samples: int = 1,
                       temperature: float = 1.0, max_new_tokens: int = 48, fisher: str = "true",
                       factor_dtype: str = "float32", factors: Any = None, cache_dir: str | None = None,
                       batch_size: int | None = None, store: Any = None, allow_subset: bool = False,
                       keep: str = "all", keep_k: int = 1, contrast: str = "none", token_aggregation: str = "sum",
                       window: int = 8, normalization: str = "none", max_memory: int | str | None = None,
                       gradient_checkpointing: bool = False) -> ScoreTable:
    """Pure EKFAC Concept Influence. Method variants: ``n_samples``/``keep``/``keep_k`` (which query answers),
    ``contrast="auto"`` (most minus least concept-expressing answers), ``row_loss``/``normalization`` (row
    normalisation), ``token_aggregation``/``window``, ``preconditioner``/``damping`` (curvature)."""
    return _gradient(session, "concept-influence", concept, queries, **{k: v for k, v in locals().items()
                                                                         if k not in ("session", "concept", "queries")})


@register_method("influence", kind="gradient", needs_concept=False, needs_queries=True,
                 description="classical EKFAC influence on the log-likelihood of the queries' answers")
def _influence(session: MethodSession, concept: Concept | None, queries: Sequence[ChatRow], *,
               preconditioner: str = "ekfac", damping: float | Damping = 0.1, absolute_damping: float | None = None,
               row_loss: str = "sum", token_breakdown: str = "none", per_weight: bool = False,
               self_influence: bool = False, n_samples: int = 1, temperature: float = 1.0, max_new_tokens: int = 48,
               fisher: str = "true", factor_dtype: str = "float32", factors: Any = None, cache_dir: str | None = None,
               batch_size: int | None = None, store: Any = None, allow_subset: bool = False,
               max_memory: int | str | None = None, gradient_checkpointing: bool = False) -> ScoreTable:
    return _gradient(session, "influence", None, queries, contrast_queries=None,
                     **{k: v for k, v in locals().items() if k not in ("session", "concept", "queries")})


# ---- combinations of forward and gradient evidence -------------------------------------------------------------------
def _combination(session: MethodSession, concept: Concept, queries: Sequence[ChatRow], fusion: str,
                 gradient_options: dict[str, Any], store: Any) -> ScoreTable:
    """Vector Filter and Concept Influence on the same rows, fused (``attribution.combine.fuse``); both component
    scores are kept as columns and the settings of each in ``meta``."""
    forward = _forward_scores(session, concept, None, False, None, store, required=False)
    gradient = _concept_influence(session, concept, queries, store=store, **gradient_options)
    # rows left out as truncated (skip_invalid) by either component are left out of the fusion too
    skipped = ~(forward.valid & gradient.valid)
    scores = np.full(len(forward), np.nan)
    scores[~skipped] = fuse(forward.scores[~skipped], gradient.scores[~skipped], fusion)  # type: ignore[arg-type]
    parts = {"forward": forward.meta.get("scored_from"),
             "gradient": {"store": "gradient-store", "exact": "gradient-pass"}.get(gradient.meta.get("scored_from"),
                                                                                 gradient.meta.get("scored_from"))}
    meta = {**gradient.meta, "fusion": fusion, "components": {"forward": "vector-filter", "gradient": "concept-influence"},
            "scored_from": f"{parts['forward']} + {parts['gradient']}", "scored_from_parts": parts,
            "notes": [*forward.meta.get("notes", []), *gradient.meta.get("notes", [])],
            "gradient_options": {k: v for k, v in gradient_options.items() if k != "factors"},
            "sign": "higher = the row voices the concept and training on it raises the concept"}
    columns = {name: [None if s else float(v) for v, s in zip(table.scores, skipped, strict=True)]
               for name, table in (("forward_score", forward), ("gradient_score", gradient))}
    return ScoreTable.from_rows(list(session.rows), scores, "combination", columns=columns, meta=meta,
                                truncated=skipped.tolist())


def register_combination(name: str, fusion: str, description: str, **defaults: Any) -> None:
    """Register the fusion ``fusion`` of Vector Filter with Concept Influence as method ``name``; ``defaults``
    override Concept Influence's option defaults (e.g. ``keep="top"``)."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    ci_defaults = {k: v for k, v in METHODS["concept-influence"].options.items() if k != "store"}
    unknown = set(defaults) - set(ci_defaults)
    if unknown:
        raise ValueError(f"concept-influence has no option {sorted(unknown)}")
    ci_defaults.update(defaults)

    def combination(session: MethodSession, concept: Concept, queries: Sequence[ChatRow], *, store: Any = None,
                    **options: Any) -> ScoreTable:
        return _combination(session, concept, queries, fusion, {**ci_defaults, **options}, store)

    # the options are Concept Influence's (with this combination's defaults) plus ``store``
    params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in ("session", "concept", "queries")]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in ci_defaults.items()]
    params.append(inspect.Parameter("store", inspect.Parameter.KEYWORD_ONLY, default=None))
    combination.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    combination.__doc__ = description
    register_method(name, kind="gradient", needs_queries=True, description=description)(combination)


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
    return InfluenceConfig(preconditioner=options["preconditioner"],
                           damping=_damping(options["damping"], options["absolute_damping"]), row_loss=options["row_loss"],
                           token_aggregation=options["token_aggregation"], window=options["window"],
                           normalization=options["normalization"], allow_subset=options["allow_subset"])


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

"""``GradientEngine``: what the gradient methods need of a session, in the attribution layer: the model, the
training rows (tokenised once), the curvature factors it fits or loads and keeps (by Fisher, dtype and weights),
the gradient stores it opens, and the scoring of a question by the exact pass over the rows or from a store.

``pipeline.Attributor`` builds one (``Attributor.engine``) and the methods in ``attribution.methods`` call it; the
engine knows nothing of the session, so it can be built and tested on its own::

    engine = GradientEngine(adapter, rows=lambda: rows, train=lambda: tokenize_chat(rows, tok, 64))
    table = engine.attribute("concept-influence", concept, queries, GradientAttributionConfig())
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from concept_influence.attribution.gradient import (
    GradientAttributionConfig,
    build_measurement,
    factors_record,
    obtain_factors,
    result_table,
)
from concept_influence.attribution.influence import (
    InfluenceResult,
    build_preconditioner,
    check_factors_model,
    compute_influence,
    compute_influence_many,
    preconditioned_gradient,
    resolve_weights,
)
from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.base import Concept
from concept_influence.curvature.config import FactorConfig
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.fit import fit_factors
from concept_influence.curvature.io import data_fingerprint, has_factors, load_factors
from concept_influence.data.chat import ChatRow
from concept_influence.data.tokenize import TokenizedDataset
from concept_influence.distributed.runtime import in_step
from concept_influence.models.base import ModelAdapter
from concept_influence.store.projection import Projector
from concept_influence.store.questions import norms_key, row_norms, store_scores, store_scores_many
from concept_influence.store.store import GradientStore, StoreMismatchError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class GradientEngine:
    """The gradient methods' engine over one model and one training set.

    ``rows`` / ``train``: callables giving the training rows and their tokenisation (called when first needed, so
    a session reads its data lazily); ``data_fingerprint``: the tokenised rows' fingerprint (default: computed
    from ``train()`` once). ``workdir``: where a full fit is kept (``workdir/factors/<fisher>-<dtype>-seed<seed>``)
    and where the default store is looked for (``workdir/store``); ``None``: in memory. ``batch_size``, ``seed``,
    ``progress``: of the fits made here.

    State it keeps: ``factors`` (fits by ``(fisher, kind, dtype, *weights)``), ``stores`` and ``projectors`` (by
    folder), ``query_tokens`` (tokenised query sets by content) and the stores' row norms.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        rows: Callable[[], Sequence[ChatRow]],
        train: Callable[[], TokenizedDataset],
        data_fingerprint: Callable[[], str] | None = None,
        workdir: PathLike | None = None,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.adapter = adapter
        self._rows = rows
        self._train = train
        self._fingerprint = data_fingerprint
        self._data_fingerprint: str | None = None
        self.workdir = Path(workdir) if workdir is not None else None
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.factors: dict[tuple[str, ...], Factors] = {}
        self.stores: dict[str, GradientStore] = {}
        self.projectors: dict[str, Projector] = {}
        self.query_tokens: dict[str, TokenizedDataset] = {}
        self.norms: dict[tuple[Any, ...], np.ndarray] = {}
        self.bases: dict[str, Factors] = {}  # identity stores' sample eigenbases, by folder

    @property
    def rows(self) -> Sequence[ChatRow]:
        return self._rows()

    @property
    def train(self) -> TokenizedDataset:
        return self._train()

    def data_fingerprint(self) -> str:
        if self._fingerprint is not None:
            return self._fingerprint()
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.train)
        return self._data_fingerprint

    # ---- factors ---------------------------------------------------------------------------------------------------
    def factors_dir(self, config: FactorConfig) -> Path | None:
        """The workdir folder of an EKFAC fit with ``config``'s Fisher, dtype and seed."""
        if self.workdir is None:
            return None
        return self.workdir / "factors" / f"{config.fisher}-{config.dtype}-seed{config.seed}"

    def remember(self, config: FactorConfig, weights: Sequence[str], factors: Factors) -> None:
        """Keep a fit for later questions (``session_factors`` reuses it when it covers what they need)."""
        self.factors[(config.fisher, config.preconditioner, config.dtype, *weights)] = factors

    def session_factors(
        self,
        config: GradientAttributionConfig,
        needed: Sequence[str] | None = None,
        *,
        fit: bool = True,
        row_sink: Any = None,
    ) -> tuple[Factors | None, list[str]]:
        """EKFAC factors for ``config``'s Fisher/dtype/seed: a fit already kept that covers ``needed`` (default:
        every tracked weight), else the workdir's fit of every tracked weight, loaded or fitted now (and saved to
        the workdir; ``row_sink`` is fed during that fit's Λ pass). Returns the factors and a note saying which;
        ``fit=False``: ``(None, [])`` instead of fitting."""
        fc = FactorConfig(fisher=config.fisher, preconditioner="ekfac", dtype=config.dtype, seed=config.seed)
        names = [i.name for i in self.adapter.tracked_weights()]
        key = (fc.fisher, "ekfac", fc.dtype, *names)
        if key in self.factors:
            return self.factors[key], ["factors reused from this session"]
        wanted = set(names if needed is None else needed)
        for (fisher, kind, dtype, *covered), fitted in self.factors.items():
            if (fisher, kind, dtype) == key[:3] and wanted <= set(covered) and fitted.config.seed == fc.seed:
                return fitted, [f"factors of {len(covered)} weights reused from this session"]
        folder = self.factors_dir(fc)
        existed = folder is not None and has_factors(folder)
        if not fit and not existed:
            return None, []
        factors = fit_factors(
            self.adapter,
            self.train,
            replace(fc, seed=self.seed),
            weights=names,
            batch_size=self.batch_size,
            out_dir=folder,
            progress=self.progress,
            row_sink=row_sink,
        )
        assert factors is not None
        self.remember(fc, names, factors)
        note = (
            f"factors loaded from {folder}"
            if existed
            else (f"factors fitted on {len(self.train)} rows" + (f" and saved to {folder}" if folder else ""))
        )
        return factors, [note]

    def factors_for(
        self,
        measurement: Any,
        config: GradientAttributionConfig,
        factors: Factors | PathLike | None,
        *,
        sharded_ok: bool = False,
    ) -> tuple[Factors | Path | None, list[str]]:
        """The factors a question is scored with: ``factors`` when given (fitted or loaded for the weights the
        measurement reaches), else the session's (``session_factors``); ``None`` for the identity preconditioner.
        ``sharded_ok``: a folder may come back on a sharded model (``compute_influence`` reads each rank's own)."""
        if factors is not None or (self.workdir is None and not self.factors):
            # explicit factors, or no workdir to keep a full fit in: fit (or load) only the weights reached
            return obtain_factors(
                self.adapter,
                self.train,
                factors,
                config,
                measurement.weights(self.adapter),
                progress=self.progress,
                sharded_ok=sharded_ok,
            )
        if config.preconditioner == "identity":
            return None, []
        if sharded_ok and self.workdir is not None and in_step(self.adapter.model):
            return self.session_folder(config)
        return self.session_factors(config, measurement.weights(self.adapter))

    def session_folder(self, config: GradientAttributionConfig) -> tuple[Path, list[str]]:
        """The workdir's fit of every tracked weight as a folder, fitted now when it is missing (on a model sharded
        over several ranks: ``compute_influence`` then reads each rank's own weights' tensors from it, and no rank
        loads every weight's factors)."""
        fc = FactorConfig(fisher=config.fisher, preconditioner="ekfac", dtype=config.dtype, seed=config.seed)
        folder = self.factors_dir(fc)
        assert folder is not None
        existed = has_factors(folder)
        fit_factors(
            self.adapter,
            self.train,
            replace(fc, seed=self.seed),
            weights=[i.name for i in self.adapter.tracked_weights()],
            batch_size=self.batch_size,
            out_dir=folder,
            progress=self.progress,
            load_result=False,
        )
        if existed:
            return folder, [f"factors read from {folder} (each rank its own weights)"]
        return folder, [f"factors fitted on {len(self.train)} rows and saved to {folder} (each rank reads its own)"]

    # ---- stores ----------------------------------------------------------------------------------------------------
    @property
    def store_dir(self) -> Path | None:
        return self.workdir / "store" if self.workdir is not None else None

    def open_store(self, path: PathLike | GradientStore) -> GradientStore:
        """Open a store and check it against this model and data (a mismatch is a ``StoreMismatchError``)."""
        store = path if isinstance(path, GradientStore) else self.stores.get(str(path)) or GradientStore.open(path)
        store.check(model=self.adapter.fingerprint(), data=self.data_fingerprint())
        self.stores[str(store.folder)] = store
        return store

    def resolve_store(self, store: Any) -> tuple[GradientStore | None, list[str]]:
        """``store=False``: none; a path or store: that one (checked); ``None``: the workdir's when it matches."""
        if store is False:
            return None, []
        if store is not None:
            return self.open_store(store), []
        folder = self.store_dir
        if folder is None or not (folder / "manifest.json").exists():
            return None, []
        try:
            return self.open_store(folder), []
        except StoreMismatchError as err:
            return None, [f"the workdir's store is not used ({err}); exact pass"]

    def store_basis(self, store: GradientStore) -> Factors:
        """The sample eigenbases an identity store was written in (``<store>/basis``), loaded once."""
        key = f"{store.folder}/basis"
        if key not in self.bases:
            self.bases[key] = load_factors(store.folder / str(store.manifest["basis"]), weights=store.names)
        return self.bases[key]

    def store_query(
        self,
        store: GradientStore,
        measurement: Any,
        config: GradientAttributionConfig,
        factors: Factors | PathLike | None,
    ) -> tuple[dict[str, torch.Tensor], Projector, list[str], Any]:
        """The measurement's preconditioned gradient ``(P + λ)⁻¹ ∇f`` per store weight, the store's projector, notes
        and the preconditioner."""
        notes: list[str] = []
        loaded: Factors | None
        basis: Factors | None = None  # what the store's projector is rebuilt from (an eigen store: its factors)
        if config.preconditioner == "identity":
            loaded = None  # plain inner products of the stored (rotated) gradients; exact when the store is full
            if store.config.kind == "eigen" and store.manifest.get("basis"):  # an identity store: its own eigenbases
                basis = self.store_basis(store)
            elif store.config.kind == "eigen":
                basis = (
                    obtain_factors(
                        self.adapter,
                        self.train,
                        factors,  # type: ignore[assignment]
                        replace(config, preconditioner="ekfac", max_memory=None),
                        store.names,
                        progress=self.progress,
                    )[0]
                    if factors is not None
                    else self.session_factors(config, store.names)[0]
                )
        else:
            if factors is not None:
                # a store question holds only the store's weights' factors: no memory-bounded (folder) scoring
                loaded, notes = obtain_factors(
                    self.adapter,
                    self.train,
                    factors,
                    replace(config, max_memory=None),  # type: ignore[assignment]
                    store.names,
                    progress=self.progress,
                )
            else:
                loaded, notes = self.session_factors(config, store.names)
            basis = loaded
        key = str(store.folder)
        if key not in self.projectors:
            self.projectors[key] = store.projector(self.adapter, basis)
        projector = self.projectors[key]
        names, more = resolve_weights(
            self.adapter,
            measurement,
            store.names,
            allow_subset=config.allow_subset,
            what=f"the gradient store {store.folder}",
        )
        if loaded is not None:  # the factors must cover what the store and the measurement share (or allow_subset)
            more += check_factors_model(self.adapter, loaded, allow_missing_provenance=config.allow_missing_provenance)
            covered = set(loaded.names)
            names, extra = resolve_weights(
                self.adapter, measurement, [n for n in names if n in covered], allow_subset=config.allow_subset
            )
            more += [note for note in extra if note not in more]
        preconditioner = build_preconditioner(self.adapter, names, loaded, config.influence_config())
        grad_f = measurement.gradient(self.adapter, names, batch_size=config.batch_size)
        vectors = preconditioned_gradient(preconditioner, grad_f, measurement.description)
        return vectors, projector, notes + more, preconditioner

    def store_result(
        self,
        store: GradientStore,
        measurement: Any,
        config: GradientAttributionConfig,
        factors: Factors | PathLike | None,
    ) -> InfluenceResult:
        """A question's ``InfluenceResult`` from the store (no pass over the training rows)."""
        t0 = time.perf_counter()
        vectors, projector, notes, preconditioner = self.store_query(store, measurement, config, factors)
        t1 = time.perf_counter()
        names = list(vectors)
        scores, per = store_scores(store, projector, vectors, per_weight=config.per_weight, row_loss=config.row_loss)
        t2 = time.perf_counter()
        notes = notes + [
            f"scored from the gradient store {store.folder} ({store.config.kind}, rank {store.config.rank}, "
            f"{store.config.dtype}): no pass over the training rows"
        ]
        return InfluenceResult(
            scores=torch.from_numpy(np.ascontiguousarray(scores)),
            indices=[int(i) for i in store.indices],
            weights=names,
            measurement=measurement.description,
            preconditioner=preconditioner.kind,
            damping=dict(preconditioner.damping),
            per_weight=None if per is None else {n: torch.from_numpy(per[:, j].copy()) for j, n in enumerate(names)},
            notes=notes,
            timings={"measurement_gradient": t1 - t0, "store_scoring": t2 - t1},
            row_loss=config.row_loss,
            allow_missing_provenance=config.allow_missing_provenance,
        )

    def row_norms(
        self, store: GradientStore, projector: Projector, preconditioner: Any, names: Sequence[str]
    ) -> np.ndarray:
        """``store.questions.row_norms``, cached per store and weights."""
        key = norms_key(store, preconditioner, names)
        if key not in self.norms:
            self.norms[key] = row_norms(store, projector, preconditioner, names)
        return self.norms[key]

    # ---- questions -------------------------------------------------------------------------------------------------
    def measurement(
        self,
        method: str,
        concept: Concept | None,
        queries: Sequence[ChatRow],
        config: GradientAttributionConfig,
        *,
        contrast_queries: Sequence[ChatRow] | None = None,
    ) -> Any:
        """``build_measurement`` with this engine's cache of tokenised queries: ``(measurement, answered)``."""
        return build_measurement(
            self.adapter,
            concept,
            queries,
            method,
            config,
            contrast_queries=contrast_queries,
            token_cache=self.query_tokens,
        )

    @staticmethod
    def skip_identity_store(
        opened: GradientStore | None, store: Any, config: GradientAttributionConfig, notes: list[str]
    ) -> GradientStore | None:
        """``opened``, or ``None`` (with a note) when it is an identity store (sample eigenbases, no EKFAC factors)
        and the question is not identity-preconditioned; a store named explicitly is then an error."""
        if opened is None or not opened.manifest.get("basis") or config.preconditioner == "identity":
            return opened
        if store not in (None, False):
            raise ValueError(
                f"{opened.folder} is an identity store (sample eigenbases, no EKFAC factors): it serves "
                "identity-preconditioned questions; build an EKFAC store (build-store --rank K)"
            )
        notes.append(
            f"the workdir's store serves identity-preconditioned questions only "
            f"(preconditioner {config.preconditioner!r}): exact pass"
        )
        return None

    def attribute(
        self,
        method: str,
        concept: Concept | None,
        queries: Sequence[ChatRow],
        config: GradientAttributionConfig,
        *,
        contrast_queries: Sequence[ChatRow] | None = None,
        factors: Factors | PathLike | None = None,
        store: Any = None,
    ) -> ScoreTable:
        """Score every training row: answer the queries (cached), get factors (``factors`` if given, else the
        engine's), then score from the gradient store (``store``: ``None`` the workdir's when it matches, ``False``
        the exact pass, a path that store) or by the exact pass over the training rows."""
        started = time.perf_counter()
        measurement, answered = self.measurement(method, concept, queries, config, contrast_queries=contrast_queries)
        meta = {"n_queries": len(answered), "config": config.to_dict()}
        opened, store_notes = self.resolve_store(store)
        opened = self.skip_identity_store(opened, store, config, store_notes)
        exact_only = (
            config.token_breakdown != "none"
            or config.self_influence
            or config.token_aggregation != "sum"
            or config.normalization != "none"
        )
        if opened is not None and exact_only:
            if store not in (None, False):
                raise ValueError(
                    "a gradient store gives scores and per-weight scores only: the token breakdown, "
                    "self-influence, token aggregation and row normalisation need the exact pass (store=False)"
                )
            store_notes.append(
                "token breakdown / self-influence / token aggregation / normalisation asked: exact pass "
                "instead of the store"
            )
            opened = None
        if opened is not None:
            result = self.store_result(opened, measurement, config, factors)
            result.timings["total"] = time.perf_counter() - started
            return result_table(
                self.rows,
                result,
                method,
                notes=store_notes,
                meta={**meta, "scored_from": "store", "store": str(opened.folder)},
            )
        loaded, notes = self.factors_for(measurement, config, factors, sharded_ok=True)
        result = compute_influence(
            self.adapter, self.train, measurement, loaded, config.influence_config(), progress=self.progress
        )
        return result_table(
            self.rows,
            result,
            method,
            notes=store_notes + notes,
            meta={**meta, "scored_from": "exact", "factors_fit": factors_record(loaded, self.train)},
        )

    def attribute_many(
        self,
        method: str,
        questions: Sequence[tuple[Any, Sequence[ChatRow] | None, Sequence[ChatRow] | None]],
        config: GradientAttributionConfig,
        *,
        factors: Factors | PathLike | None = None,
        store: Any = None,
    ) -> list[ScoreTable]:
        """Several ``(concept, queries, contrast_queries)`` questions of one gradient method at once: from a store,
        one blocked product for all; without one, one exact pass scores them all (``compute_influence_many``)."""
        if config.token_breakdown != "none" or config.per_weight or config.self_influence:
            raise ValueError("attribute_many gives scores only: ask breakdowns one question at a time (attribute)")
        measurements = []
        for concept, queries, contrast in questions:
            if queries is None:
                raise ValueError(f"method {method!r} needs queries in every question")
            measurements.append(self.measurement(method, concept, queries, config, contrast_queries=contrast))
        opened, notes = self.resolve_store(store)
        opened = self.skip_identity_store(opened, store, config, notes)
        started = time.perf_counter()
        if opened is not None:
            prepared = [self.store_query(opened, m, config, factors) for m, _ in measurements]
            scores = store_scores_many(opened, [(p[1], p[0]) for p in prepared], row_loss=config.row_loss)
            results = [
                InfluenceResult(
                    scores=torch.from_numpy(scores[:, k].copy()),
                    indices=[int(i) for i in opened.indices],
                    weights=list(p[0]),
                    measurement=m.description,
                    preconditioner=p[3].kind,
                    damping=dict(p[3].damping),
                    notes=p[2],
                    row_loss=config.row_loss,
                    allow_missing_provenance=config.allow_missing_provenance,
                )
                for k, (p, (m, _)) in enumerate(zip(prepared, measurements, strict=True))
            ]
            scored_from = "store"
            notes = notes + [
                f"scored from the gradient store {opened.folder}, {len(questions)} questions in one product"
            ]
        else:
            loaded, more = self.factors_for(measurements[0][0], config, factors, sharded_ok=True)
            jobs = {str(k): (m, config.influence_config()) for k, (m, _) in enumerate(measurements)}
            many = compute_influence_many(
                self.adapter, self.train, jobs, loaded, batch_size=config.batch_size, progress=self.progress
            )
            results = [many[str(k)] for k in range(len(questions))]
            scored_from, notes = "exact", notes + more
        elapsed = time.perf_counter() - started
        return [
            result_table(
                self.rows,
                result,
                method,
                notes=notes,
                meta={
                    "n_queries": len(answered),
                    "config": config.to_dict(),
                    "scored_from": scored_from,
                    "wall_time_s": elapsed,
                    "n_questions_together": len(questions),
                },
            )
            for result, (_, answered) in zip(results, measurements, strict=True)
        ]

    def search(
        self,
        method: str,
        concept: Concept | None,
        queries: Sequence[ChatRow],
        config: GradientAttributionConfig,
        store: GradientStore,
        *,
        top_k: int = 20,
        like_row: int | None = None,
        contrast_queries: Sequence[ChatRow] | None = None,
        factors: Factors | PathLike | None = None,
        search: str = "auto",
    ) -> ScoreTable:
        """The ``top_k`` highest-scoring rows of ``store`` for a question, best first; ``like_row``: the question is
        that row's log-likelihood and the scores are cosines in the preconditioned metric (see
        ``Attributor.search``)."""
        measurement, answered = self.measurement(method, concept, queries, config, contrast_queries=contrast_queries)
        started = time.perf_counter()
        vectors, projector, notes, preconditioner = self.store_query(store, measurement, config, factors)
        query = -projector.project(vectors).cpu().numpy()
        scale = 1.0 / store.counts if config.row_loss == "mean" else None
        if like_row is not None:
            # rows like this row: cosine of the preconditioned gradients, <P^-1 g(row), g(other)> / ||g(other)||_P^-1
            # (the measurement is the row's log-likelihood, f = -L(row), so -P^-1 grad f = P^-1 grad L(row) already)
            scale = 1.0 / np.sqrt(np.maximum(self.row_norms(store, projector, preconditioner, list(vectors)), 1e-300))
            notes.append(
                "similarity: <(P + λ)⁻¹ ∇L(row), ∇L(other)> / ‖∇L(other)‖ in the (P + λ)⁻¹ metric"
                + (
                    " (within the store's eigen-directions)"
                    if store.config.kind == "eigen"
                    else " (norm without preconditioning for a random-projection store)"
                )
            )
        positions_found, values = store.top_k(query, top_k, scale=scale, method=search)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - started
        by_index = {int(r.index): r for r in self.rows}
        picked = [by_index[int(store.indices[p])] for p in positions_found]
        meta = {
            "method": method,
            "search": search,
            "top_k": top_k,
            "like_row": like_row,
            "n_queries": len(answered),
            "notes": notes,
            "store": str(store.folder),
            "search_time_s": elapsed,
            "n_rows_searched": len(store),
            "sign": "positive = training on the row raises the measurement"
            if like_row is None
            else "positive = the row's preconditioned gradient points like the given row's",
        }
        if config.allow_missing_provenance:
            meta["allow_missing_provenance"] = True
        return ScoreTable.from_rows(picked, values, method if like_row is None else "rows-like", meta=meta)

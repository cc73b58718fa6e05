"""``Attributor``: the one session object (model, training data, workdir) that notebooks and the CLI share.

```python
from concept_influence import Attributor
att = Attributor("path-or-hub-name", data="train.jsonl", workdir="runs/evil")
concept = att.train_probe("probes/evil.json", layer=12)       # or att.load_concept(path), att.sae_feature(...)
table = att.attribute(concept, queries="queries.jsonl")      # the recommended method (methods.RECOMMENDED_METHOD)
table.top(20)
```

The session loads the model once, reads and tokenises the training rows once, and keeps in ``workdir`` (when
given) what later questions reuse, each checked against fingerprints of the model and data::

    workdir/factors/<fisher>-<dtype>-seed<seed>/   EKFAC factors of every tracked weight (fitted by the first
                                                   gradient question; resumable)
    workdir/answers/                               sampled answers to query prompts (cached per prompt)
    workdir/concepts/<name>-layer<L>/              concepts trained here
    workdir/store/                                 the gradient store (``build_store``)
    workdir/store/activations/                     the activation cache (``build_store``; forward methods and the
                                                   forward half of ``combined-*`` read it)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
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
from concept_influence.attribution.methods import RECOMMENDED_METHOD, cache_needs, get_method, gradient_config
from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts import (
    ConceptSpec,
    ProbeConfig,
    layer_sweep,
    load_concept,
    load_spec,
    save_concept,
    train_concept,
)
from concept_influence.concepts.base import Concept
from concept_influence.concepts.sae import sae_feature_concept
from concept_influence.curvature.config import FactorConfig
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.fit import fit_factors, sample_rows
from concept_influence.curvature.io import data_fingerprint, has_factors, load_factors
from concept_influence.data.atomic import file_sha256, safe_name, write_text_atomic
from concept_influence.data.chat import ChatDataset, ChatRow, read_chat_jsonl, rows_from_records
from concept_influence.data.tokenize import TokenizedDataset, tokenize_chat, untrainable_rows
from concept_influence.evaluate.counterfactual import EvaluationConfig, evaluate_removals
from concept_influence.evaluate.filter import FilterRule, filter_scores
from concept_influence.models import load_adapter
from concept_influence.models.base import ModelAdapter
from concept_influence.report import render_report, token_strings
from concept_influence.store import (
    GradientStore,
    Projector,
    StoreConfig,
    StoreMismatchError,
    build_store,
    factors_fingerprint,
    make_projector,
    projection_fingerprint,
)
from concept_influence.store.caches import CacheSettings, build_caches
from concept_influence.store.fused import FitStoreWriter
from concept_influence.store.store import DEFAULT_KIND, DEFAULT_RANK, IDENTITY_BASIS

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class Attributor:
    """A session over one model and one training set.

    ``model``: a folder or hub name (``from_pretrained``), a ``ModelAdapter``, a ``transformers`` model or a
    ``HookedTransformer`` (pass ``tokenizer=``). ``data``: chat JSONL path or a list of ``ChatRow`` (the training
    rows). ``workdir``: where factors, answers, concepts and the store are kept and reused (``None``: in memory).
    ``device``/``dtype``: for a model loaded here. ``max_length``/``batch_size``: tokenisation (default: the model's context, at most 512; longer than the
    context is an error) and batching;
    ``seed``: every random choice (answer sampling, true-Fisher labels); ``skip_invalid``: skip bad data lines
    (each reported in ``rows.skipped``) and leave out rows whose whole answer is truncated away at ``max_length``
    (marked ``truncated``, score ``None``, counted in the table's meta; without it such a row is an error for
    every method); ``progress``: tqdm bars.
    """

    def __init__(self, model: Any, data: PathLike | Sequence[ChatRow] | None = None, workdir: PathLike | None = None, *,
                 tokenizer: Any = None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 max_length: int | None = None, batch_size: int = 8, seed: int = 0, skip_invalid: bool = False,
                 progress: bool = True) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"--max-length (max_length) must be at least 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model_name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
        self.adapter: ModelAdapter = load_adapter(model, tokenizer=tokenizer, dtype=dtype, device=device)
        self.data_source = str(data) if isinstance(data, (str, os.PathLike)) else None
        self._data = data
        self.workdir = Path(workdir) if workdir is not None else None
        self.max_length = self.adapter.resolve_max_length(max_length)
        self.batch_size = batch_size
        self.seed = seed
        self.skip_invalid = skip_invalid
        self.progress = progress
        self._rows: ChatDataset | None = None
        self._train: TokenizedDataset | None = None
        self._factors: dict[tuple[str, ...], Factors] = {}
        self._stores: dict[str, GradientStore] = {}
        self._data_fingerprint: str | None = None
        self._data_sha256: str | None = None
        self._projectors: dict[str, Projector] = {}
        self._query_tokens: dict[str, TokenizedDataset] = {}  # tokenised query sets by content (build_measurement)

    def __repr__(self) -> str:
        rows = f"{len(self._rows)} rows" if self._rows is not None else (self.data_source or "rows not read yet")
        return f"Attributor(model={self.model_name!r}, data={rows}, workdir={str(self.workdir) if self.workdir else None!r})"

    # ---- data ------------------------------------------------------------------------------------------------------
    @property
    def rows(self) -> ChatDataset:
        """The training rows (read once)."""
        if self._rows is None:
            if self._data is None:
                raise ValueError("this Attributor has no training data: pass data='train.jsonl' (or a list of ChatRow)")
            if isinstance(self._data, (str, os.PathLike)):
                self._rows = read_chat_jsonl(self._data, skip_invalid=self.skip_invalid)
                self._data_sha256 = file_sha256(self._data)  # the bytes these rows were read from
                for line, reason in self._rows.skipped:
                    logger.warning("skipped line %s: %s", line, reason)
            elif isinstance(self._data, ChatDataset):
                self._rows = self._data
            else:
                rows = list(self._data)
                if not all(isinstance(r, ChatRow) for r in rows):
                    raise TypeError("data must be a chat JSONL path or a list of ChatRow")
                self._rows = ChatDataset(rows)
        return self._rows

    def data_provenance(self) -> dict[str, Any]:
        """``{"data": path, "data_sha256": hash of its bytes}`` when the rows come from a file (else ``{}``): what a
        scores table records so that ``filter``, ``report`` and ``evaluate`` refuse to apply it to other data."""
        if self.data_source is None:
            return {}
        if self._data_sha256 is None:
            self._data_sha256 = file_sha256(self.data_source)
        return {"data": self.data_source, "data_sha256": self._data_sha256}

    @property
    def train(self) -> TokenizedDataset:
        """The training rows tokenised with the model's tokenizer at ``max_length`` (once, cached), without the
        rows that have no assistant token left (an error unless ``skip_invalid``; see ``untrainable_rows``)."""
        if self._train is None:
            if self.adapter.tokenizer is None:
                raise ValueError("the model has no tokenizer: pass tokenizer= to Attributor")
            tokenized = tokenize_chat(self.rows, self.adapter.tokenizer, self.max_length)
            skipped = untrainable_rows(tokenized, skip_invalid=self.skip_invalid)
            for p in skipped:
                logger.warning("row %d: no assistant token left within max_length=%d: left out (truncated)",
                               tokenized[p].index, self.max_length)
            self._train = tokenized.without(skipped) if skipped else tokenized
        return self._train

    def queries(self, queries: PathLike | Sequence[Any]) -> list[ChatRow]:
        """Query rows from a JSONL path, ``ChatRow``s, ``{"messages": ...}`` records or plain user prompts (str)."""
        if isinstance(queries, (str, os.PathLike)):
            return list(read_chat_jsonl(queries, need_assistant=False))
        items = list(queries)
        if not items:
            raise ValueError("no queries given")
        if all(isinstance(q, ChatRow) for q in items):
            return items
        if all(isinstance(q, str) for q in items):
            items = [{"messages": [{"role": "user", "content": q}]} for q in items]
        if all(isinstance(q, dict) for q in items):
            return list(rows_from_records(items, source="<queries>", need_assistant=False))
        raise TypeError("queries must be a JSONL path or a list of ChatRow, chat records or prompt strings")

    def model_fingerprint(self) -> str:
        """The adapter's fingerprint (cached by the adapter until its weights change)."""
        return self.adapter.fingerprint()

    def data_fingerprint(self) -> str:
        """Fingerprint of the tokenised training rows (computed once)."""
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.train)
        return self._data_fingerprint

    # ---- workdir ---------------------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> Path | None:
        return self.workdir.joinpath(*parts) if self.workdir is not None else None

    @property
    def answer_cache(self) -> Path | None:
        """Where sampled model answers are cached (``workdir/answers``), or ``None`` without a workdir."""
        return self._path("answers")

    # ---- concepts --------------------------------------------------------------------------------------------------
    def train_probe(self, spec: Any, layer: int | None = None, *, judge: Any = None, save: bool = True,
                    **probe_options: Any) -> Concept:
        """Train a concept direction from a spec (a ``probes/``-format or persona-vectors file, or a ``ConceptSpec``).

        ``layer=None`` sweeps every layer and keeps the best held-out AUC (``concept.metrics["sweep"]``).
        ``probe_options``: fields of ``ProbeConfig`` (``method="diff_of_means"``, ``n_samples``, ``C`` ...);
        ``judge``: optional ``str -> float`` filter of sampled answers. Saved to ``workdir/concepts/<name>-layer<L>``
        when there is a workdir (``concept.extra["path"]``).
        """
        known = {f.name for f in fields(ProbeConfig)}
        unknown = sorted(set(probe_options) - known)
        if unknown:
            raise ValueError(f"train_probe has no option {unknown[0]!r}; ProbeConfig options: {', '.join(sorted(known))}")
        config = ProbeConfig(**{"seed": self.seed, "max_length": self.max_length, **probe_options})
        concept_spec = spec if isinstance(spec, ConceptSpec) else load_spec(spec)
        cache = self.answer_cache
        sweep = None
        if layer is None:
            sweep = layer_sweep(self.adapter, concept_spec, config=config, judge=judge, cache_dir=cache, progress=self.progress)
            layer = sweep.best_layer
        concept = train_concept(self.adapter, concept_spec, layer, config, judge=judge, cache_dir=cache, progress=self.progress)
        if sweep is not None:
            concept.metrics["sweep"] = sweep.rows
            concept.metrics["layer_choice"] = sweep.reason
        folder = self._path("concepts", f"{safe_name(concept_spec.name)}-layer{concept.layer}")
        if save and folder is not None:
            save_concept(concept, folder, model_fingerprint=self.adapter.fingerprint(),
                         extra_meta={"model": self.model_name, "spec": concept_spec.name})
            concept.extra["path"] = str(folder)
        return concept

    def load_concept(self, path: PathLike) -> Concept:
        """Read a saved concept (``train-probe``/``sae-feature`` output), checked against this model."""
        return load_concept(path, self.adapter)

    def sae_feature(self, sae: PathLike, *, feature: int | None = None, spec: Any = None, probe: Any = None,
                    layer: int | None = None, k: int = 5, reduction: str = "mean", save: bool = True,
                    **probe_options: Any) -> Concept:
        """An SAE feature as a concept: ``feature`` by index, or the best of ``k`` candidates for a ``spec`` (Cohen's d
        on its positive vs negative answers) or a ``probe`` (a direction concept or its path: decoder cosine).
        The candidates are in ``concept.extra["selection"]``. Saved to ``workdir/concepts/sae-<j>-layer<L>``."""
        config = ProbeConfig(**{"seed": self.seed, "max_length": self.max_length, **probe_options})
        concept = sae_feature_concept(self.adapter, sae, feature=feature, spec=spec, probe=probe, layer=layer, k=k,
                                      reduction=reduction, config=config, cache_dir=self.answer_cache,
                                      progress=self.progress)
        folder = self._path("concepts", f"sae-{concept.feature}-layer{concept.layer}")  # type: ignore[attr-defined]
        if save and folder is not None:
            save_concept(concept, folder, extra_meta={"model": self.model_name})
            concept.extra["path"] = str(folder)
        return concept

    # ---- curvature -------------------------------------------------------------------------------------------------
    def factors_dir(self, config: FactorConfig) -> Path | None:
        """The workdir folder of an EKFAC fit with ``config``'s Fisher, dtype and seed."""
        return self._path("factors", f"{config.fisher}-{config.dtype}-seed{config.seed}")

    def fit_factors(self, *, fisher: str = "true", preconditioner: str = "ekfac", stats_dtype: str = "float32",
                    weights: Sequence[str] | None = None, up_to_layer: int | None = None, out: PathLike | None = None,
                    overwrite: bool = False, checkpoint_every: int | None = 100, max_memory: int | str | None = None,
                    fit_rows: int | None = None, fit_data: PathLike | Sequence[ChatRow] | None = None,
                    lambda_rows: int | None = None, load: bool = True,
                    gradient_checkpointing: bool = False, row_sink: Any = None) -> Factors | None:
        """Fit curvature factors on the training rows (resumable; a matching fit in ``out`` is loaded instead).

        ``weights`` / ``up_to_layer``: which tracked weights (default all). ``out``: folder (default: the
        workdir's, or in memory without a workdir). ``max_memory`` (``"3GiB"``): fit in module partitions under
        that peak. ``fit_data`` (JSONL path or rows) / ``fit_rows`` (a seeded sample of that many rows): fit on
        other rows than the training set (recorded in the factors; scoring the training set with them is allowed
        and noted). ``lambda_rows``: Λ on a seeded sample of that many rows. ``load=False`` (with ``out``): leave
        the factors on disk and return ``None`` (keeps the peak of a partitioned fit). ``gradient_checkpointing``:
        recompute the blocks' activations in the backward (less memory on long rows; same factors). ``row_sink``:
        a ``RowGradientSink`` fed during the Λ pass (how ``build_store`` writes the store in the fit's pass)."""
        config = FactorConfig(fisher=fisher, preconditioner=preconditioner, dtype=stats_dtype, seed=self.seed,  # type: ignore[arg-type]
                              lambda_rows=lambda_rows, gradient_checkpointing=gradient_checkpointing)
        if weights is None:
            infos = self.adapter.tracked_weights() if up_to_layer is None else self.adapter.weights_up_to(self.adapter.check_layer(up_to_layer))
            weights = [i.name for i in infos]
        data, provenance = self.train, {}
        if fit_data is not None:
            rows = read_chat_jsonl(fit_data, skip_invalid=self.skip_invalid) if isinstance(fit_data, (str, os.PathLike)) else list(fit_data)
            data = tokenize_chat(rows, self.adapter.tokenizer, self.max_length)
            provenance = {"source": str(fit_data) if isinstance(fit_data, (str, os.PathLike)) else "rows given", "rows": len(data)}
        if fit_rows is not None:
            provenance = {"source": provenance.get("source", self.data_source or "training rows"), "sample_of": len(data),
                          "seed": self.seed}
            data = sample_rows(data, fit_rows, self.seed)
            provenance["rows"] = len(data)
        default_folder = preconditioner == "ekfac" and up_to_layer is None and not provenance and lambda_rows is None
        folder = Path(out) if out is not None else (self.factors_dir(config) if default_folder else None)
        factors = fit_factors(self.adapter, data, config, weights=weights, batch_size=self.batch_size, out_dir=folder,
                              overwrite=overwrite, checkpoint_every=checkpoint_every, progress=self.progress,
                              max_memory=max_memory, load_result=load or folder is None, provenance=provenance,
                              row_sink=row_sink)
        if factors is None:
            return None
        self._factors[(fisher, preconditioner, stats_dtype, *weights)] = factors
        return factors

    def session_factors(self, config: GradientAttributionConfig, needed: Sequence[str] | None = None, *,
                        fit: bool = True, row_sink: Any = None) -> tuple[Factors | None, list[str]]:
        """EKFAC factors for ``config``'s Fisher/dtype/seed: a fit already in memory that covers ``needed`` (default:
        every tracked weight; e.g. one ``fit_factors(up_to_layer=L)`` made), else the workdir's fit of every
        tracked weight, loaded or fitted now (and saved to the workdir; ``row_sink`` is fed during that fit's Λ
        pass). Returns the factors and a note saying which; ``fit=False``: ``(None, [])`` instead of fitting."""
        fc = FactorConfig(fisher=config.fisher, preconditioner="ekfac", dtype=config.factor_dtype, seed=config.seed)  # type: ignore[arg-type]
        names = [i.name for i in self.adapter.tracked_weights()]
        key = (fc.fisher, "ekfac", fc.dtype, *names)
        if key in self._factors:
            return self._factors[key], ["factors reused from this session"]
        wanted = set(names if needed is None else needed)
        for (fisher, kind, dtype, *covered), fitted in self._factors.items():
            if (fisher, kind, dtype) == key[:3] and wanted <= set(covered) and fitted.config.seed == fc.seed:
                return fitted, [f"factors of {len(covered)} weights reused from this session"]
        if not fit and not (self.factors_dir(fc) is not None and has_factors(self.factors_dir(fc))):
            return None, []
        folder = self.factors_dir(fc)
        existed = folder is not None and has_factors(folder)
        factors = self.fit_factors(fisher=fc.fisher, stats_dtype=fc.dtype, weights=names, out=folder, row_sink=row_sink)
        note = f"factors loaded from {folder}" if existed else (
            f"factors fitted on {len(self.train)} rows" + (f" and saved to {folder}" if folder else ""))
        return factors, [note]

    # ---- attribution -----------------------------------------------------------------------------------------------
    def attribute(self, concept: Concept | PathLike | None = None, queries: PathLike | Sequence[Any] | None = None,
                  method: str | None = None, *, store: Any = None, **options: Any) -> ScoreTable:
        """Score every training row; higher = training on the row pushes the concept (measurement) up.

        ``method``: a name in ``attribution.methods.METHODS`` (``None``: ``RECOMMENDED_METHOD``); ``concept``: a
        ``Concept`` or a saved concept's path; ``queries``: see ``queries()``. ``store`` (gradient methods):
        ``None`` uses the workdir's store when one matches, ``False`` forces the exact pass, a path uses that store.
        ``options``: the method's own (see ``get_method(name).options``); unknown ones are a ``ValueError``.
        Returns a ``ScoreTable`` in data order whose ``meta["method"]`` names what ran.
        """
        spec = get_method(method)
        spec.check_options(options)
        if spec.needs_concept and concept is None:
            raise ValueError(f"method {spec.name!r} needs a concept")
        if spec.needs_queries and queries is None:
            raise ValueError(f"method {spec.name!r} needs queries")
        if isinstance(concept, (str, os.PathLike)):
            concept = self.load_concept(concept)
        query_rows = self.queries(queries) if queries is not None else None
        if "store" in spec.options:  # gradient methods read the gradient store, forward ones the activation cache
            options["store"] = store
        elif store not in (None, False):
            raise ValueError(f"method {spec.name!r} reads no caches: store= does not apply to it")
        if "contrast_queries" in options and options["contrast_queries"] is not None:
            options["contrast_queries"] = self.queries(options["contrast_queries"])
        started = time.perf_counter()
        table = spec.fn(self, concept, query_rows, **options)
        table.meta.setdefault("wall_time_s", time.perf_counter() - started)
        table.method = spec.name
        table.meta.update({"method": spec.name, "method_kind": spec.kind,
                           "recommended_method": RECOMMENDED_METHOD, "method_was_default": method is None,
                           **self.data_provenance()})
        return table.attach(tokenizer=self.adapter.tokenizer)  # Jupyter shows token highlights

    def gradient_attribution(self, method: str, concept: Concept | None, queries: Sequence[ChatRow],
                             config: GradientAttributionConfig, *, contrast_queries: Sequence[ChatRow] | None = None,
                             factors: Factors | PathLike | None = None, store: Any = None) -> ScoreTable:
        """The gradient methods' engine: answer the queries (cached), get factors (``factors`` if given, else the
        session's), then score every row from the gradient store (``store``: see ``attribute``) or by the exact
        pass over the training rows."""
        started = time.perf_counter()
        measurement, answered = build_measurement(self.adapter, concept, queries, method, config,
                                                  contrast_queries=contrast_queries, token_cache=self._query_tokens)
        meta = {"n_queries": len(answered), "config": asdict(config)}
        opened, store_notes = self._resolve_store(store)
        if opened is not None and opened.manifest.get("basis") and config.preconditioner != "identity":
            if store not in (None, False):
                raise ValueError(f"{opened.folder} is an identity store (sample eigenbases, no EKFAC factors): it serves "
                                 "identity-preconditioned questions; build an EKFAC store (build-store --rank K)")
            store_notes.append(f"the workdir's store serves identity-preconditioned questions only "
                               f"(preconditioner {config.preconditioner!r}): exact pass")
            opened = None
        exact_only = (config.token_breakdown != "none" or config.self_influence or config.token_aggregation != "sum"
                      or config.normalization != "none")
        if opened is not None and exact_only:
            if store not in (None, False):
                raise ValueError("a gradient store gives scores and per-weight scores only: the token breakdown, "
                                 "self-influence, token aggregation and row normalisation need the exact pass (store=False)")
            store_notes.append("token breakdown / self-influence / token aggregation / normalisation asked: exact pass "
                               "instead of the store")
            opened = None
        if opened is not None:
            result, notes = self._store_scores(opened, measurement, config, factors)
            result.timings["total"] = time.perf_counter() - started
            return result_table(self.rows, result, method, notes=store_notes + notes,
                                meta={**meta, "scored_from": "store", "store": str(opened.folder)})
        loaded, notes = self._factors_for(measurement, config, factors)
        result = compute_influence(self.adapter, self.train, measurement, loaded, config.influence_config(),
                                   progress=self.progress)
        return result_table(self.rows, result, method, notes=store_notes + notes, meta={**meta, "scored_from": "exact",
                                                                                        "factors_fit": factors_record(loaded, self.train)})

    def _factors_for(self, measurement: Any, config: GradientAttributionConfig,
                     factors: Factors | PathLike | None) -> tuple[Factors | None, list[str]]:
        if factors is not None or (self.workdir is None and not self._factors):
            # explicit factors, or no workdir to keep a full fit in: fit (or load) only the weights reached
            return obtain_factors(self.adapter, self.train, factors, config, measurement.weights(self.adapter),
                                  progress=self.progress)
        if config.preconditioner == "identity":
            return None, []
        return self.session_factors(config, measurement.weights(self.adapter))

    # ---- the gradient store ----------------------------------------------------------------------------------------
    @property
    def store_dir(self) -> Path | None:
        """The workdir's store folder (``workdir/store``), or ``None`` without a workdir."""
        return self._path("store")

    def build_store(self, out: PathLike | None = None, *, rank: int | None = None, projection_dim: int | None = None,
                    dtype: str = "float32", up_to_layer: int | None = None, factors: Factors | PathLike | None = None,
                    fisher: str = "true", factor_dtype: str = "float32", shard_rows: int = 1024,
                    shards: Sequence[int] | None = None, overwrite: bool = False,
                    caches: CacheSettings | None = None) -> GradientStore | None:
        """Project every training row's gradient once and write the store (default ``workdir/store``); later
        gradient questions read it instead of passing over the rows. ``rank``: EKFAC-eigenbasis store keeping
        ``rank`` directions per side of each weight; ``projection_dim``: LoGra-style random projection of that size
        per side; neither: ``store.DEFAULT_KIND`` at ``store.DEFAULT_RANK``. ``up_to_layer``: only blocks ``0..L``.
        ``factors``: fitted factors (``Factors`` or folder; default the session's). When there are none yet they
        are fitted now (the store's weights; into the folder when one is named) and the store is written during
        the fit's Λ pass, which then runs one forward per batch for both (see ``store.fused``). An interrupted
        build resumes; ``shards``: build only these shards (to split the work). Returns the store, or ``None``
        while shards are missing (or when the questions need no gradient store).

        ``caches`` (``store.caches.CacheSettings``): build what the session's questions read (default when neither
        ``rank`` nor ``projection_dim`` is given: the recommended method's caches), in one pass over the rows: the
        activation cache (``<folder>/activations``) for forward methods and the forward half of ``combined-*``,
        the identity store (``identity_rank``: an eigen store in the KFAC eigenbases of a seeded sample of rows, no
        EKFAC fit; ``store.caches``) for identity-preconditioned questions, the eigen store for EKFAC ones. With
        ``rank``/``projection_dim`` and no ``caches``: the gradient store alone, as before."""
        if rank is not None and projection_dim is not None:
            raise ValueError("give --rank (eigenbasis store) or --projection-dim (LoGra store), not both")
        explicit = rank is not None or projection_dim is not None
        need = (cache_needs(caches.methods if caches is not None and caches.methods else [RECOMMENDED_METHOD])
                if caches is not None or not explicit else {"activations": False, "gradients": "given"})
        kind = "eigen" if rank is not None else "logra" if projection_dim is not None else DEFAULT_KIND
        if not explicit and need["gradients"] == "identity":
            rank = (caches or CacheSettings()).identity_rank
        config = StoreConfig(kind=kind, rank=rank or projection_dim or DEFAULT_RANK, dtype=dtype,  # type: ignore[arg-type]
                             seed=self.seed, shard_rows=shard_rows)
        if need["activations"] or (need["gradients"] == "identity" and not explicit):
            return self._build_caches(out, config, need, caches or CacheSettings(), up_to_layer=up_to_layer,
                                      factors=factors, fisher=fisher, factor_dtype=factor_dtype, shards=shards,
                                      overwrite=overwrite)
        folder = Path(out) if out is not None else self.store_dir
        if folder is None:
            raise ValueError("build_store needs out= (or a workdir)")
        infos = self.adapter.tracked_weights() if up_to_layer is None else self.adapter.weights_up_to(self.adapter.check_layer(up_to_layer))
        names = [i.name for i in infos]
        grad_config = GradientAttributionConfig(fisher=fisher, factor_dtype=factor_dtype, batch_size=self.batch_size,
                                                max_length=self.max_length, seed=self.seed)
        base = {"model": self.model_fingerprint(), "data": self.data_fingerprint()}
        extra = {"model": self.model_name, "data": self.data_source, "max_length": self.max_length}
        loaded: Factors | None = None
        writer: FitStoreWriter | None = None
        if isinstance(factors, Factors):
            loaded = factors
        elif factors is not None and has_factors(factors):
            loaded, _ = obtain_factors(self.adapter, self.train, factors, grad_config, names, progress=self.progress)
        elif factors is None:
            loaded, _ = self.session_factors(grad_config, names, fit=False)
        if loaded is None and shards is None:
            # no factors yet: fit them and write the store in the same pass (the fit's Λ pass runs one forward per
            # batch for its own backward and for the data-label backward the store needs)
            writer = FitStoreWriter(self.adapter, self.train, folder, config, names, base, overwrite=overwrite, extra=extra)
            if factors is not None:
                fc = FactorConfig(fisher=fisher, preconditioner="ekfac", dtype=factor_dtype, seed=self.seed)  # type: ignore[arg-type]
                loaded = fit_factors(self.adapter, self.train, fc, weights=names, batch_size=self.batch_size, out_dir=factors,
                                     progress=self.progress, row_sink=writer)
            elif len(names) == len(self.adapter.tracked_weights()):
                loaded, _ = self.session_factors(grad_config, names, row_sink=writer)
            else:  # the store's blocks only, as fit_factors(up_to_layer=L) (kept in the session, not in the workdir)
                loaded = self.fit_factors(fisher=fisher, stats_dtype=factor_dtype, up_to_layer=up_to_layer, row_sink=writer)
            if writer.manifest is not None:
                overwrite = False
                if writer.written:
                    logger.info("store %s: %d shards written in the factor fit's pass", folder, len(writer.written))
        elif loaded is None and factors is not None:  # some shards only: fit into the named folder first
            loaded, _ = obtain_factors(self.adapter, self.train, factors, grad_config, names, progress=self.progress)
        elif loaded is None:
            loaded, _ = self.session_factors(grad_config, names)
        assert isinstance(loaded, Factors)
        projector = make_projector(config, self.adapter, names, loaded)
        fingerprints = {**base, "factors": factors_fingerprint(loaded) if kind == "eigen" else None,
                        "projection": projection_fingerprint(projector)}
        if writer is not None and writer.written and writer.fingerprints != fingerprints:
            logger.warning("store %s: the shards written in the fit's pass do not match the finished factors; rebuilding", folder)
            overwrite = True
        store = build_store(self.adapter, self.train, folder, projector, config, fingerprints, batch_size=self.batch_size,
                            shards=shards, overwrite=overwrite, progress=self.progress, extra=extra)
        if store is not None:
            self._stores[str(folder)] = store
            self._projectors[str(folder)] = projector  # the questions reuse it (same fingerprint)
        return store

    def _build_caches(self, out: PathLike | None, config: StoreConfig, need: dict[str, Any], settings: CacheSettings, *,
                      up_to_layer: int | None, factors: Any, fisher: str, factor_dtype: str,
                      shards: Sequence[int] | None, overwrite: bool) -> GradientStore | None:
        """``build_store`` for a session's questions (``store.caches``): the activation cache and the gradient store
        they need, in one pass (an eigen store is first fitted, as ``build_store`` does)."""
        folder = Path(out) if out is not None else self.store_dir
        if folder is None:
            raise ValueError("build_store needs out= (or a workdir)")
        infos = self.adapter.tracked_weights() if up_to_layer is None else self.adapter.weights_up_to(self.adapter.check_layer(up_to_layer))
        names = [i.name for i in infos]
        base = {"model": self.model_fingerprint(), "data": self.data_fingerprint()}
        extra = {"model": self.model_name, "data": self.data_source, "max_length": self.max_length}
        projector, fingerprints = None, dict(base)
        if need["gradients"] == "identity" and config.kind == "eigen":
            # the identity store: the KFAC eigenbases of a seeded sample of rows (no EKFAC fit), kept with the store
            before = dict(self._factors)
            sample = self.fit_factors(fisher="empirical", preconditioner="kfac", weights=names, out=folder / IDENTITY_BASIS,
                                      fit_rows=min(settings.identity_sample_rows, len(self.train)), overwrite=overwrite)
            self._factors = before  # the sample's eigenbases serve this store only, not the session's questions
            assert sample is not None
            projector = make_projector(config, self.adapter, names, sample)
            fingerprints.update(factors=factors_fingerprint(sample), projection=projection_fingerprint(projector))
            extra["basis"] = IDENTITY_BASIS
        elif need["gradients"] == "eigen" and config.kind == "eigen":
            grad_config = GradientAttributionConfig(fisher=fisher, factor_dtype=factor_dtype, batch_size=self.batch_size,
                                                    max_length=self.max_length, seed=self.seed)
            loaded = (factors if isinstance(factors, Factors) else
                      obtain_factors(self.adapter, self.train, factors, grad_config, names, progress=self.progress)[0]
                      if factors is not None else self.session_factors(grad_config, names)[0])
            assert isinstance(loaded, Factors)
            projector = make_projector(config, self.adapter, names, loaded)
            fingerprints.update(factors=factors_fingerprint(loaded), projection=projection_fingerprint(projector))
        elif need["gradients"] is not None:  # a LoGra store needs no factors
            projector = make_projector(config, self.adapter, names, None)
            fingerprints.update(factors=None, projection=projection_fingerprint(projector))
        activations = settings.activations(config.shard_rows) if need["activations"] else None
        store, cache = build_caches(self.adapter, self.train, self._train_chats(), folder, projector=projector,
                                    config=config, fingerprints=fingerprints, activations=activations,
                                    batch_size=self.batch_size, overwrite=overwrite, progress=self.progress, extra=extra,
                                    shards=shards)
        if store is not None and projector is not None:
            self._stores[str(folder)] = store
            self._projectors[str(folder)] = projector
        if cache is not None:
            self.__dict__.setdefault("_activation_caches", {})[str(cache.folder)] = cache
        return store

    def _train_chats(self) -> list[ChatRow]:
        """The training rows that ``train`` holds, as ``ChatRow`` (same order)."""
        by_index = {int(r.index): r for r in self.rows}
        return [by_index[int(r.index)] for r in self.train]

    def open_store(self, path: PathLike | GradientStore) -> GradientStore:
        """Open a store and check it against this model and data (a mismatch is a ``StoreMismatchError``)."""
        store = path if isinstance(path, GradientStore) else self._stores.get(str(path)) or GradientStore.open(path)
        store.check(model=self.model_fingerprint(), data=self.data_fingerprint())
        self._stores[str(store.folder)] = store
        return store

    def _resolve_store(self, store: Any) -> tuple[GradientStore | None, list[str]]:
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

    def _store_query(self, store: GradientStore, measurement: Any, config: GradientAttributionConfig,
                     factors: Factors | PathLike | None) -> tuple[dict[str, torch.Tensor], Projector, list[str], Any]:
        """The measurement's preconditioned gradient ``(P + λ)⁻¹ ∇f`` per store weight, the store's projector, notes
        and the preconditioner."""
        notes: list[str] = []
        loaded: Factors | None
        basis: Factors | None = None  # what the store's projector is rebuilt from (an eigen store: its factors)
        if config.preconditioner == "identity":
            loaded = None  # plain inner products of the stored (rotated) gradients; exact when the store is full
            if store.config.kind == "eigen" and store.manifest.get("basis"):  # an identity store: its own eigenbases
                basis = self._store_basis(store)
            elif store.config.kind == "eigen":
                basis = (obtain_factors(self.adapter, self.train, factors,  # type: ignore[assignment]
                                        replace(config, preconditioner="ekfac", max_memory=None),
                                        store.names, progress=self.progress)[0] if factors is not None
                         else self.session_factors(config, store.names)[0])
        else:
            if factors is not None:
                # a store question holds only the store's weights' factors: no memory-bounded (folder) scoring
                loaded, notes = obtain_factors(self.adapter, self.train, factors, replace(config, max_memory=None),  # type: ignore[assignment]
                                               store.names, progress=self.progress)
            else:
                loaded, notes = self.session_factors(config, store.names)
            basis = loaded
        key = str(store.folder)
        if key not in self._projectors:
            self._projectors[key] = store.projector(self.adapter, basis)
        projector = self._projectors[key]
        names, more = resolve_weights(self.adapter, measurement, store.names, allow_subset=config.allow_subset,
                                      what=f"the gradient store {store.folder}")
        if loaded is not None:  # the factors must cover what the store and the measurement share (or allow_subset)
            check_factors_model(self.adapter, loaded)
            covered = set(loaded.names)
            names, extra = resolve_weights(self.adapter, measurement, [n for n in names if n in covered],
                                           allow_subset=config.allow_subset)
            more += [note for note in extra if note not in more]
        preconditioner = build_preconditioner(self.adapter, names, loaded, config.influence_config())
        grad_f = measurement.gradient(self.adapter, names, batch_size=config.batch_size)
        vectors = preconditioned_gradient(preconditioner, grad_f, measurement.description)
        return vectors, projector, notes + more, preconditioner

    def _store_basis(self, store: GradientStore) -> Factors:
        """The sample eigenbases an identity store was written in (``<store>/basis``), loaded once."""
        key = f"{store.folder}/basis"
        cache = self.__dict__.setdefault("_store_bases", {})
        if key not in cache:
            cache[key] = load_factors(store.folder / str(store.manifest["basis"]), weights=store.names)
        return cache[key]

    def _store_scores(self, store: GradientStore, measurement: Any, config: GradientAttributionConfig,
                      factors: Factors | PathLike | None) -> tuple[InfluenceResult, list[str]]:
        t0 = time.perf_counter()
        vectors, projector, notes, preconditioner = self._store_query(store, measurement, config, factors)
        t1 = time.perf_counter()
        names = list(vectors)
        if config.per_weight:
            queries = np.stack([projector.project({n: vectors[n]}).cpu().numpy() for n in names])
            per = -store.dot(queries)
            scores = per.sum(axis=1)
        else:
            per = None
            scores = -store.dot(projector.project(vectors).cpu().numpy()[None])[:, 0]
        if config.row_loss == "mean":
            scores = scores / store.counts
            per = None if per is None else per / store.counts[:, None]
        t2 = time.perf_counter()
        notes = notes + [f"scored from the gradient store {store.folder} ({store.config.kind}, rank {store.config.rank}, "
                         f"{store.config.dtype}): no pass over the training rows"]
        result = InfluenceResult(
            scores=torch.from_numpy(np.ascontiguousarray(scores)), indices=[int(i) for i in store.indices], weights=names,
            measurement=measurement.description, preconditioner=preconditioner.kind, damping=dict(preconditioner.damping),
            per_weight=None if per is None else {n: torch.from_numpy(per[:, j].copy()) for j, n in enumerate(names)},
            notes=notes, timings={"measurement_gradient": t1 - t0, "store_scoring": t2 - t1}, row_loss=config.row_loss)
        return result, []

    def attribute_many(self, questions: Sequence[dict[str, Any]], method: str | None = None, *, store: Any = None,
                       **options: Any) -> list[ScoreTable]:
        """Several questions of one gradient method at once: ``questions`` are dicts with ``concept``, ``queries``
        (and optionally ``contrast_queries``). From a store, every question's projected gradient goes into one
        blocked product over the store; without one, one exact pass scores them all (``compute_influence_many``).
        Same scores as asking ``attribute`` one question at a time. Forward methods are asked one by one."""
        spec = get_method(method)
        if spec.kind != "gradient" or spec.name not in ("concept-influence", "influence"):
            # forward methods and combinations: one question at a time
            return [self.attribute(q.get("concept"), q.get("queries"), spec.name, store=store, **options) for q in questions]
        spec.check_options(options)
        factors = options.pop("factors", None)
        config = gradient_config(self, **options)
        if config.token_breakdown != "none" or config.per_weight or config.self_influence:
            raise ValueError("attribute_many gives scores only: ask breakdowns one question at a time (attribute)")
        measurements = []
        for q in questions:
            concept = q.get("concept")
            if isinstance(concept, (str, os.PathLike)):
                concept = self.load_concept(concept)
            if q.get("queries") is None:
                raise ValueError(f"method {spec.name!r} needs queries in every question")
            contrast = q.get("contrast_queries")
            measurements.append(build_measurement(self.adapter, concept, self.queries(q["queries"]), spec.name, config,
                                                  contrast_queries=self.queries(contrast) if contrast is not None else None,
                                                  token_cache=self._query_tokens))
        opened, notes = self._resolve_store(store)
        started = time.perf_counter()
        if opened is not None:
            prepared = [self._store_query(opened, m, config, factors) for m, _ in measurements]
            stacked = np.stack([p[1].project(p[0]).cpu().numpy() for p in prepared])
            scores = -opened.dot(stacked)
            if config.row_loss == "mean":
                scores = scores / opened.counts[:, None]
            results = [InfluenceResult(scores=torch.from_numpy(scores[:, k].copy()), indices=[int(i) for i in opened.indices],
                                       weights=list(p[0]), measurement=m.description, preconditioner=p[3].kind,
                                       damping=dict(p[3].damping), notes=p[2], row_loss=config.row_loss)
                       for k, (p, (m, _)) in enumerate(zip(prepared, measurements, strict=True))]
            scored_from = "store"
            notes = notes + [f"scored from the gradient store {opened.folder}, {len(questions)} questions in one product"]
        else:
            loaded, more = self._factors_for(measurements[0][0], config, factors)
            jobs = {str(k): (m, config.influence_config()) for k, (m, _) in enumerate(measurements)}
            many = compute_influence_many(self.adapter, self.train, jobs, loaded, batch_size=config.batch_size,
                                          progress=self.progress)
            results = [many[str(k)] for k in range(len(questions))]
            scored_from, notes = "exact", notes + more
        elapsed = time.perf_counter() - started
        tables = []
        for result, (_, answered) in zip(results, measurements, strict=True):
            table = result_table(self.rows, result, spec.name, notes=notes,
                                 meta={"n_queries": len(answered), "config": asdict(config), "scored_from": scored_from,
                                       "wall_time_s": elapsed, "n_questions_together": len(questions)})
            table.meta.update({"method": spec.name, "method_kind": spec.kind, "recommended_method": RECOMMENDED_METHOD,
                               "method_was_default": method is None, **self.data_provenance()})
            tables.append(table)
        return tables

    def _row_norms(self, store: GradientStore, projector: Projector, preconditioner: Any, names: Sequence[str]) -> np.ndarray:
        """``[N]``: each stored row's squared norm ``Σ_j x_j² w_j`` over the columns of ``names``, with ``w`` the
        projected ``(P + λ)⁻¹`` where it is diagonal (eigen stores) and 1 otherwise. Cached per store and weights."""
        key = (str(store.folder), preconditioner.kind, tuple(names), tuple(sorted(preconditioner.damping.items())))
        cache = self.__dict__.setdefault("_norm_cache", {})
        if key not in cache:
            weights = np.zeros(store.dim)
            values = getattr(preconditioner, "values", {})
            for name in names:
                start, end = projector.offsets[name]
                diagonal = None
                if name in values:
                    diagonal = projector.inverse_curvature_diagonal(name, values[name], preconditioner.damping[name])
                weights[start:end] = 1.0 if diagonal is None else diagonal.cpu().numpy()
            used = np.flatnonzero(weights)
            columns = slice(int(used[0]), int(used[-1]) + 1)
            w = weights[columns]
            norms = np.empty(len(store))
            for start, block in store.blocks(columns):
                norms[start:start + block.shape[0]] = (block.astype(np.float64) ** 2) @ w
            cache[key] = norms
        return cache[key]

    def search(self, concept: Concept | PathLike | None = None, queries: PathLike | Sequence[Any] | None = None, *,
               top_k: int = 20, like_row: int | None = None, store: Any = None, method: str | None = None,
               search: str = "auto", **options: Any) -> ScoreTable:
        """The ``top_k`` highest-scoring rows for a question, read from the gradient store (default: the
        workdir's), best first. ``like_row``: rows like the row with this original index instead (its own
        preconditioned gradient as the query: ``⟨(P + λ)⁻¹ ∇L(row), ∇L(other)⟩``). ``method``: a gradient method
        (default ``concept-influence`` with a concept, ``influence`` without); ``search``: ``"auto"``, ``"exact"``
        (blocked products) or ``"faiss"`` (inner-product index). ``options``: the method's options."""
        opened, _ = self._resolve_store(store if store is not None else None)
        if opened is None:
            raise ValueError("search needs a gradient store: build one (build-store / Attributor.build_store) or pass store=")
        if like_row is not None:
            positions = {int(r.index): k for k, r in enumerate(self.rows)}
            if int(like_row) not in positions:
                raise ValueError(f"like_row={like_row}: no training row has this index")
            queries, method, concept = [self.rows[positions[int(like_row)]]], "influence", None
        name = method or ("concept-influence" if concept is not None else "influence")
        spec = get_method(name)
        if spec.kind != "gradient":
            raise ValueError(f"search reads gradient stores: method {name!r} is not a gradient method")
        spec.check_options(options)
        if queries is None:
            raise ValueError("search needs queries (or like_row=)")
        if isinstance(concept, (str, os.PathLike)):
            concept = self.load_concept(concept)
        factors = options.pop("factors", None)
        contrast = options.pop("contrast_queries", None)
        config = gradient_config(self, **options)
        measurement, answered = build_measurement(self.adapter, concept, self.queries(queries), name, config,
                                                  contrast_queries=self.queries(contrast) if contrast is not None else None,
                                                  token_cache=self._query_tokens)
        started = time.perf_counter()
        vectors, projector, notes, preconditioner = self._store_query(opened, measurement, config, factors)
        query = -projector.project(vectors).cpu().numpy()
        scale = 1.0 / opened.counts if config.row_loss == "mean" else None
        if like_row is not None:
            # rows like this row: cosine of the preconditioned gradients, <P^-1 g(row), g(other)> / ||g(other)||_P^-1
            # (the measurement is the row's log-likelihood, f = -L(row), so -P^-1 grad f = P^-1 grad L(row) already)
            scale = 1.0 / np.sqrt(np.maximum(self._row_norms(opened, projector, preconditioner, list(vectors)), 1e-300))
            notes.append("similarity: <(P + λ)⁻¹ ∇L(row), ∇L(other)> / ‖∇L(other)‖ in the (P + λ)⁻¹ metric"
                         + (" (within the store's eigen-directions)" if opened.config.kind == "eigen" else
                            " (norm without preconditioning for a random-projection store)"))
        positions_found, values = opened.top_k(query, top_k, scale=scale, method=search)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - started
        rows = self.rows
        by_index = {int(r.index): r for r in rows}
        picked = [by_index[int(opened.indices[p])] for p in positions_found]
        meta = {"method": name, "search": search, "top_k": top_k, "like_row": like_row, "n_queries": len(answered),
                "notes": notes, "store": str(opened.folder), "search_time_s": elapsed, "n_rows_searched": len(opened),
                "sign": "positive = training on the row raises the measurement" if like_row is None else
                        "positive = the row's preconditioned gradient points like the given row's"}
        table = ScoreTable.from_rows(picked, values, name if like_row is None else "rows-like", meta=meta)
        return table

    # ---- closing the loop: filter, evaluate, report ---------------------------------------------------------------
    def filter(self, table: ScoreTable, **rule: Any):
        """Which rows ``FilterRule(**rule)`` removes from this session's rows (``remove_top=0.1``, ``remove_top_k``,
        ``threshold``, ``by``, ``aggregate``): a ``FilterResult`` with ``kept``/``removed`` row indices. To write
        a filtered file use ``evaluate.filter_file`` or ``concept-influence filter``."""
        return filter_scores(self.rows, table, FilterRule(**rule))

    def evaluate(self, tables: ScoreTable | dict[str, ScoreTable] | Sequence[ScoreTable], concept: Concept | PathLike,
                 queries: PathLike | Sequence[Any], *, base: Any, out: PathLike, config: Any = None, judge: Any = None,
                 oracle: Sequence[int] | None = None, reader: Any = "session") -> dict[str, Any]:
        """Counterfactual retraining (``evaluate.evaluate_removals``): fine-tune ``base`` (the model before
        fine-tuning: path, hub name or adapter) on this session's rows minus each table's top/bottom/random rows,
        and measure ``concept`` on each model's answers to ``queries``. ``reader``: the model that reads the concept
        (default: this session's model, on which the concept was made; ``None``: ``base``). Writes
        ``out/evaluation.json`` and ``out/removal_curve.png``; returns the evaluation dict."""
        if isinstance(tables, ScoreTable):
            tables = {tables.method: tables}
        elif not isinstance(tables, dict):
            tables = {t.method: t for t in tables}
        if isinstance(concept, (str, os.PathLike)):
            concept = self.load_concept(concept)
        base_adapter = base if isinstance(base, ModelAdapter) else load_adapter(base, device=self.adapter.device)
        reader_adapter = self.adapter if reader == "session" else (None if reader is None else load_adapter(reader))
        judge_name = getattr(judge, "__qualname__", None) if judge is not None else None
        return evaluate_removals(base_adapter, list(self.rows), tables, concept, self.queries(queries),
                                 config or EvaluationConfig(), out, reader=reader_adapter, judge=judge,
                                 judge_name=judge_name, oracle=oracle, progress=self.progress)

    def report(self, tables: ScoreTable | dict[str, ScoreTable] | Sequence[ScoreTable], out: PathLike | None = None, *,
               evaluation: dict[str, Any] | PathLike | None = None, top: int = 50, title: str = "concept_influence report",
               label_field: str | None = None, positive: str | None = None, labels: bool = True) -> str:
        """The self-contained HTML report (``report.render_report``) of ``tables`` over this session's rows, with
        token highlights from the session's tokenizer; written to ``out`` when given. Returns the HTML.
        ``label_field`` / ``positive`` / ``labels``: the rows whose precision-recall opens the page (default:
        ``data_origin = planted`` when the rows have it)."""
        if isinstance(tables, ScoreTable):
            tables = {tables.method: tables}
        elif not isinstance(tables, dict):
            tables = {t.method: t for t in tables}
        if isinstance(evaluation, (str, os.PathLike)):
            path = Path(evaluation)
            evaluation = json.loads((path / "evaluation.json" if path.is_dir() else path).read_text(encoding="utf-8"))
        tokens = None
        if any("token_scores" in t.columns for t in tables.values()) and self.adapter.tokenizer is not None:
            shown = {int(t.index[i]) for t in tables.values() for i in t.order()[:top]}
            tokens = token_strings([r for r in self.rows if r.index in shown], self.adapter.tokenizer, self.max_length)
        html = render_report(tables, list(self.rows), evaluation=evaluation, tokens=tokens, top=top, title=title,
                             extra_meta={"model": self.model_name, "data": self.data_source}, label_field=label_field,
                             positive=positive, labels=labels)
        if out is not None:
            write_text_atomic(out, html)
        return html

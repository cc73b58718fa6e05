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

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from concept_influence.attribution.engine import GradientEngine
from concept_influence.attribution.gradient import (
    GradientAttributionConfig,
    obtain_factors,
)
from concept_influence.attribution.methods import RECOMMENDED_METHOD, cache_needs, get_method, gradient_config
from concept_influence.attribution.scores import ScoreTable
from concept_influence.attribution.scoring import check_factors_model
from concept_influence.concepts import (
    ConceptSpec,
    ProbeConfig,
    concept_reading,
    layer_sweep,
    load_concept,
    load_spec,
    save_concept,
    train_concept,
)
from concept_influence.concepts.base import Concept
from concept_influence.concepts.io import concept_summary
from concept_influence.concepts.sae import sae_feature_concept
from concept_influence.curvature.config import FactorConfig
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.fit import fit_factors, sample_rows
from concept_influence.curvature.io import data_fingerprint, has_factors
from concept_influence.data.chat import ChatDataset, ChatRow, read_chat_jsonl, rows_from_records
from concept_influence.data.tokenize import TokenizedDataset, tokenize_chat, untrainable_rows
from concept_influence.distributed.runtime import ensure_process_group, shard_device
from concept_influence.evaluate.filter import FilterRule, filter_scores
from concept_influence.evaluate.run import evaluate_tables
from concept_influence.files import file_sha256, safe_name
from concept_influence.models import load_adapter
from concept_influence.models.base import ModelAdapter
from concept_influence.report.tables import report_tables
from concept_influence.settings import check_known, rename_deprecated
from concept_influence.sharding import ShardSettings
from concept_influence.store import (
    GradientStore,
    StoreConfig,
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
    ``device``/``dtype``: for a model loaded here. ``max_length``/``batch_size``: tokenisation (default: the model's
    context, at most 512; longer than the context is an error) and batching;
    ``shard``: ``"fsdp"`` shards the model with PyTorch FSDP2 over the torchrun processes (every stage then runs
    in step on every rank; factors are owned by ranks; see ``concept_influence.distributed``);
    ``seed``: every random choice (answer sampling, true-Fisher labels); ``skip_invalid``: skip bad data lines
    (each reported in ``rows.skipped``) and leave out rows whose whole answer is truncated away at ``max_length``
    (marked ``truncated``, score ``None``, counted in the table's meta; without it such a row is an error for
    every method); ``progress``: tqdm bars.
    """

    def __init__(
        self,
        model: Any,
        data: PathLike | Sequence[ChatRow] | None = None,
        workdir: PathLike | None = None,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
        skip_invalid: bool = False,
        progress: bool = True,
        shard: str = "none",
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"--max-length (max_length) must be at least 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model_name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
        ShardSettings(shard=shard)  # checks the value
        if shard == "fsdp":
            ensure_process_group()
            device = device if device is not None else shard_device()
        self.adapter: ModelAdapter = load_adapter(model, tokenizer=tokenizer, dtype=dtype, device=device)
        self.adapter.shard(shard)
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
        self._data_fingerprint: str | None = None
        self._data_sha256: str | None = None
        self.engine = GradientEngine(
            self.adapter,
            rows=lambda: self.rows,
            train=lambda: self.train,
            data_fingerprint=self.data_fingerprint,
            workdir=self.workdir,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        """The gradient methods' engine (``attribution.engine``): it keeps the factors, stores and tokenised
        queries this session's questions reuse."""

    # the engine's caches, under the names the session's code used
    _factors = property(lambda self: self.engine.factors)
    _stores = property(lambda self: self.engine.stores)
    _projectors = property(lambda self: self.engine.projectors)
    _query_tokens = property(lambda self: self.engine.query_tokens)

    def __repr__(self) -> str:
        rows = f"{len(self._rows)} rows" if self._rows is not None else (self.data_source or "rows not read yet")
        return (
            f"Attributor(model={self.model_name!r}, data={rows}, "
            f"workdir={str(self.workdir) if self.workdir else None!r})"
        )

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
                logger.warning(
                    "row %d: no assistant token left within max_length=%d: left out (truncated)",
                    tokenized[p].index,
                    self.max_length,
                )
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
    def train_probe(
        self, spec: Any, layer: int | None = None, *, judge: Any = None, save: bool = True, **probe_options: Any
    ) -> Concept:
        """Train a concept direction from a spec (a ``probes/``-format or persona-vectors file, or a ``ConceptSpec``).

        ``layer=None`` sweeps every layer and keeps the best held-out AUC (``concept.metrics["sweep"]``).
        ``probe_options``: fields of ``ProbeConfig`` (``method="diff_of_means"``, ``n_samples``, ``C`` ...);
        ``judge``: optional ``str -> float`` filter of sampled answers. Saved to ``workdir/concepts/<name>-layer<L>``
        when there is a workdir (``concept.extra["path"]``).
        """
        known = {f.name for f in fields(ProbeConfig)}
        unknown = sorted(set(probe_options) - known)
        if unknown:
            raise ValueError(
                f"train_probe has no option {unknown[0]!r}; ProbeConfig options: {', '.join(sorted(known))}"
            )
        config = ProbeConfig(**{"seed": self.seed, "max_length": self.max_length, **probe_options})
        concept_spec = spec if isinstance(spec, ConceptSpec) else load_spec(spec)
        cache = self.answer_cache
        sweep = None
        if layer is None:
            sweep = layer_sweep(
                self.adapter, concept_spec, config=config, judge=judge, cache_dir=cache, progress=self.progress
            )
            layer = sweep.best_layer
        concept = train_concept(
            self.adapter, concept_spec, layer, config, judge=judge, cache_dir=cache, progress=self.progress
        )
        if sweep is not None:
            concept.metrics["sweep"] = sweep.rows
            concept.metrics["layer_choice"] = sweep.reason
        folder = self._path("concepts", f"{safe_name(concept_spec.name)}-layer{concept.layer}")
        if save and folder is not None:
            save_concept(
                concept,
                folder,
                model_fingerprint=self.adapter.fingerprint(),
                extra_meta={"model": self.model_name, "spec": concept_spec.name},
            )
            concept.extra["path"] = str(folder)
        return concept

    def load_concept(self, path: PathLike) -> Concept:
        """Read a saved concept (``train-probe``/``sae-feature`` output), checked against this model."""
        return load_concept(path, self.adapter)

    def sae_feature(
        self,
        sae: PathLike,
        *,
        feature: int | None = None,
        spec: Any = None,
        probe: Any = None,
        layer: int | None = None,
        k: int = 5,
        reduction: str = "mean",
        save: bool = True,
        **probe_options: Any,
    ) -> Concept:
        """An SAE feature as a concept: ``feature`` by index, or the best of ``k`` candidates for a ``spec`` (Cohen's d
        on its positive vs negative answers) or a ``probe`` (a direction concept or its path: decoder cosine).
        The candidates are in ``concept.extra["selection"]``. Saved to ``workdir/concepts/sae-<j>-layer<L>``."""
        config = ProbeConfig(**{"seed": self.seed, "max_length": self.max_length, **probe_options})
        concept = sae_feature_concept(
            self.adapter,
            sae,
            feature=feature,
            spec=spec,
            probe=probe,
            layer=layer,
            k=k,
            reduction=reduction,
            config=config,
            cache_dir=self.answer_cache,
            progress=self.progress,
        )
        if spec is not None:  # what the chosen feature reads, on the same spec's held-out answers
            spec = spec if isinstance(spec, ConceptSpec) else load_spec(spec)
            concept.metrics.update(
                concept_reading(
                    self.adapter, concept, spec, config, cache_dir=self.answer_cache, progress=self.progress
                )
            )
        folder = self._path("concepts", f"sae-{concept.feature}-layer{concept.layer}")  # type: ignore[attr-defined]
        if save and folder is not None:
            save_concept(concept, folder, extra_meta={"model": self.model_name})
            concept.extra["path"] = str(folder)
        return concept

    # ---- curvature -------------------------------------------------------------------------------------------------
    def factors_dir(self, config: FactorConfig) -> Path | None:
        """The workdir folder of an EKFAC fit with ``config``'s Fisher, dtype and seed."""
        return self.engine.factors_dir(config)

    def fit_factors(
        self,
        *,
        fisher: str = "true",
        preconditioner: str = "ekfac",
        dtype: str = "float32",
        weights: Sequence[str] | None = None,
        up_to_layer: int | None = None,
        out: PathLike | None = None,
        overwrite: bool = False,
        checkpoint_every: int | None = 100,
        max_memory: int | str | None = None,
        fit_rows: int | None = None,
        fit_data: PathLike | Sequence[ChatRow] | None = None,
        lambda_rows: int | None = None,
        load: bool = True,
        gradient_checkpointing: bool = False,
        row_sink: Any = None,
        **deprecated: Any,
    ) -> Factors | None:
        """Fit curvature factors on the training rows (resumable; a matching fit in ``out`` is loaded instead).

        ``weights`` / ``up_to_layer``: which tracked weights (default all). ``out``: folder (default: the
        workdir's, or in memory without a workdir). ``max_memory`` (``"3GiB"``): fit in module partitions under
        that peak. ``fit_data`` (JSONL path or rows) / ``fit_rows`` (a seeded sample of that many rows): fit on
        other rows than the training set (recorded in the factors; scoring the training set with them is allowed
        and noted). ``lambda_rows``: Λ on a seeded sample of that many rows. ``load=False`` (with ``out``): leave
        the factors on disk and return ``None`` (keeps the peak of a partitioned fit). ``gradient_checkpointing``:
        recompute the blocks' activations in the backward (less memory on long rows; same factors). ``row_sink``:
        a ``RowGradientSink`` fed during the Λ pass (how ``build_store`` writes the store in the fit's pass).
        ``dtype``: precision of the factors (``FactorConfig.dtype``; ``stats_dtype`` is its deprecated name)."""
        if deprecated:
            check_known(deprecated, ["stats_dtype"], "Attributor.fit_factors")
            dtype = rename_deprecated(deprecated, {"stats_dtype": "dtype"}, "Attributor.fit_factors")["dtype"]
        config = FactorConfig(
            fisher=fisher,
            preconditioner=preconditioner,
            dtype=dtype,
            seed=self.seed,  # type: ignore[arg-type]
            lambda_rows=lambda_rows,
            gradient_checkpointing=gradient_checkpointing,
        )
        if weights is None:
            infos = (
                self.adapter.tracked_weights()
                if up_to_layer is None
                else self.adapter.weights_up_to(self.adapter.check_layer(up_to_layer))
            )
            weights = [i.name for i in infos]
        data, provenance = self.train, {}
        if fit_data is not None:
            rows = (
                read_chat_jsonl(fit_data, skip_invalid=self.skip_invalid)
                if isinstance(fit_data, (str, os.PathLike))
                else list(fit_data)
            )
            data = tokenize_chat(rows, self.adapter.tokenizer, self.max_length)
            provenance = {
                "source": str(fit_data) if isinstance(fit_data, (str, os.PathLike)) else "rows given",
                "rows": len(data),
            }
        if fit_rows is not None:
            provenance = {
                "source": provenance.get("source", self.data_source or "training rows"),
                "sample_of": len(data),
                "seed": self.seed,
            }
            data = sample_rows(data, fit_rows, self.seed)
            provenance["rows"] = len(data)
        default_folder = preconditioner == "ekfac" and up_to_layer is None and not provenance and lambda_rows is None
        folder = Path(out) if out is not None else (self.factors_dir(config) if default_folder else None)
        factors = fit_factors(
            self.adapter,
            data,
            config,
            weights=weights,
            batch_size=self.batch_size,
            out_dir=folder,
            overwrite=overwrite,
            checkpoint_every=checkpoint_every,
            progress=self.progress,
            max_memory=max_memory,
            load_result=load or folder is None,
            provenance=provenance,
            row_sink=row_sink,
        )
        if factors is None:
            return None
        self._factors[(fisher, preconditioner, dtype, *weights)] = factors
        return factors

    def session_factors(
        self,
        config: GradientAttributionConfig,
        needed: Sequence[str] | None = None,
        *,
        fit: bool = True,
        row_sink: Any = None,
    ) -> tuple[Factors | None, list[str]]:
        """EKFAC factors for ``config``'s Fisher/dtype/seed (``GradientEngine.session_factors``): a fit already in
        memory that covers ``needed``, else the workdir's fit of every tracked weight, loaded or fitted now."""
        return self.engine.session_factors(config, needed, fit=fit, row_sink=row_sink)

    # ---- attribution -----------------------------------------------------------------------------------------------
    def attribute(
        self,
        concept: Concept | PathLike | None = None,
        queries: PathLike | Sequence[Any] | None = None,
        method: str | None = None,
        *,
        store: Any = None,
        **options: Any,
    ) -> ScoreTable:
        """Score every training row; higher = training on the row pushes the concept (measurement) up.

        ``method``: a name in ``attribution.methods.METHODS`` (``None``: ``RECOMMENDED_METHOD``); ``concept``: a
        ``Concept`` or a saved concept's path; ``queries``: see ``queries()``. ``store`` (gradient methods):
        ``None`` uses the workdir's store when one matches, ``False`` forces the exact pass, a path uses that store.
        ``options``: the method's own (see ``get_method(name).options``); unknown ones are a ``ValueError``.
        Returns a ``ScoreTable`` in data order whose ``meta["method"]`` names what ran.
        """
        spec = get_method(method)
        options = spec.check_options(options)
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
        if concept is not None:
            table.meta["concept_summary"] = concept_summary(concept)  # what the concept reads travels with its scores
        table.meta.update(
            {
                "method": spec.name,
                "method_kind": spec.kind,
                "recommended_method": RECOMMENDED_METHOD,
                "method_was_default": method is None,
                **self.data_provenance(),
            }
        )
        return table.attach(tokenizer=self.adapter.tokenizer)  # Jupyter shows token highlights

    def gradient_attribution(
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
        """``GradientEngine.attribute`` (kept for code written against the session; the methods call the engine)."""
        return self.engine.attribute(
            method, concept, queries, config, contrast_queries=contrast_queries, factors=factors, store=store
        )

    # ---- the gradient store ----------------------------------------------------------------------------------------
    @property
    def store_dir(self) -> Path | None:
        """The workdir's store folder (``workdir/store``), or ``None`` without a workdir."""
        return self._path("store")

    def build_store(
        self,
        out: PathLike | None = None,
        *,
        rank: int | None = None,
        projection_dim: int | None = None,
        dtype: str = "float32",
        up_to_layer: int | None = None,
        factors: Factors | PathLike | None = None,
        fisher: str = "true",
        factor_dtype: str = "float32",
        shard_rows: int = 1024,
        shards: Sequence[int] | None = None,
        overwrite: bool = False,
        allow_missing_provenance: bool = False,
        caches: CacheSettings | None = None,
    ) -> GradientStore | None:
        """Project every training row's gradient once and write the store (default ``workdir/store``); later
        gradient questions read it instead of passing over the rows. ``rank``: EKFAC-eigenbasis store keeping
        ``rank`` directions per side of each weight; ``projection_dim``: LoGra-style random projection of that size
        per side; neither: ``store.DEFAULT_KIND`` at ``store.DEFAULT_RANK``. ``up_to_layer``: only blocks ``0..L``.
        ``factors``: fitted factors (``Factors`` or folder; default the session's). When there are none yet they
        are fitted now (the store's weights; into the folder when one is named) and the store is written during
        the fit's Λ pass, which then runs one forward per batch for both (see ``store.fused``). An interrupted
        build resumes; ``shards``: build only these shards (to split the work). Returns the store, or ``None``
        while shards are missing (or when the questions need no gradient store). ``allow_missing_provenance``: use
        factors that record no model fingerprint (default: an error naming them; the opt-in is recorded in the
        store's manifest).

        ``caches`` (``store.caches.CacheSettings``): build what the session's questions read (default when neither
        ``rank`` nor ``projection_dim`` is given: the recommended method's caches), in one pass over the rows: the
        activation cache (``<folder>/activations``) for forward methods and the forward half of ``combined-*``,
        the identity store (``identity_rank``: an eigen store in the KFAC eigenbases of a seeded sample of rows, no
        EKFAC fit; ``store.caches``) for identity-preconditioned questions, the eigen store for EKFAC ones. With
        ``rank``/``projection_dim`` and no ``caches``: the gradient store alone, as before."""
        if rank is not None and projection_dim is not None:
            raise ValueError("give --rank (eigenbasis store) or --projection-dim (LoGra store), not both")
        explicit = rank is not None or projection_dim is not None
        need = (
            cache_needs(caches.methods if caches is not None and caches.methods else [RECOMMENDED_METHOD])
            if caches is not None or not explicit
            else {"activations": False, "gradients": "given"}
        )
        kind = "eigen" if rank is not None else "logra" if projection_dim is not None else DEFAULT_KIND
        if not explicit and need["gradients"] == "identity":
            rank = (caches or CacheSettings()).identity_rank
        config = StoreConfig(
            kind=kind,
            rank=rank or projection_dim or DEFAULT_RANK,
            dtype=dtype,  # type: ignore[arg-type]
            seed=self.seed,
            shard_rows=shard_rows,
        )
        if need["activations"] or (need["gradients"] == "identity" and not explicit):
            return self._build_caches(
                out,
                config,
                need,
                caches or CacheSettings(),
                up_to_layer=up_to_layer,
                factors=factors,
                fisher=fisher,
                factor_dtype=factor_dtype,
                shards=shards,
                overwrite=overwrite,
                allow_missing_provenance=allow_missing_provenance,
            )
        folder = Path(out) if out is not None else self.store_dir
        if folder is None:
            raise ValueError("build_store needs out= (or a workdir)")
        infos = (
            self.adapter.tracked_weights()
            if up_to_layer is None
            else self.adapter.weights_up_to(self.adapter.check_layer(up_to_layer))
        )
        names = [i.name for i in infos]
        grad_config = GradientAttributionConfig(
            fisher=fisher,
            dtype=factor_dtype,
            batch_size=self.batch_size,  # type: ignore[arg-type]
            max_length=self.max_length,
            seed=self.seed,
            allow_missing_provenance=allow_missing_provenance,
        )
        base = {"model": self.model_fingerprint(), "data": self.data_fingerprint()}
        extra = {"model": self.model_name, "data": self.data_source, "max_length": self.max_length}
        if allow_missing_provenance:
            extra["allow_missing_provenance"] = True
        loaded: Factors | None = None
        writer: FitStoreWriter | None = None
        if isinstance(factors, Factors):
            check_factors_model(self.adapter, factors, allow_missing_provenance=allow_missing_provenance)
            loaded = factors
        elif factors is not None and has_factors(factors):
            loaded, _ = obtain_factors(self.adapter, self.train, factors, grad_config, names, progress=self.progress)
        elif factors is None:
            loaded, _ = self.session_factors(grad_config, names, fit=False)
        if loaded is None and shards is None:
            # no factors yet: fit them and write the store in the same pass (the fit's Λ pass runs one forward per
            # batch for its own backward and for the data-label backward the store needs)
            writer = FitStoreWriter(
                self.adapter, self.train, folder, config, names, base, overwrite=overwrite, extra=extra
            )
            if factors is not None:
                fc = FactorConfig(fisher=fisher, preconditioner="ekfac", dtype=factor_dtype, seed=self.seed)  # type: ignore[arg-type]
                loaded = fit_factors(
                    self.adapter,
                    self.train,
                    fc,
                    weights=names,
                    batch_size=self.batch_size,
                    out_dir=factors,
                    progress=self.progress,
                    row_sink=writer,
                )
            elif len(names) == len(self.adapter.tracked_weights()):
                loaded, _ = self.session_factors(grad_config, names, row_sink=writer)
            else:  # the store's blocks only, as fit_factors(up_to_layer=L) (kept in the session, not in the workdir)
                loaded = self.fit_factors(fisher=fisher, dtype=factor_dtype, up_to_layer=up_to_layer, row_sink=writer)
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
        fingerprints = {
            **base,
            "factors": factors_fingerprint(loaded) if kind == "eigen" else None,
            "projection": projection_fingerprint(projector),
        }
        if writer is not None and writer.written and writer.fingerprints != fingerprints:
            logger.warning(
                "store %s: the shards written in the fit's pass do not match the finished factors; rebuilding", folder
            )
            overwrite = True
        store = build_store(
            self.adapter,
            self.train,
            folder,
            projector,
            config,
            fingerprints,
            batch_size=self.batch_size,
            shards=shards,
            overwrite=overwrite,
            progress=self.progress,
            extra=extra,
        )
        if store is not None:
            self._stores[str(folder)] = store
            self._projectors[str(folder)] = projector  # the questions reuse it (same fingerprint)
        return store

    def _build_caches(
        self,
        out: PathLike | None,
        config: StoreConfig,
        need: dict[str, Any],
        settings: CacheSettings,
        *,
        up_to_layer: int | None,
        factors: Any,
        fisher: str,
        factor_dtype: str,
        shards: Sequence[int] | None,
        overwrite: bool,
        allow_missing_provenance: bool = False,
    ) -> GradientStore | None:
        """``build_store`` for a session's questions (``store.caches``): the activation cache and the gradient store
        they need, in one pass (an eigen store is first fitted, as ``build_store`` does)."""
        folder = Path(out) if out is not None else self.store_dir
        if folder is None:
            raise ValueError("build_store needs out= (or a workdir)")
        infos = (
            self.adapter.tracked_weights()
            if up_to_layer is None
            else self.adapter.weights_up_to(self.adapter.check_layer(up_to_layer))
        )
        names = [i.name for i in infos]
        base = {"model": self.model_fingerprint(), "data": self.data_fingerprint()}
        extra = {"model": self.model_name, "data": self.data_source, "max_length": self.max_length}
        projector, fingerprints = None, dict(base)
        if need["gradients"] == "identity" and config.kind == "eigen":
            # the identity store: the KFAC eigenbases of a seeded sample of rows (no EKFAC fit), kept with the store
            before = dict(self.engine.factors)
            sample = self.fit_factors(
                fisher="empirical",
                preconditioner="kfac",
                weights=names,
                out=folder / IDENTITY_BASIS,
                fit_rows=min(settings.identity_sample_rows, len(self.train)),
                overwrite=overwrite,
            )
            self.engine.factors.clear()  # the sample's eigenbases serve this store only, not the session's questions
            self.engine.factors.update(before)
            assert sample is not None
            projector = make_projector(config, self.adapter, names, sample)
            fingerprints.update(factors=factors_fingerprint(sample), projection=projection_fingerprint(projector))
            extra["basis"] = IDENTITY_BASIS
        elif need["gradients"] == "eigen" and config.kind == "eigen":
            grad_config = GradientAttributionConfig(
                fisher=fisher,
                dtype=factor_dtype,
                batch_size=self.batch_size,  # type: ignore[arg-type]
                max_length=self.max_length,
                seed=self.seed,
                allow_missing_provenance=allow_missing_provenance,
            )
            if isinstance(factors, Factors):
                check_factors_model(self.adapter, factors, allow_missing_provenance=allow_missing_provenance)
            loaded = (
                factors
                if isinstance(factors, Factors)
                else obtain_factors(self.adapter, self.train, factors, grad_config, names, progress=self.progress)[0]
                if factors is not None
                else self.session_factors(grad_config, names)[0]
            )
            assert isinstance(loaded, Factors)
            projector = make_projector(config, self.adapter, names, loaded)
            fingerprints.update(factors=factors_fingerprint(loaded), projection=projection_fingerprint(projector))
        elif need["gradients"] is not None:  # a LoGra store needs no factors
            projector = make_projector(config, self.adapter, names, None)
            fingerprints.update(factors=None, projection=projection_fingerprint(projector))
        activations = settings.activations(config.shard_rows) if need["activations"] else None
        store, cache = build_caches(
            self.adapter,
            self.train,
            self._train_chats(),
            folder,
            projector=projector,
            config=config,
            fingerprints=fingerprints,
            activations=activations,
            batch_size=self.batch_size,
            overwrite=overwrite,
            progress=self.progress,
            extra=extra,
            shards=shards,
        )
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
        return self.engine.open_store(path)

    def _resolve_store(self, store: Any) -> tuple[GradientStore | None, list[str]]:
        return self.engine.resolve_store(store)

    def attribute_many(
        self, questions: Sequence[dict[str, Any]], method: str | None = None, *, store: Any = None, **options: Any
    ) -> list[ScoreTable]:
        """Several questions of one gradient method at once: ``questions`` are dicts with ``concept``, ``queries``
        (and optionally ``contrast_queries``). From a store, every question's projected gradient goes into one
        blocked product over the store; without one, one exact pass scores them all (``compute_influence_many``).
        Same scores as asking ``attribute`` one question at a time. Forward methods are asked one by one."""
        spec = get_method(method)
        if spec.kind != "gradient" or spec.name not in ("concept-influence", "influence"):
            # forward methods and combinations: one question at a time
            return [
                self.attribute(q.get("concept"), q.get("queries"), spec.name, store=store, **options) for q in questions
            ]
        options = spec.check_options(options)
        factors = options.pop("factors", None)
        config = gradient_config(self, **options)
        asked = []
        for q in questions:
            concept = q.get("concept")
            if isinstance(concept, (str, os.PathLike)):
                concept = self.load_concept(concept)
            contrast = q.get("contrast_queries")
            asked.append(
                (
                    concept,
                    None if q.get("queries") is None else self.queries(q["queries"]),
                    self.queries(contrast) if contrast is not None else None,
                )
            )
        tables = self.engine.attribute_many(spec.name, asked, config, factors=factors, store=store)
        for table in tables:
            table.meta.update(
                {
                    "method": spec.name,
                    "method_kind": spec.kind,
                    "recommended_method": RECOMMENDED_METHOD,
                    "method_was_default": method is None,
                    **self.data_provenance(),
                }
            )
        return tables

    def search(
        self,
        concept: Concept | PathLike | None = None,
        queries: PathLike | Sequence[Any] | None = None,
        *,
        top_k: int = 20,
        like_row: int | None = None,
        store: Any = None,
        method: str | None = None,
        search: str = "auto",
        **options: Any,
    ) -> ScoreTable:
        """The ``top_k`` highest-scoring rows for a question, read from the gradient store (default: the
        workdir's), best first. ``like_row``: rows like the row with this original index instead (its own
        preconditioned gradient as the query: ``⟨(P + λ)⁻¹ ∇L(row), ∇L(other)⟩``). ``method``: a gradient method
        (default ``concept-influence`` with a concept, ``influence`` without); ``search``: ``"auto"``, ``"exact"``
        (blocked products) or ``"faiss"`` (inner-product index). ``options``: the method's options."""
        opened, _ = self._resolve_store(store if store is not None else None)
        if opened is None:
            raise ValueError(
                "search needs a gradient store: build one (build-store / Attributor.build_store) or pass store="
            )
        if like_row is not None:
            positions = {int(r.index): k for k, r in enumerate(self.rows)}
            if int(like_row) not in positions:
                raise ValueError(f"like_row={like_row}: no training row has this index")
            queries, method, concept = [self.rows[positions[int(like_row)]]], "influence", None
        name = method or ("concept-influence" if concept is not None else "influence")
        spec = get_method(name)
        if spec.kind != "gradient":
            raise ValueError(f"search reads gradient stores: method {name!r} is not a gradient method")
        options = spec.check_options(options)
        if queries is None:
            raise ValueError("search needs queries (or like_row=)")
        if isinstance(concept, (str, os.PathLike)):
            concept = self.load_concept(concept)
        factors = options.pop("factors", None)
        contrast = options.pop("contrast_queries", None)
        config = gradient_config(self, **options)
        return self.engine.search(
            name,
            concept,
            self.queries(queries),
            config,
            opened,
            top_k=top_k,
            like_row=like_row,
            contrast_queries=self.queries(contrast) if contrast is not None else None,
            factors=factors,
            search=search,
        )

    # ---- closing the loop: filter, evaluate, report ---------------------------------------------------------------
    def filter(self, table: ScoreTable, **rule: Any):
        """Which rows ``FilterRule(**rule)`` removes from this session's rows (``remove_top=0.1``, ``remove_top_k``,
        ``threshold``, ``by``, ``aggregate``): a ``FilterResult`` with ``kept``/``removed`` row indices. To write
        a filtered file use ``evaluate.filter_file`` or ``concept-influence filter``."""
        return filter_scores(self.rows, table, FilterRule(**rule))

    def evaluate(
        self,
        tables: ScoreTable | dict[str, ScoreTable] | Sequence[ScoreTable],
        concept: Concept | PathLike,
        queries: PathLike | Sequence[Any],
        *,
        base: Any,
        out: PathLike,
        config: Any = None,
        judge: Any = None,
        oracle: Sequence[int] | None = None,
        reader: Any = "session",
    ) -> dict[str, Any]:
        """Counterfactual retraining (``evaluate.evaluate_removals``): fine-tune ``base`` (the model before
        fine-tuning: path, hub name or adapter) on this session's rows minus each table's top/bottom/random rows,
        and measure ``concept`` on each model's answers to ``queries``. ``reader``: the model that reads the concept
        (default: this session's model, on which the concept was made; ``None``: ``base``). Writes
        ``out/evaluation.json`` and ``out/removal_curve.png``; returns the evaluation dict
        (``evaluate.run.evaluate_tables``)."""
        if isinstance(concept, (str, os.PathLike)):
            concept = self.load_concept(concept)
        return evaluate_tables(
            self.rows,
            tables,
            concept,
            self.queries(queries),
            base=base,
            out=out,
            config=config,
            judge=judge,
            oracle=oracle,
            reader=self.adapter if reader == "session" else reader,
            device=self.adapter.device,
            progress=self.progress,
        )

    def report(
        self,
        tables: ScoreTable | dict[str, ScoreTable] | Sequence[ScoreTable],
        out: PathLike | None = None,
        *,
        evaluation: dict[str, Any] | PathLike | None = None,
        top: int = 50,
        title: str = "concept_influence report",
        label_field: str | None = None,
        positive: str | None = None,
        labels: bool = True,
    ) -> str:
        """The self-contained HTML report (``report.render_report``) of ``tables`` over this session's rows, with
        token highlights from the session's tokenizer; written to ``out`` when given. Returns the HTML.
        ``label_field`` / ``positive`` / ``labels``: the rows whose precision-recall opens the page (default:
        ``data_origin = planted`` when the rows have it). See ``report.tables.report_tables``."""
        return report_tables(
            tables,
            list(self.rows),
            tokenizer=self.adapter.tokenizer,
            max_length=self.max_length,
            evaluation=evaluation,
            top=top,
            title=title,
            extra_meta={"model": self.model_name, "data": self.data_source},
            label_field=label_field,
            positive=positive,
            labels=labels,
            out=out,
        )

"""The fit driver: loops over the training data with the adapter's weight capture and accumulates the factors.

Pass 1 (KFAC, EKFAC): ``A = Σ a aᵀ / n_tokens`` and ``S = Σ g gᵀ / n_tokens`` over non-padding tokens, with ``g``
the output gradients of the summed training loss (targets sampled from the model for the true Fisher). Pass 2
(EKFAC, diagonal): per-example gradients ``G_n = Σ_t g_t a_tᵀ`` give ``Λ = Σ_n (Q_Sᵀ G_n Q_A)² / n_rows`` and
``diag = Σ_n G_n ∘ G_n / n_rows``.

Memory: the statistics are folded in inside the capture hooks, module by module, as the activations (forward) and
output gradients (backward) arrive, so nothing is held for the whole backward pass; an input read by several
weights (q/k/v, gate/up) is accumulated once; backward goes to the weights' outputs, never forming weight
gradients; the loss head runs a few rows at a time (no ``[B, T, vocab]`` logits); accumulation is in the
statistics' dtype (float32 by default, whatever the model's); eigendecompositions (float64) run one matrix at a
time; Λ is formed from the rotated per-token vectors a few examples at a time. ``max_memory`` splits the weights
into module partitions (several passes) and, with ``out_dir``, sends each eigendecomposition and result to disk
as soon as it is done (``curvature.budget`` holds the arithmetic, shared with ``concept-influence plan``).

With ``out_dir`` the driver checkpoints its running sums every ``checkpoint_every`` batches and on interruption
(Ctrl-C, or SIGTERM through the CLI: the signal is held until the batch in progress is folded in, then the state
is saved), and resumes from them when called again with the same model, data and config (results are identical
to an uninterrupted fit: label draws are seeded per row). Under ``torch.distributed`` each rank fits its share of
the rows and the sums are all-reduced. A model sharded with FSDP over several ranks and a folder: the factors are
*owned* (``factor_owners``): each sum is reduced to its weight's owner only, the owner decomposes it and writes its
weight's part files, the eigenbases reach the other ranks one weight at a time inside the Λ pass's backward, and
rank 0 streams every part into the one factors file; each rank checkpoints its own state (``rank_folder``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from concept_influence.curvature.budget import (
    ModelShape,
    WeightShape,
    activation_bytes,
    eigen_workspace_bytes,
    format_size,
    parse_size,
    partitions,
    shared_input_key,
)
from concept_influence.curvature.config import FactorConfig
from concept_influence.curvature.covariance import fold_bias, masked_covariance_sum, per_example_gradients
from concept_influence.curvature.eigen import Eigen, eigendecompose
from concept_influence.curvature.factors import Factors, WeightFactors
from concept_influence.curvature.io import (
    FOLDER_FILES,
    PARTS_FOLDER,
    FactorMismatchError,
    check_fingerprints,
    clear_partial,
    config_fingerprint,
    data_fingerprint,
    has_factors,
    load_factors,
    load_partial,
    read_manifest,
    save_factor_parts,
    save_factors,
    save_partial,
)
from concept_influence.data.tokenize import iter_batches, untrainable_rows
from concept_influence.distributed.ownership import weight_owners
from concept_influence.distributed.runtime import max_over_ranks, side_group
from concept_influence.files import (
    atomic_file,
    file_in_folder,
    folder_lock,
    is_temp_of,
    remove_stale_temps,
)
from concept_influence.gradients.capture import (  # noqa: F401 (gradient capture's old home: names kept importable)
    HEAD_CHUNK_ELEMENTS,
    capture_loss_gradients,
    gradient_mode,
    loss_backward,
)
from concept_influence.models.base import ModelAdapter, WeightCapture, WeightInfo
from concept_influence.numerics import check_finite
from concept_influence.sharding import ShardSettings
from concept_influence.signals import Terminated

logger = logging.getLogger(__name__)


class RowGradientSink(Protocol):
    """Receives every row's gradient of the *data's own labels* during the fit's Λ pass, weight by weight, so that
    one forward serves both the Λ backward and this one (how the gradient store is written inside the fit).

    Call order: ``start(factors)`` once the eigenbases exist (``factors``: the fit's eigendecompositions, counts
    and fingerprints, without Λ); then per batch ``begin_batch(batch)`` (``False``: nothing wanted from it),
    ``add(...)`` once per wanted weight, ``end_batch()``; ``close()`` at the end of the pass or on an error."""

    names: Sequence[str]

    def start(self, factors: Factors) -> None: ...

    def begin_batch(self, batch: dict[str, torch.Tensor]) -> bool: ...

    def add(self, name: str, a: torch.Tensor, rotated_a: torch.Tensor | None, g: torch.Tensor) -> None:
        """``a [B, T, d_in']`` the folded input activations and ``g [B, T, d_out]`` the output gradients of the rows'
        summed loss with their own labels (both zero at padding, statistics dtype); ``rotated_a = a @ Q_A`` when
        the fit computed it (EKFAC), else ``None``."""

    def end_batch(self) -> None: ...

    def close(self) -> None: ...


def folded_activations(capture: WeightCapture, info: WeightInfo, attention: torch.Tensor) -> torch.Tensor:
    """``[B, T, d_in']``: the captured input activations with padding zeroed and the bias column appended."""
    a = capture.activations[info.name]
    mask = attention.to(device=a.device, dtype=a.dtype).unsqueeze(-1)
    a = a * mask
    return fold_bias(a, attention.to(a.device)) if info.has_bias else a


def fit_fingerprints(
    adapter: ModelAdapter, data: Sequence[Any], config: FactorConfig, names: Sequence[str]
) -> dict[str, str]:
    return {"model": adapter.fingerprint(), "data": data_fingerprint(data), "config": config_fingerprint(config, names)}


def weight_shapes(infos: Sequence[WeightInfo]) -> list[WeightShape]:
    """The budget's view of tracked weights (bias folded into ``d_in``; q/k/v and gate/up share an input)."""
    return [WeightShape(i.name, i.d_in + int(i.has_bias), i.d_out, shared_input_key(i.name, i.has_bias)) for i in infos]


def factor_owners(infos: Sequence[WeightInfo], world: int) -> dict[str, int]:
    """``{weight: rank}``: which rank owns each weight's factors in a sharded fit (and its slice of a sharded query
    vector): ``distributed.weight_owners`` on the budget's shapes (weights sharing an input go together)."""
    return weight_owners([(w.name, w.d_in, w.d_out, w.shared_input or w.name) for w in weight_shapes(infos)], world)


def adapter_model_shape(adapter: ModelAdapter) -> ModelShape:
    """Sizes of the adapter's model for the activation estimate."""
    infos = adapter.tracked_weights()
    d_ff = max((max(i.d_in, i.d_out) for i in infos), default=adapter.d_model)
    params = list(adapter.model.parameters())
    vocab = 1
    head = getattr(adapter.model, "get_output_embeddings", lambda: None)()
    if head is not None and getattr(head, "weight", None) is not None:
        vocab = int(head.weight.shape[0])
    return ModelShape(
        n_layers=adapter.n_layers,
        d_model=adapter.d_model,
        d_ff=d_ff,
        vocab=vocab,
        n_params=sum(p.numel() for p in params),
        param_bytes=params[0].element_size() if params else 4,
    )


def gathered_parameter_bytes(adapter: ModelAdapter, blocks_at_once: int | None = None) -> int:
    """Bytes of parameters a sharded model gathers at once in a pass: the root's own (embeddings, final norm, head;
    FSDP2 keeps them from forward to backward) and ``blocks_at_once`` decoder blocks (default
    ``ShardSettings().prefetch_blocks``: the running one and the prefetched next)."""
    if blocks_at_once is None:
        blocks_at_once = ShardSettings().prefetch_blocks
    blocks = adapter.decoder_blocks()
    per_block = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks]
    total = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
    return total - sum(per_block) + sum(sorted(per_block, reverse=True)[:blocks_at_once])


def plan_fit_partitions(
    adapter: ModelAdapter,
    infos: Sequence[WeightInfo],
    config: FactorConfig,
    max_memory: int | None,
    *,
    batch_rows: int,
    row_tokens: int,
    on_disk: bool = False,
) -> list[list[str]]:
    """Weight names per partition so that the process stays under ``max_memory`` bytes: what is left after the
    process's current resident memory (model included), one batch's activations and the largest eigendecomposition's
    work space goes to the factors (``on_disk``: finished eigendecompositions and results go to files). ``None``:
    one partition."""
    shapes = weight_shapes(infos)
    if max_memory is None:
        return [[w.name for w in shapes]]
    import psutil

    resident = psutil.Process().memory_info().rss
    activations = activation_bytes(
        adapter_model_shape(adapter), batch_rows, row_tokens, head_chunk_elements=HEAD_CHUNK_ELEMENTS
    )
    # a sharded model holds only its shard now (in ``resident``); a pass also gathers the root's parameters and
    # a few blocks' (``plan``'s "gathered" term)
    activations += gathered_parameter_bytes(adapter) if adapter.sharded else 0
    workspace = eigen_workspace_bytes(shapes, config)
    budget = max_memory - resident - activations - workspace
    if budget <= 0:
        raise ValueError(
            f"max_memory (--max-memory) {format_size(max_memory)} is too small: the process already holds "
            f"{format_size(resident)} (model included), a batch of {batch_rows} rows x {row_tokens} tokens "
            f"needs about {format_size(activations)} and the largest eigendecomposition "
            f"{format_size(workspace)}; raise it or lower the batch size / max length"
        )
    try:
        parts = partitions(shapes, budget, config, on_disk=on_disk)
    except ValueError as err:
        raise ValueError(
            f"max_memory (--max-memory) {format_size(max_memory)} is too small: {err} "
            f"(after {format_size(resident)} resident, {format_size(activations)} of activations and "
            f"{format_size(workspace)} of eigendecomposition work space)"
        ) from None
    return [[w.name for w in part] for part in parts]


def sample_rows(data: Sequence[Any], n: int | None, seed: int = 0) -> Sequence[Any]:
    """A seeded sample of ``n`` rows of ``data`` kept in their original order (all of them when ``n`` is None or
    not smaller than ``len(data)``)."""
    if n is None or n >= len(data):
        return data
    if n < 1:
        raise ValueError(f"the number of rows to sample must be positive, got {n}")
    import random

    keep = sorted(random.Random(seed).sample(range(len(data)), n))
    return [data[i] for i in keep]


def fit_factors(
    adapter: ModelAdapter,
    data: Sequence[Any],
    config: FactorConfig = FactorConfig(),
    *,
    weights: Sequence[str] | None = None,
    batch_size: int = 8,
    out_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = 100,
    overwrite: bool = False,
    progress: bool = True,
    max_batches: int | None = None,
    max_memory: int | str | None = None,
    load_result: bool = True,
    provenance: dict[str, Any] | None = None,
    row_sink: RowGradientSink | None = None,
) -> Factors | None:
    """Fit the curvature factors of ``weights`` (default: every tracked weight) on tokenised training rows.

    ``data``: a ``TokenizedDataset`` (or a sequence of ``TokenizedRow``): the rows the factors are fitted on (a
    sample of the scoring set is fine, see ``sample_rows``; the data fingerprint records which). ``out_dir``: save
    the factors there (folder with ``manifest.json`` and ``factors.safetensors``); an existing complete fit with
    the same fingerprints is loaded instead of refitted, one with different fingerprints is an error unless
    ``overwrite``. ``max_batches``: stop after that many batches in this call, leaving a resumable partial state
    (for tests and time-limited jobs); returns ``None`` in that case.

    ``max_memory`` (bytes or ``"3GiB"``): bound the process's peak by fitting the weights in module partitions,
    several passes over the data each over a subset of the weights (same factors as one pass). With ``out_dir``
    each finished partition goes to disk; ``load_result=False`` then returns ``None`` instead of loading every
    partition back (the CLI's way of keeping the peak). Covariance matrices (``activation_covariance``...) are kept
    in the result only for a fit in one partition.

    Under ``torch.distributed`` (initialised by the caller, e.g. ``torchrun``) every rank passes the same ``data``
    and fits its contiguous share of the rows; the sums are all-reduced, every rank gets the same factors and rank 0
    writes ``out_dir``; mid-pass checkpoints are then off (a restarted job refits). On a model sharded with FSDP,
    with ``out_dir``: each weight's owner rank writes its part, rank 0 merges them, and each rank checkpoints and
    resumes its own state. ``provenance``: how ``data`` was chosen when it is not the set to be scored (recorded in
    the factor files; scoring another set with them is then allowed and noted). Two fits into one ``out_dir`` take
    turns (a folder lock); the second then finds the first one's factors.

    ``row_sink``: also hand every row's data-label gradient to it during the Λ pass (one forward for both; see
    ``RowGradientSink``), when the fit has one such pass over all of ``data`` (EKFAC, one partition, no
    ``max_memory``, no checkpointing, not distributed, Λ on every row); otherwise, or for rows a resumed fit does
    not pass over again, the sink gets nothing and the caller computes them itself.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(data) == 0:
        raise ValueError("no training rows to fit factors on")
    untrainable_rows(data)  # a row whose whole answer is truncated away is an error (leave such rows out first)
    infos = adapter.tracked_weights() if weights is None else [adapter.weight_info(n) for n in weights]
    names = [i.name for i in infos]
    if not names:
        raise ValueError("no weights to fit factors for")
    fingerprints = fit_fingerprints(adapter, data, config, names)
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file, but factors are kept in a folder (--factors / --out)")
    limit = parse_size(max_memory) if max_memory is not None else None
    rank, _ = _dist_info()
    lock = folder_lock(folder, what="factors folder") if folder is not None and rank == 0 else contextlib.nullcontext()
    with lock:
        return _fit(
            adapter,
            data,
            config,
            infos,
            fingerprints,
            folder,
            limit,
            batch_size=batch_size,
            checkpoint_every=checkpoint_every,
            overwrite=overwrite,
            progress=progress,
            max_batches=max_batches,
            load_result=load_result,
            provenance=dict(provenance or {}),
            row_sink=row_sink,
        )


def _fit(
    adapter: ModelAdapter,
    data: Sequence[Any],
    config: FactorConfig,
    infos: Sequence[WeightInfo],
    fingerprints: dict[str, str],
    folder: Path | None,
    limit: int | None,
    *,
    batch_size: int,
    checkpoint_every: int | None,
    overwrite: bool,
    progress: bool,
    max_batches: int | None,
    load_result: bool,
    provenance: dict[str, Any],
    row_sink: RowGradientSink | None = None,
) -> Factors | None:
    names = [i.name for i in infos]
    rank, world = _dist_info()
    if folder is not None:
        if rank == 0:
            check_own_folder(folder, overwrite)
            # temp files of a killed fit (we hold the folder's lock: no live writer); only ours, by name
            remove_stale_temps(folder, names=FOLDER_FILES)
        if has_factors(folder):
            saved = read_manifest(folder)["fingerprints"]
            if saved == fingerprints:
                logger.info("factors in %s match this model, data and config: loading them", folder)
                if rank == 0:  # left by a fit killed after saving its factors
                    clear_partial(folder)
                    _clear_parts(folder)
                if not load_result:
                    return None
                return load_factors(
                    folder, model_fingerprint=fingerprints["model"], data_fingerprint=fingerprints["data"]
                )
            if not overwrite:
                check_fingerprints(saved, fingerprints, f"the factors in {folder}", opt_in=None)
        if overwrite:
            clear_partial(folder)
            _clear_parts(folder)

    longest = max((len(row.input_ids) for row in data), default=1)
    # a model sharded over several ranks with a folder: each weight's factors are owned by one rank, which writes
    # them to parts/ as they are done; rank 0 then streams every part into the one factors file
    owned = world > 1 and adapter.sharded and folder is not None
    on_disk = folder is not None and (limit is not None or owned)  # a bounded or owned fit spills each result
    parts = plan_fit_partitions(
        adapter,
        infos,
        config,
        limit,
        batch_rows=min(batch_size, max(len(data), 1)),
        row_tokens=longest,
        on_disk=on_disk,
    )
    if len(parts) > 1:
        logger.info(
            "fitting %d weights in %d partitions to stay under %s", len(names), len(parts), format_size(limit or 0)
        )
    spill = folder / PARTS_FOLDER if on_disk else None
    if limit is not None:
        _return_freed_memory()
    by_name = {i.name: i for i in infos}
    lambda_rows = sample_rows(data, config.lambda_rows, config.seed) if config.lambda_rows else data
    share = _shard(data, rank, world)
    lambda_share = _shard(lambda_rows, rank, world)
    checkpoints = folder if (folder is not None and world == 1) else None
    owners: dict[str, int] | None = None
    if owned:
        assert folder is not None
        owners = factor_owners(infos, world)
        checkpoints = rank_folder(folder, rank)  # each rank resumes from its own state
    if row_sink is not None:
        reasons = [
            why
            for why, bad in (
                (
                    "the preconditioner has no Λ pass",
                    not config.needs_per_example_pass or config.preconditioner != "ekfac",
                ),
                ("the fit is split into partitions", len(parts) > 1),
                ("--max-memory is set", limit is not None),
                ("gradient checkpointing is on", config.gradient_checkpointing),
                ("the fit is distributed", world > 1),
                ("Λ is fitted on a sample of the rows", lambda_rows is not data),
                ("the sink wants weights the fit does not cover", not set(row_sink.names) <= set(names)),
            )
            if bad
        ]
        if reasons:
            logger.info("the row gradients are not computed in the fit's Λ pass (%s)", "; ".join(reasons))
            row_sink = None

    done_parts: list[int] = []
    sources: dict[str, list[str]] = {}  # output tensor -> [file in parts/, tensor in it] (partitioned fits on disk)
    totals = {"n_tokens": 0, "n_rows": 0}
    state: dict[str, Any] = {}
    sums: dict[str, torch.Tensor] = {}
    if checkpoints is not None:
        partial = load_partial(checkpoints, fingerprints)
        if partial is not None and partial[0].get("rows_done") and partial[0].get("row_order") != ROW_ORDER:
            logger.warning(
                "the partial fit in %s was checkpointed mid-pass with the rows in another order (an older "
                "version), so the rows it has done cannot be told apart: fitting from the start",
                folder,
            )
            clear_partial(checkpoints)
            _clear_parts(checkpoints)
            partial = None
        if partial is not None:
            state, sums = partial[0], dict(partial[1])
            if state.get("partitions", [names]) != parts:
                raise FactorMismatchError(
                    f"the partial fit in {folder} was split into other partitions (another "
                    "--max-memory or batch size); resume with the same settings or --overwrite"
                )
            done_parts = list(state.get("done_parts", []))
            sources = dict(state.get("sources", {}))
            totals = dict(state.get("totals", totals))
            logger.info(
                "resuming partition %d, %s pass, after %d rows",
                state.get("part", 0),
                state["stage"],
                state["rows_done"],
            )

    if owners is not None:  # every rank resumes from the same save, or all start over
        import torch.distributed as dist

        # each rank's sums cover its own rows (rows_done), so states saved at different times mix as long as
        # every rank is in the same partition and pass
        mark = [state.get("part"), state.get("stage")] if state else None
        marks: list[Any] = [None] * world
        dist.all_gather_object(marks, mark)
        if any(m != marks[0] for m in marks):
            logger.warning("the ranks' saved states of %s differ (%s): fitting from the start", folder, marks)
            state, sums, done_parts, sources, totals = {}, {}, [], {}, {"n_tokens": 0, "n_rows": 0}
            if checkpoints is not None:
                clear_partial(checkpoints)

    results: dict[str, WeightFactors] = {}
    for k, part in enumerate(parts):
        if k in done_parts:
            continue
        if state.get("part", k) != k or "stage" not in state:
            state, sums = {}, {}
        if not state:
            state = {
                "part": k,
                "stage": "covariance",
                "rows_done": 0,
                "n_tokens": 0,
                "n_rows": 0,
                "shared": {},
                "eigen_files": {},
            }
        state["row_order"] = ROW_ORDER  # what rows_done counts in (checked on resume)
        fitter = _PartitionFit(
            adapter,
            [by_name[n] for n in part],
            config,
            state,
            sums,
            keep_covariances=spill is None and len(parts) == 1,
            spill=spill,
            part=k,
            write=rank == 0 or owners is not None,
        )
        fitter.owners, fitter.rank = owners, rank
        fitter.group = side_group() if owners is not None else None
        fitter.in_step = world > 1 and adapter.sharded
        fitter.filler_row = data[0]
        if row_sink is not None:
            fitter.sink = row_sink

            def shell(weights: dict[str, WeightFactors], fitter: _PartitionFit = fitter) -> Factors:
                # what the finished fit's Factors will say of itself (counts, fingerprints), without Λ yet
                return Factors(
                    weights,
                    config,
                    n_rows=len(lambda_rows),
                    n_tokens=int(fitter.state["n_tokens"]),
                    fingerprints=fingerprints,
                    provenance=provenance,
                )

            fitter.sink_factors = shell

        def checkpoint(fitter: _PartitionFit = fitter, totals: dict[str, int] = totals) -> None:
            if checkpoints is not None:
                save_partial(
                    checkpoints,
                    {
                        **fitter.state,
                        "fingerprints": fingerprints,
                        "partitions": parts,
                        "done_parts": done_parts,
                        "totals": totals,
                        "sources": sources,
                    },
                    fitter.sums,
                )

        finished = fitter.run(
            share,
            lambda_share,
            batch_size=batch_size,
            data_size=len(data),
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            max_batches=max_batches,
            progress=progress,
            world=world,
            label=f" ({k + 1}/{len(parts)})" if len(parts) > 1 else "",
        )
        if not finished:
            return None
        if max_batches is not None:
            max_batches -= fitter.batches_run
        totals = {"n_tokens": int(fitter.state["n_tokens"]), "n_rows": int(fitter.state["n_rows"])}
        if spill is not None:
            sources.update(gather_sources(fitter.spill_result()) if owners is not None else fitter.spill_result())
            fitter.sums.clear()
            _return_freed_memory()
        else:
            part_factors = fitter.result()
            check_factors_finite(Factors(part_factors, config), "fit-factors (result)")
            results.update(part_factors)
        done_parts.append(k)
        state, sums = {}, {}
        if spill is not None and checkpoints is not None:
            save_partial(
                checkpoints,
                {
                    "part": k + 1,
                    "fingerprints": fingerprints,
                    "partitions": parts,
                    "done_parts": done_parts,
                    "totals": totals,
                    "sources": sources,
                },
                {},
            )
        del fitter

    n_rows = totals["n_rows"] if config.needs_per_example_pass else len(data)
    meta = Factors(
        {}, config, n_rows=n_rows, n_tokens=int(totals["n_tokens"]), fingerprints=fingerprints, provenance=provenance
    )
    if owners is not None:
        import torch.distributed as dist

        dist.barrier()  # every owner's parts are written
    if folder is not None and rank == 0:
        if spill is not None:
            weights = [(n, by_name[n].d_out, by_name[n].d_in + int(by_name[n].has_bias)) for n in names]
            save_factor_parts(
                meta,
                weights,
                {key: (spill / file, inner) for key, (file, inner) in sources.items()},
                folder,
                partitions=len(parts),
            )
            if owners is None:
                _clear_parts(folder)
        else:
            save_factors(
                Factors({n: results[n] for n in names}, config, meta.n_rows, meta.n_tokens, fingerprints, provenance),
                folder,
            )
        clear_partial(folder)
    if owners is not None and checkpoints is not None:  # the factors file is written: each rank's state goes,
        import torch.distributed as dist  # then rank 0 removes the parts (no two ranks delete in one folder)

        dist.barrier()
        clear_partial(checkpoints)
        _remove_empty(checkpoints)
        dist.barrier()
        if rank == 0:
            _clear_parts(folder)
    if world > 1 and folder is not None:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written the folder
    if folder is not None and not load_result:
        return None
    if spill is not None:
        return load_factors(folder)
    return Factors(
        {n: results[n] for n in names},
        config,
        n_rows=meta.n_rows,
        n_tokens=meta.n_tokens,
        fingerprints=fingerprints,
        provenance=provenance,
    )


class _PartitionFit:
    """The passes over the data for one partition of the weights: covariances (accumulated inside the capture
    hooks, one shared input once), eigendecompositions one weight at a time, then Λ and the diagonal from
    per-example gradients formed a few examples at a time."""

    def __init__(
        self,
        adapter: ModelAdapter,
        infos: Sequence[WeightInfo],
        config: FactorConfig,
        state: dict[str, Any],
        sums: dict[str, torch.Tensor],
        *,
        keep_covariances: bool,
        spill: Path | None = None,
        part: int = 0,
        write: bool = True,
    ) -> None:
        self.adapter, self.infos, self.config = adapter, list(infos), config
        self.state, self.sums = state, sums
        self.keep_covariances = keep_covariances
        self.spill, self.part, self.write = spill, part, write  # eigendecompositions and results go to spill/
        self.dtype = config.torch_dtype
        self.eigens: dict[str, Eigen] = {}
        self.bases: dict[str, torch.Tensor] = {}
        self.batches_run = 0
        self._by_name = {i.name: i for i in self.infos}
        self._seen: list[tuple[torch.Tensor, str, bool]] = []
        self._stash: dict[str, torch.Tensor] = {}
        self._got: set[str] = set()
        self._mask: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self.order_window = LENGTH_WINDOW
        self.sink: RowGradientSink | None = None  # set by the driver when the store is written in the Λ pass
        self.sink_factors: Callable[[dict[str, WeightFactors]], Factors] | None = None
        self._sinking = False  # the batch in progress also feeds the sink
        self._rotated: dict[str, torch.Tensor] = {}  # a @ Q_A per shared input (one entry unless sinking)
        self.owners: dict[str, int] | None = None  # weight -> owning rank (factors sharded between ranks)
        self.group: Any = None  # the process group of the bases sent inside the backward
        self.rank = 0
        self.in_step = False  # a sharded model over several ranks: pad each pass to the busiest rank's batches
        self.filler_row: Any = None  # the row of the padding batches (their statistics are dropped)
        self._dummy = False  # the batch in progress is padding

    def _filler(self, step: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """One forward and backward whose statistics are dropped (the hooks return at once): keeps a rank with
        fewer batches in step with the others' collectives."""
        assert self.filler_row is not None
        batch = next(iter_batches([self.filler_row], 1))
        self._dummy = True
        try:
            step(batch)
        finally:
            self._dummy = False

    # ---- the hooks ---------------------------------------------------------------------------------------------
    def _owner(self, name: str, a: torch.Tensor) -> str:
        """The first weight of this batch that read the same input tensor (``name`` itself if none)."""
        bias = self._by_name[name].has_bias
        for other, owner, other_bias in self._seen:
            if (
                other_bias == bias
                and other.data_ptr() == a.data_ptr()
                and other.shape == a.shape
                and other.stride() == a.stride()
            ):
                return owner
        self._seen.append((a, name, bias))
        if self.config.gradient_checkpointing:  # weights sharing an input are called one after another: keep the
            del self._seen[:-8]  # last few inputs only, not every input of the batch
        return name

    def _folded(self, name: str, a: torch.Tensor) -> torch.Tensor:
        mask = self._mask.to(device=a.device, dtype=self.dtype)
        a = a.to(self.dtype) * mask.unsqueeze(-1)
        return fold_bias(a, mask) if self._by_name[name].has_bias else a

    def _check(self, tensor: torch.Tensor, what: str, name: str) -> None:
        stage = "covariance" if self.state["stage"] == "covariance" else "eigenvalue-correction"
        check_finite(tensor, f"fit-factors ({stage} pass): {what} of {name}", self._index)

    def _covariance_activation(self, name: str, a: torch.Tensor) -> None:
        if self._dummy:
            return
        self._check(a, "input activations", name)
        owner = self._owner(name, a)
        self.state["shared"][name] = owner
        if owner == name:
            _add(self.sums, f"{name}/A", masked_covariance_sum(self._folded(name, a)))

    def _covariance_grad(self, name: str, g: torch.Tensor) -> None:
        if self._dummy:
            return
        self._once(name)
        self._check(g, "output gradients", name)
        mask = self._mask.to(g.device)
        _add(self.sums, f"{name}/S", masked_covariance_sum(g.to(self.dtype), mask))

    def _lambda_activation(self, name: str, a: torch.Tensor) -> None:
        if self._dummy:
            return
        self._check(a, "input activations", name)
        owner = self._owner(name, a)
        self._stash[name] = self._stash[owner] if owner != name else self._folded(name, a)

    def _rotated_input(self, name: str, a: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
        """``a @ Q_A`` ``[B, T, d_in']``, computed once per batch for the weights sharing an input (q/k/v, gate/up):
        one cached input while streaming, every input of the batch while the sink also needs them."""
        key = f"{self.state['shared'].get(name, name)}/A"
        rotated = self._rotated.get(key)
        if rotated is None:
            if not self._sinking:
                self._rotated.clear()
            rotated = self._rotated[key] = a @ (self.bases[key] if basis is None else basis)
        return rotated

    def _lambda_grad(self, name: str, g: torch.Tensor) -> None:
        ekfac = self.config.preconditioner == "ekfac"
        q_a = q_s = None
        if ekfac and self.owners is not None:  # the owners send the bases, padding batches included (collectives)
            q_a = self._basis(f"{self.state['shared'].get(name, name)}/A")
            q_s = self._basis(f"{name}/S")
        if self._dummy:
            return
        self._once(name)
        self._check(g, "output gradients", name)
        a = self._stash[name] if self._sinking else self._stash.pop(name)
        g = g.to(self.dtype) * self._mask.to(device=g.device, dtype=self.dtype).unsqueeze(-1)
        info = self._by_name[name]
        per_example = info.d_out * (info.d_in + int(info.has_bias)) * self.dtype.itemsize
        step = max(1, _LAMBDA_CHUNK_BYTES // max(1, 3 * per_example))
        rotated_a = self._rotated_input(name, a, q_a) if ekfac else None
        if ekfac and q_s is None:
            q_s = self.bases[f"{name}/S"]
        for start in range(0, g.shape[0], step):
            g_c, a_c = g[start : start + step], a[start : start + step]
            grads = per_example_gradients(a_c, g_c)  # [c, d_out, d_in']
            _add(self.sums, f"{name}/diag", grads.square().sum(dim=0))
            del grads
            if rotated_a is not None:  # rotate the per-token vectors first: Q_Sᵀ G Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ
                rotated = per_example_gradients(rotated_a[start : start + step], g_c @ q_s)
                _add(self.sums, f"{name}/lambda", rotated.square().sum(dim=0))
                del rotated
        if self._sinking and self.config.fisher == "empirical" and self.sink is not None and name in self.sink.names:
            self.sink.add(name, a, rotated_a, g)  # the data's labels are the Λ pass's own: nothing more to run

    def _sink_grad(self, name: str, g: torch.Tensor) -> None:
        """The second backward (data labels) of a sinking batch: hand the weight's gradient pieces to the sink."""
        if self.sink is None or name not in self.sink.names:
            return
        self._check(g, "output gradients (data labels)", name)
        a = self._stash[name]
        g = g.to(self.dtype) * self._mask.to(device=g.device, dtype=self.dtype).unsqueeze(-1)
        rotated_a = self._rotated_input(name, a) if self.config.preconditioner == "ekfac" else None
        self.sink.add(name, a, rotated_a, g)

    def _once(self, name: str) -> None:
        if name in self._got:
            raise RuntimeError(
                f"{name}: its output received two gradients in one backward pass (the module is "
                "called twice); this fit cannot stream its statistics"
            )
        self._got.add(name)

    # ---- the passes --------------------------------------------------------------------------------------------
    def _batch(self, batch: dict[str, torch.Tensor], on_activation, on_output_grad, *, sink: bool = False) -> None:
        """One forward and backward with the capture's hooks; with ``sink`` (Λ pass), also the sink's batch: with
        the true Fisher a second backward of the data's labels through the same forward feeds it."""
        self._mask, self._index = batch["attention_mask"], batch["index"]
        self._seen, self._stash, self._got, self._rotated = [], {}, set(), {}
        self._sinking = sink and self.sink is not None and self.sink.begin_batch(batch)
        try:
            with self.adapter.capture_weights(
                [i.name for i in self.infos],
                on_activation=on_activation,
                on_output_grad=on_output_grad,
                checkpointing=self.config.gradient_checkpointing,
            ) as capture:

                def data_labels() -> None:
                    capture.on_output_grad = self._sink_grad

                loss_backward(
                    self.adapter,
                    batch,
                    capture.outputs,
                    fisher=self.config.fisher,
                    seed=self.config.seed,
                    then_data_labels=data_labels if self._sinking and self.config.fisher == "true" else None,
                )
            if self._sinking and self.sink is not None:
                self.sink.end_batch()
        finally:
            self._seen, self._stash, self._rotated, self._sinking = [], {}, {}, False

    def run(
        self,
        share: Sequence[Any],
        lambda_share: Sequence[Any],
        *,
        batch_size: int,
        data_size: int,
        checkpoint,
        checkpoint_every: int | None,
        max_batches: int | None,
        progress: bool,
        world: int,
        label: str,
    ) -> bool:
        """All passes of the partition; False if stopped early by ``max_batches`` (state checkpointed)."""
        state = self.state
        budget = [max_batches if max_batches is not None else -1]

        def run_pass(stage: str, rows: Sequence[Any], step) -> bool:
            rows = length_ordered(rows, self.order_window)
            todo = rows[state["rows_done"] :] if state["rows_done"] else rows
            n_batches = (len(todo) + batch_size - 1) // batch_size
            target = max_over_ranks(n_batches) if self.in_step else n_batches  # before any forward (a collective)
            done = 0
            busy = False
            with tqdm(
                total=len(rows),
                initial=state["rows_done"],
                desc=f"factors: {stage}{label}",
                unit="row",
                disable=not progress,
            ) as bar:
                try:
                    for batch in iter_batches(todo, batch_size, pad_id=getattr(share, "pad_token_id", 0)):
                        if budget[0] == 0:
                            checkpoint()
                            return False
                        busy = True  # the running sums are inconsistent until the row count is updated
                        with _deferred_interrupts() as pending:  # Ctrl-C / SIGTERM wait for the batch to finish
                            step(batch)
                            state["rows_done"] += int(batch["input_ids"].shape[0])
                        busy = False
                        if pending:
                            checkpoint()
                            raise pending[0]
                        bar.update(int(batch["input_ids"].shape[0]))
                        done += 1
                        self.batches_run += 1
                        budget[0] -= 1
                        if checkpoint_every and done % checkpoint_every == 0 and done < n_batches:
                            checkpoint()
                    if self.in_step:  # a sharded model: every rank runs as many forwards as the busiest one
                        for _ in range(target - done):
                            self._filler(step)
                except KeyboardInterrupt:
                    if not busy:
                        checkpoint()
                    raise
            return True

        with gradient_mode(self.adapter, self.infos):
            if self.config.needs_covariances and state["stage"] == "covariance":

                def covariance_step(batch: dict[str, torch.Tensor]) -> None:
                    self._batch(batch, self._covariance_activation, self._covariance_grad)
                    if not self._dummy:
                        state["n_tokens"] += int(batch["attention_mask"].sum())

                if not run_pass("covariance", share, covariance_step):
                    return False
                self._all_reduce_sums(("/A", "/S"), "n_tokens", world)
                state.update(stage="eigen", rows_done=0)
                checkpoint()
                _fault_after_covariance(self.rank)
            if self.config.needs_covariances:
                self._eigendecompose()
            if self.config.needs_per_example_pass:
                if state["stage"] in ("covariance", "eigen"):
                    state.update(stage="lambda", rows_done=0, n_rows=0)

                def lambda_step(batch: dict[str, torch.Tensor]) -> None:
                    self._batch(batch, self._lambda_activation, self._lambda_grad, sink=True)
                    if not self._dummy:
                        state["n_rows"] += int(batch["input_ids"].shape[0])

                if self.sink is not None and self.sink_factors is not None:
                    self.sink.start(self.sink_factors(self.eigen_factors()))
                try:
                    if not run_pass("lambda", lambda_share, lambda_step):
                        return False
                finally:
                    if self.sink is not None:
                        self.sink.close()
                self._all_reduce_sums(("/diag", "/lambda"), "n_rows", world)
            else:
                state["n_rows"] = data_size
        self.bases.clear()
        return True

    def _key_owner(self, key: str) -> int:
        """The rank owning a statistic ``"<weight>/A"``, ``"<weight>/S"``, ``"<weight>/lambda"``...: its weight's."""
        assert self.owners is not None
        return self.owners[key.rsplit("/", 1)[0]]

    def _all_reduce_sums(self, suffixes: tuple[str, ...], count: str, world: int) -> None:
        if world == 1:
            return
        import torch.distributed as dist

        if self.owners is not None:  # each sum to its owner only (the others drop theirs)
            expected = self._expected_keys(suffixes)
            for key in expected:
                if key not in self.sums:  # a weight this rank's rows never reached: zeros, in step with the others
                    self.sums[key] = torch.zeros(self._key_shape(key), dtype=self.dtype, device=self.adapter.device)
                dst = self._key_owner(key)
                dist.reduce(self.sums[key], dst=dst)
                if dst != self.rank:
                    del self.sums[key]
        else:
            for key in sorted(k for k in self.sums if k.endswith(suffixes)):
                dist.all_reduce(self.sums[key])
        total = torch.tensor([float(self.state[count])], dtype=torch.float64)
        dist.all_reduce(total)
        self.state[count] = int(total.item())

    def _expected_keys(self, suffixes: tuple[str, ...]) -> list[str]:
        """Every statistic of this partition ending in ``suffixes``, in one order on every rank."""
        keys = set()
        for info in self.infos:
            for suffix in suffixes:
                if suffix == "/A":
                    keys.add(f"{self.state['shared'].get(info.name, info.name)}/A")
                else:
                    keys.add(f"{info.name}{suffix}")
        return sorted(keys)

    def _key_shape(self, key: str) -> tuple[int, ...]:
        name, kind = key.rsplit("/", 1)
        info = self._by_name[name]
        d_in = info.d_in + int(info.has_bias)
        return {"A": (d_in, d_in), "S": (info.d_out, info.d_out)}.get(kind, (info.d_out, d_in))

    def _basis(self, key: str) -> torch.Tensor:
        """The eigenbasis of ``key`` (``"<weight>/A"`` or ``"/S"``) for the Λ pass: this rank's own, or, with owners,
        sent by its owner for the batch in progress (a collective: every rank asks for the same keys in order)."""
        if self.owners is None:
            return self.bases[key]
        import torch.distributed as dist

        src = self._key_owner(key)
        if src == self.rank:
            # contiguous: eigh's vectors are column-major, and a collective sends the storage as it lies (a
            # receiver would read Qᵀ)
            basis = self.bases[key].contiguous()
        else:
            shape = self._key_shape(key)
            basis = torch.empty(shape, dtype=self.dtype, device=self.adapter.device)
        dist.broadcast(basis, src=src, group=self.group)
        return basis

    def _eigendecompose(self) -> None:
        """One matrix at a time: each float64 eigendecomposition moves to the CPU (or to a file in ``spill``) when
        done; the eigenbases the Λ pass needs stay on the model's device in the statistics' dtype; a covariance sum
        is freed once decomposed unless the result keeps the covariance matrices."""
        from safetensors.torch import load_file

        n_tokens = max(int(self.state["n_tokens"]), 1)
        files: dict[str, str] = self.state.setdefault("eigen_files", {})
        for info in self.infos:
            for key in (f"{self.state['shared'].get(info.name, info.name)}/A", f"{info.name}/S"):
                if key in self.eigens or key in self.bases:
                    continue
                if self.owners is not None and self._key_owner(key) != self.rank:
                    continue  # its owner decomposes it
                if (
                    self.spill is not None
                    and key in files
                    and file_in_folder(self.spill, files[key], "the fit's checkpoint: eigen_files").exists()
                ):  # resumed
                    saved = load_file(str(self.spill / files[key]))
                    eig = Eigen(saved["values"], saved["vectors"])
                else:
                    total = self.sums.get(key)
                    if total is None:  # a weight never reached in this pass (no gradient): zero statistics
                        d = info.d_out if key.endswith("/S") else info.d_in + int(info.has_bias)
                        total = self.sums[key] = torch.zeros(d, d, dtype=self.dtype, device=self.adapter.device)
                    eig = eigendecompose(total / n_tokens)
                    check_finite(
                        eig.vectors, f"fit-factors (result): eigendecomposition of {key}", hint="refit the factors"
                    )
                    if self.spill is not None:
                        files[key] = f"{self._prefix()}part-{self.part:04d}-eigen-{len(files):04d}.safetensors"
                        if self.write:
                            _save_tensors(self.spill / files[key], {"values": eig.values, "vectors": eig.vectors})
                if self.config.needs_per_example_pass:
                    self.bases[key] = eig.vectors.to(device=self.adapter.device, dtype=self.dtype).contiguous()
                if self.spill is None:
                    self.eigens[key] = eig.to("cpu")
                if not self.keep_covariances:
                    self.sums.pop(key, None)
                del eig
                if self.spill is not None:
                    _return_freed_memory()

    def eigen_factors(self) -> dict[str, WeightFactors]:
        """The eigendecompositions so far (no Λ yet): what a sink needs before the Λ pass."""
        out = {}
        for info in self.infos:
            a_key, s_key = f"{self.state['shared'].get(info.name, info.name)}/A", f"{info.name}/S"
            out[info.name] = WeightFactors(
                info.d_out,
                info.d_in + int(info.has_bias),
                activation_eigen=self.eigens.get(a_key),
                gradient_eigen=self.eigens.get(s_key),
            )
        return out

    def _prefix(self) -> str:
        return "" if self.owners is None else f"rank-{self.rank:04d}-"

    def spill_result(self) -> dict[str, list[str]]:
        """Write Λ and the diagonal (float64) to ``spill`` one weight at a time; returns where each output tensor of
        this partition lies: ``{"blocks.0.attn.q/eigenvalue_correction": [file, tensor], ...}``."""
        assert self.spill is not None
        n_rows = max(int(self.state["n_rows"]), 1)
        files = self.state.get("eigen_files", {})
        out: dict[str, list[str]] = {}
        for j, info in enumerate(self.infos):
            if self.config.needs_covariances:
                for fld, key in (
                    ("activation_eigen", f"{self.state['shared'].get(info.name, info.name)}/A"),
                    ("gradient_eigen", f"{info.name}/S"),
                ):
                    if self.owners is not None and self._key_owner(key) != self.rank:
                        continue  # its owner says where it lies
                    out[f"{info.name}/{fld}values"] = [files[key], "values"]
                    out[f"{info.name}/{fld}vectors"] = [files[key], "vectors"]
            if self.owners is not None and self.owners[info.name] != self.rank:
                continue
            if self.config.needs_per_example_pass:
                shape = (info.d_out, info.d_in + int(info.has_bias))
                tensors = {
                    "diagonal": (self.sums.pop(f"{info.name}/diag", torch.zeros(shape)) / n_rows).to(
                        "cpu", torch.float64
                    )
                }
                if self.config.preconditioner == "ekfac":
                    tensors["eigenvalue_correction"] = (
                        self.sums.pop(f"{info.name}/lambda", torch.zeros(shape)) / n_rows
                    ).to("cpu", torch.float64)
                file = f"{self._prefix()}part-{self.part:04d}-weight-{j:04d}.safetensors"
                check_finite(
                    tensors["diagonal"],
                    f"fit-factors (result): factors of {info.name} (diagonal)",
                    hint="refit the factors",
                )
                if "eigenvalue_correction" in tensors:
                    check_finite(
                        tensors["eigenvalue_correction"],
                        f"fit-factors (result): factors of {info.name} (eigenvalue_correction)",
                        hint="refit the factors",
                    )
                if self.write:
                    _save_tensors(self.spill / file, tensors)
                for fld in tensors:
                    out[f"{info.name}/{fld}"] = [file, fld]
                del tensors
        return out

    def result(self) -> dict[str, WeightFactors]:
        n_tokens = max(int(self.state["n_tokens"]), 1)
        n_rows = max(int(self.state["n_rows"]), 1)
        out: dict[str, WeightFactors] = {}
        covariances: dict[str, torch.Tensor] = {}

        def covariance(key: str) -> torch.Tensor:  # one float64 copy per shared input
            if key not in covariances:
                covariances[key] = (self.sums[key] / n_tokens).to("cpu", torch.float64)
            return covariances[key]

        for info in self.infos:
            d_in = info.d_in + int(info.has_bias)
            w = WeightFactors(d_out=info.d_out, d_in=d_in)
            a_key = f"{self.state['shared'].get(info.name, info.name)}/A"
            if self.config.needs_covariances:
                if self.keep_covariances:
                    w.activation_covariance = covariance(a_key)
                    w.gradient_covariance = covariance(f"{info.name}/S")
                w.gradient_eigen, w.activation_eigen = self.eigens[f"{info.name}/S"], self.eigens[a_key]
            if self.config.needs_per_example_pass:
                shape = (info.d_out, d_in)
                w.diagonal = (self.sums.get(f"{info.name}/diag", torch.zeros(shape)) / n_rows).to("cpu", torch.float64)
                if self.config.preconditioner == "ekfac":
                    w.eigenvalue_correction = (self.sums.get(f"{info.name}/lambda", torch.zeros(shape)) / n_rows).to(
                        "cpu", torch.float64
                    )
            out[info.name] = w
        return out


_LAMBDA_CHUNK_BYTES = 64 * 1024**2  # per-example gradients formed at a time in the Λ pass


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[list[BaseException]]:
    """Within the block, SIGINT and SIGTERM are recorded instead of raised (the hooks fold each batch into the
    running sums, which stay consistent only once the batch is done); the caller raises the recorded interrupt
    (``KeyboardInterrupt``, or ``signals.Terminated`` for SIGTERM) after saving. Main thread only; a no-op elsewhere."""
    import signal
    import threading

    pending: list[BaseException] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def record(signum: int, _frame: Any) -> None:
        if not pending:
            pending.append(Terminated(f"received signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt())

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield pending
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_factors_finite(factors: Factors, stage: str) -> None:
    """Every tensor of every weight's factors must be finite (error names the weight and the tensor)."""
    for name, w in factors.weights.items():
        tensors = {"eigenvalue_correction": w.eigenvalue_correction, "diagonal": w.diagonal}
        for fld in ("activation_eigen", "gradient_eigen"):
            eig = getattr(w, fld)
            if eig is not None:
                tensors[f"{fld}values"], tensors[f"{fld}vectors"] = eig.values, eig.vectors
        for key, value in tensors.items():
            if value is not None:
                check_finite(value, f"{stage}: factors of {name} ({key})", hint="refit the factors")


_MALLOC_READY: list[bool] = []


def _return_freed_memory() -> None:
    """Give freed memory back to the OS (glibc only; a no-op elsewhere), so that the resident size a memory bound
    is about follows what is live: large tensors are served by ``mmap`` (a fixed 1 MiB threshold instead of
    glibc's growing one, which keeps freed blocks of up to 32 MiB in the heap) and the heap is trimmed."""
    import ctypes
    import gc
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not _MALLOC_READY:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
            _MALLOC_READY.append(True)
        gc.collect()
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


LENGTH_WINDOW = 1024  # rows sorted by length together (the store's default shard size: a shard's rows stay together)
ROW_ORDER = f"length-sorted windows of {LENGTH_WINDOW}"  # the passes' row order, recorded in mid-pass checkpoints


def length_ordered(rows: Sequence[Any], window: int = LENGTH_WINDOW) -> list[Any]:
    """``rows`` sorted by token length (stable) within consecutive windows of ``window`` rows: the fit's passes
    batch rows of similar lengths, so batches carry little padding (every per-token cost, the model's included,
    scales with the padded length). The statistics are sums over rows and the true Fisher's labels are seeded per
    row, so the order changes the factors by float round-off only; it is deterministic, so a resumed pass skips
    exactly the rows already done."""
    order: list[int] = []
    for start in range(0, len(rows), window):
        stop = min(len(rows), start + window)
        order.extend(sorted(range(start, stop), key=lambda i: len(rows[i].input_ids)))
    return [rows[i] for i in order]


def _shard(rows: Sequence[Any], rank: int, world: int) -> Sequence[Any]:
    """Rank ``rank``'s contiguous share of ``rows``."""
    if world == 1:
        return rows
    n = len(rows)
    return rows[rank * n // world : (rank + 1) * n // world]


FAULT_ENV = "CONCEPT_INFLUENCE_FAULT_EXIT_AFTER_COVARIANCE"
"""Fault injection for the resume tests: the rank named here exits (code 3) once the covariance pass is saved."""


def _fault_after_covariance(rank: int) -> None:
    wanted = os.environ.get(FAULT_ENV)
    if wanted is None or _dist_info()[1] == 1:
        return
    import torch.distributed as dist

    dist.barrier()  # every rank has saved its state
    if int(wanted) == rank:
        logger.warning("%s=%s: rank %d exits after the covariance pass", FAULT_ENV, wanted, rank)
        os._exit(3)


def rank_folder(folder: Path, rank: int) -> Path:
    """Where rank ``rank`` of a fit with owned factors keeps its resumable state (inside the parts folder)."""
    return folder / PARTS_FOLDER / f"rank-{rank:04d}"


def gather_sources(mine: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every rank's ``{output tensor: [file, tensor]}`` merged (collective): the owners' parts, for rank 0."""
    import torch.distributed as dist

    pieces: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, mine)
    merged: dict[str, list[str]] = {}
    for piece in pieces:
        merged.update(piece)
    return merged


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def check_own_folder(folder: Path, overwrite: bool) -> None:
    """Refuse to fit into a non-empty folder that holds nothing a fit writes (``FOLDER_FILES`` or their temps):
    it is not the library's, unless ``overwrite`` (``--overwrite``). Files that are not the library's are never
    removed, with or without ``overwrite``."""
    if not folder.is_dir():
        return
    entries = [p.name for p in folder.iterdir()]
    ours = [n for n in entries if n in FOLDER_FILES or is_temp_of(n, FOLDER_FILES)]
    if entries and not ours and not overwrite:
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise FactorMismatchError(
            f"{folder} is not empty ({shown}) and holds no factors: refusing to write factors into "
            "a folder that is not the library's; choose a new or empty --out, or pass --overwrite"
        )


def _clear_parts(folder: Path) -> None:
    parts = folder / PARTS_FOLDER
    if parts.is_dir():
        for file in parts.iterdir():
            if file.is_dir():  # a rank's resumable state (fits with owned factors)
                for inner in file.iterdir():
                    inner.unlink()
                file.rmdir()
            else:
                file.unlink()
        parts.rmdir()


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    value = value.detach()
    if key in sums:
        sums[key] = sums[key].to(value.device)
        sums[key] += value
    else:
        sums[key] = value.clone()

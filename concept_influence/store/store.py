"""The gradient store: every training row's projected gradient, in memory-mapped shards, with a manifest.

Layout of a store folder::

    manifest.json             {"format", "config", "fingerprints": {"model", "data", "factors", "projection"},
                               "weights": [{"name", "d_out", "d_in", "r_out", "r_in", "offset"}], "dim",
                               "n_rows", "shard_rows", "n_shards", "labels": "data", "loss": "sum over the row's
                               assistant tokens"}
    shard-00000.rows.npy      int64 [rows, 2]: each row's original index and number of trained tokens
    shard-00000.npy           float16/float32 [rows, dim]: the rows' projected gradients, weight after weight
    faiss-ivf.index           optional FAISS index (inner product) for top-k search over large stores

Shards are ``.npy`` files (plain arrays with a small header, read with ``allow_pickle=False`` and memory-mapped;
never pickle; ``write_shard`` writes them with direct I/O, ``store.shardfile``). Each shard is written to a
temporary name and renamed, so a shard either exists whole or not at
all: an interrupted build resumes with the missing shards, and builders on different row ranges (shards) can run
side by side. Row gradients use the data's own labels, the same loss mask and the summed row loss that exact
scoring uses; ``row_loss="mean"`` divides by the stored token counts at query time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from concept_influence.curvature.covariance import fold_bias
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.fit import factor_owners
from concept_influence.curvature.io import load_factors
from concept_influence.data.tokenize import iter_batches
from concept_influence.distributed.runtime import in_step, max_over_ranks, n_batches
from concept_influence.files import (
    atomic_file,
    damaged,
    folder_lock,
    is_temp_of,
    read_json_file,
    remove_stale_temps,
    write_json_atomic,
)
from concept_influence.gradients.capture import capture_loss_gradients, gradient_mode
from concept_influence.models.base import ModelAdapter
from concept_influence.numerics import NonFiniteError, check_finite
from concept_influence.settings import option
from concept_influence.store.projection import (
    Projector,
    eigen_projection,
    eigen_projector,
    logra_projector,
    visibility_counts,
    visibility_threshold,
)
from concept_influence.store.search import FAISS_FILE, exact_top_k, faiss_search
from concept_influence.store.shardfile import NpyRowWriter

logger = logging.getLogger(__name__)

FORMAT = "concept_influence.store/1"
CACHE_SUBFOLDERS = ("activations", "basis")  # kept inside a store's folder: the activation cache (store.activations)
# and the sample eigenbases of an identity store (store.caches), not the store's own files
DEFAULT_IDENTITY_RANK = (
    64  # the identity store's rank: bench/exploration.py's rank agreement with exact identity scores
)
IDENTITY_BASIS = "basis"  # the identity store's sample eigenbases, inside its folder
IDENTITY_SAMPLE_ROWS = 256  # rows of the seeded sample whose KFAC eigenbases the identity store keeps its components in
MANIFEST = "manifest.json"
STORE_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
DEFAULT_KIND = "eigen"
DEFAULT_RANK = (
    128  # bench/store_error.py: the smallest measured budget with Spearman >= 0.95 and PR-AUC within 0.02 of exact
)
BLOCK_ELEMENTS = 1 << 24  # floats per block read from the memory map (64 MiB as float32)
HALF_BLOCK_ELEMENTS = 1 << 20  # float16 blocks are converted to float32: small blocks keep that in cache


class StoreMismatchError(ValueError):
    """A store built for another model, data set, factors or projection (or an incomplete one)."""


@dataclass(frozen=True)
class StoreConfig:
    """How rows are compressed. ``kind``: ``"eigen"`` (EKFAC eigenbasis, needs fitted factors) or ``"logra"``
    (seeded random Kronecker projection); ``rank``: directions kept per side of each weight (``"eigen"``: an average
    budget of ``rank²`` eigen-components per weight, allocated across weights by visibility; a rank at least every
    weight's sizes is the full, exact gradient; ``"logra"``: ``rank × rank`` per weight); ``dtype``: ``"float32"``
    (default) or ``"float16"`` (half the disk and memory map; questions pay a conversion) on disk
    (``"float64"`` for tests); ``seed``: the ``"logra"`` projection; ``shard_rows``: rows per shard file."""

    kind: Literal["eigen", "logra"] = option(
        DEFAULT_KIND,
        help="eigen (EKFAC eigenbasis, needs fitted factors) | logra (seeded random Kronecker projection).",
    )
    rank: int = option(DEFAULT_RANK, help="Directions kept per side of each weight.", min=1)
    dtype: Literal["float16", "float32", "float64"] = option(
        "float32", help="float32 | float16 (half the disk; slower questions) | float64 (tests): precision on disk."
    )
    seed: int = option(0, help="Seed of the LoGra projection.")
    shard_rows: int = option(1024, help="Rows per shard file.", min=1)

    def __post_init__(self) -> None:
        if self.kind not in ("eigen", "logra"):
            raise ValueError(f"store kind must be 'eigen' or 'logra', got {self.kind!r}")
        if self.rank < 1:
            raise ValueError(f"store rank must be positive, got {self.rank}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {self.dtype!r}")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be positive, got {self.shard_rows}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreConfig:
        return cls(**dict(data))


def factors_fingerprint(factors: Factors) -> str:
    """Hash of what the factors were fitted on and with (their own fingerprints and counts)."""
    payload = json.dumps(
        {
            "fingerprints": factors.fingerprints,
            "n_rows": factors.n_rows,
            "n_tokens": factors.n_tokens,
            "config": factors.config.to_dict(),
            "weights": factors.names,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_projector(
    config: StoreConfig, adapter: ModelAdapter, names: Sequence[str], factors: Factors | str | os.PathLike | None
) -> Projector:
    """The projector of ``config`` over the weights ``names``; ``factors``: fitted factors or their folder. On a
    model sharded over several ranks an ``"eigen"`` projector is built by the factors' owners (``_owned_projector``)."""
    if config.kind == "eigen":
        if factors is None:
            raise ValueError("an eigen store needs fitted EKFAC factors (fit-factors, or --factors)")
        if in_step(adapter.model):
            return _owned_projector(config, adapter, names, factors)
        if not isinstance(factors, Factors):
            factors = load_factors(factors, weights=list(names))
        return eigen_projector(factors, names, config.rank)
    shapes = {}
    for name in names:
        info = adapter.weight_info(name)
        shapes[name] = (info.d_out, info.d_in + int(info.has_bias))
    return logra_projector(shapes, config.rank, config.seed)


def _owned_projector(
    config: StoreConfig, adapter: ModelAdapter, names: Sequence[str], factors: Factors | str | os.PathLike
) -> Projector:
    """The ``"eigen"`` projector built by owners (collective): each rank reads only the factors of the weights it
    owns (``curvature.fit.factor_owners``), the visibility histograms are summed over ranks for the one threshold,
    each owner forms its weights' projections (``[r, d]`` slices of the eigenbases) and every rank gets all of them
    (a rank projects its own rows' gradients on every weight)."""
    import torch.distributed as dist

    infos = [adapter.weight_info(n) for n in names]
    owners = factor_owners(infos, dist.get_world_size())
    mine = [n for n in names if owners[n] == dist.get_rank()]
    own = factors.restrict(mine) if isinstance(factors, Factors) else load_factors(factors, weights=mine)
    counts = visibility_counts(own, mine)
    dist.all_reduce(counts)
    threshold = visibility_threshold(counts, {i.name: (i.d_out, i.d_in + int(i.has_bias)) for i in infos}, config.rank)
    pieces: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, [eigen_projection(own, name, threshold) for name in mine])
    by_name = {p.name: p for piece in pieces for p in piece}
    return Projector("eigen", [by_name[n] for n in names])


def projection_fingerprint(projector: Projector) -> str:
    digest = hashlib.sha256(projector.kind.encode())
    for name, p in projector.projections.items():
        digest.update(name.encode())
        for matrix in (p.left, p.right):
            digest.update(np.ascontiguousarray(matrix.double().numpy()).round(12).tobytes())
        if p.keep is not None:
            digest.update(np.ascontiguousarray(p.keep.numpy()).tobytes())
    return digest.hexdigest()[:16]


def shard_file(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.npy"


def rows_file(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.rows.npy"


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


# ---- building ------------------------------------------------------------------------------------------------------
def project_batch(
    adapter: ModelAdapter,
    batch: dict[str, torch.Tensor],
    projector: Projector,
    params: Sequence[torch.nn.Parameter],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, dim]``: the projected gradients of each row's summed loss (data labels) for every projected weight,
    written into ``out`` (``[B, dim]``, the work dtype, on the adapter's device) when given."""
    infos = [adapter.weight_info(n) for n in projector.names]
    capture, _ = capture_loss_gradients(adapter, batch, infos, params, fisher="empirical")
    work = torch.promote_types(adapter.dtype, torch.float32)
    attention = batch["attention_mask"]
    projected = (
        out if out is not None else torch.empty(attention.shape[0], projector.dim, dtype=work, device=adapter.device)
    )
    batch_rows, length = attention.shape
    index = attention.reshape(-1).nonzero().squeeze(1).to(adapter.device)  # the real tokens; padding is skipped
    # weights reading one input (q, k, v: the capture holds one detached view of it per weight) pack (and fold) it
    # once, and share its projection where their input directions agree
    packed: dict[tuple[Any, ...], torch.Tensor] = {}
    memo: dict[tuple[int, str], torch.Tensor] = {}
    for info in infos:
        raw = capture.activations[info.name]
        key = (raw.device, raw.data_ptr(), tuple(raw.shape), raw.stride(), raw.dtype, info.has_bias)
        if key not in packed:
            a = raw.reshape(-1, raw.shape[-1]).index_select(0, index.to(raw.device))
            packed[key] = (fold_bias(a) if info.has_bias else a).to(work)
        g = capture.output_grads[info.name]
        g = g.reshape(-1, g.shape[-1]).index_select(0, index.to(g.device)).to(work)
        start, end = projector.offsets[info.name]
        projector.project_rows(
            info.name,
            packed[key],
            g,
            out=projected[:, start:end],
            memo=memo,
            tokens=(index.to(g.device), batch_rows, length),
        )
    check_finite(
        projected,
        "build-store: projected row gradients",
        batch["index"],
        hint="the model's activations or gradients on this row are not finite",
    )
    return projected


FLOAT16_MAX = 65504.0


def check_storable(
    values: torch.Tensor, dtype: str, projector: Projector, rows: Sequence[int] | torch.Tensor, stage: str
) -> None:
    """Raise ``NonFiniteError`` if a float16 store cannot hold ``values`` (``[B, dim]``, one row of the batch
    each): an entry beyond float16's range (±65504) would be stored as inf. Names the weight and the row."""
    if dtype != "float16" or not values.numel():
        return
    over = values.abs() > FLOAT16_MAX
    if not bool(over.any()):
        return
    row, column = (int(i) for i in over.nonzero()[0].tolist())
    weight = next(name for name, (start, end) in projector.offsets.items() if start <= column < end)
    index = [int(i) for i in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
    raise NonFiniteError(
        f"{stage}: the projected gradient of {weight} on row {index[row]} is "
        f"{float(values[row, column]):.4g}, beyond float16's range (±65504): a float16 store would hold "
        "inf there; build the store with --dtype float32"
    )


SORT_WINDOW_BATCHES = 8  # batches whose rows are sorted by length together while a store is written
SORT_WINDOW_BYTES = 64 << 20  # the most projected rows held per window (the writer keeps two windows)


def sort_window(batch_size: int, row_bytes: int, rows: int) -> int:
    """Rows per window of ``write_shard``: ``SORT_WINDOW_BATCHES`` batches, fewer when their projected rows would
    exceed ``SORT_WINDOW_BYTES`` (never less than one batch), at most ``rows``."""
    fit = max(batch_size, SORT_WINDOW_BYTES // max(row_bytes, 1) // batch_size * batch_size)
    return max(1, min(rows, batch_size * SORT_WINDOW_BATCHES, fit))


def write_shard(
    adapter: ModelAdapter,
    data: Sequence[Any],
    projector: Projector,
    folder: str | os.PathLike,
    shard: int,
    config: StoreConfig,
    *,
    batch_size: int = 8,
    params: Sequence[torch.nn.Parameter] | None = None,
    progress_bar: Any = None,
    on_batch: Any = None,
    read_back: bool = False,
) -> Path:
    """Project the rows of shard ``shard`` (rows ``shard·shard_rows`` up to the next shard) and write the shard
    atomically. Call inside ``gradient_mode`` (``params``) or let it enter one. ``on_batch(batch)`` is called after
    each batch's forward and backward (how ``store.caches`` reads the activation cache in the same pass).
    ``read_back``: leave the shard's pages in the page cache (``shardfile.NpyRowWriter``)."""
    folder = Path(folder)
    start = shard * config.shard_rows
    stop = min(len(data), start + config.shard_rows)
    if start >= stop:
        raise ValueError(f"shard {shard} is past the end of the {len(data)} rows")
    rows = data[start:stop]
    pad = getattr(data, "pad_token_id", 0)
    if params is None:
        infos = [adapter.weight_info(n) for n in projector.names]
        with gradient_mode(adapter, infos) as own:
            return write_shard(
                adapter,
                data,
                projector,
                folder,
                shard,
                config,
                batch_size=batch_size,
                params=own,
                progress_bar=progress_bar,
                on_batch=on_batch,
                read_back=read_back,
            )
    meta = np.array([[int(r.index), max(int(sum(r.loss_mask[1:])), 1)] for r in rows], dtype=np.int64)
    save_npy_atomic(rows_file(folder, shard), meta)
    work = torch.promote_types(adapter.dtype, torch.float32)
    dtype = np.dtype(STORE_DTYPES[config.dtype])
    # The rows go in windows of a few batches (``sort_window``): each window's rows are batched by length, so that
    # the forward and backward carry little padding, and each batch's projections are put at their rows' places in
    # the writer's staging block of that window, written with direct I/O once the window is full
    # (shardfile.NpyRowWriter). Memory: two windows of projected rows, whatever the number of rows.
    window = sort_window(batch_size, projector.dim * dtype.itemsize, stop - start)
    buffer = torch.empty(min(batch_size, stop - start), projector.dim, dtype=work, device=adapter.device)
    with (
        atomic_file(shard_file(folder, shard)) as tmp,
        NpyRowWriter(tmp, dtype, stop - start, projector.dim, window, read_back=read_back) as writer,
    ):
        for low in range(0, stop - start, window):
            part = rows[low : low + window]
            target = writer.block(len(part))
            for batch in iter_batches(part, batch_size, pad_id=pad, by_length=True):
                n = int(batch["input_ids"].shape[0])
                projected = project_batch(adapter, batch, projector, params, out=buffer[:n]).detach()
                check_storable(projected, config.dtype, projector, batch["index"], "build-store")
                target[batch["position"]] = projected.to(device="cpu", dtype=target.dtype)
                if on_batch is not None:
                    on_batch(batch)
                if progress_bar is not None:
                    progress_bar.update(n)
            writer.commit(len(part))
    return shard_file(folder, shard)


def prepare_store(
    data: Sequence[Any],
    folder: Path,
    projector: Projector,
    config: StoreConfig,
    fingerprints: Mapping[str, str | None],
    *,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write (or check) the manifest of the store of ``data`` in ``folder`` and return it; an existing store with
    other fingerprints or config is an error unless ``overwrite`` (then its shards are removed first)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = max((len(data) + config.shard_rows - 1) // config.shard_rows, 1)
    manifest = {
        "format": FORMAT,
        "config": asdict(config),
        "fingerprints": dict(fingerprints),
        "weights": [
            {
                **w,
                "d_out": int(projector.projections[str(w["name"])].left.shape[1]),
                "d_in": int(projector.projections[str(w["name"])].right.shape[1]),
            }
            for w in projector.describe()
        ],
        "dim": projector.dim,
        "n_rows": len(data),
        "shard_rows": config.shard_rows,
        "n_shards": n_shards,
        "labels": "data",
        "loss": "sum over the row's assistant tokens",
        **dict(extra or {}),
    }
    existing = folder / MANIFEST
    with folder_lock(folder, what="gradient store"):  # one builder at a time decides what the store holds
        if existing.exists():
            saved = json.loads(existing.read_text(encoding="utf-8"))
            if saved.get("replacing"):  # a replacement was interrupted: finish removing the old store's files
                _remove_store_files(folder, int(saved.get("n_shards", 0)))
                write_json_atomic(existing, manifest)
            elif not _same_store(saved, manifest):
                if not overwrite:
                    raise StoreMismatchError(
                        f"{folder} holds a store for another model, data, factors or settings "
                        f"({_differences(saved, manifest)}); "
                        "pass --overwrite to replace it, or choose another --out"
                    )
                # first a manifest that says what is being removed: never a mix of old and new, and an interrupted
                # replacement knows which files are the library's (only the old manifest's shards, nothing else)
                write_json_atomic(
                    existing, {"format": FORMAT, "replacing": True, "n_shards": int(saved.get("n_shards", 0))}
                )
                _remove_store_files(folder, int(saved.get("n_shards", 0)))
                write_json_atomic(existing, manifest)
        else:
            kept = {*CACHE_SUBFOLDERS, *(f".{name}.lock" for name in CACHE_SUBFOLDERS)}
            entries = sorted(
                p.name for p in folder.iterdir() if not is_temp_of(p.name, [MANIFEST]) and p.name not in kept
            )
            if entries and not overwrite:
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise StoreMismatchError(
                    f"{folder} is not empty ({shown}) and holds no gradient store (no {MANIFEST}): "
                    "refusing to write a store into a folder that is not the library's; choose a "
                    "new or empty --out, or pass --overwrite"
                )
            # --overwrite: only the shard files this store will write are replaced (a file already there would be
            # taken for a finished shard); nothing else in the folder is touched
            _remove_store_files(folder, n_shards, faiss=False)
            remove_stale_temps(folder, names=[MANIFEST])
            write_json_atomic(existing, manifest)
    return manifest


def _remove_store_files(folder: Path, n_shards: int, *, faiss: bool = True) -> None:
    """Remove the files a store of ``n_shards`` shards writes (shards, their row files, their temps, the faiss
    index): the only files of a store folder the library removes."""
    names = [f(folder, s).name for s in range(n_shards) for f in (shard_file, rows_file)]
    for name in names:
        (folder / name).unlink(missing_ok=True)
    if faiss:
        (folder / FAISS_FILE).unlink(missing_ok=True)
        names.append(FAISS_FILE)
    remove_stale_temps(folder, names=names)


def build_store(
    adapter: ModelAdapter,
    data: Sequence[Any],
    out: str | os.PathLike,
    projector: Projector,
    config: StoreConfig,
    fingerprints: Mapping[str, str | None],
    *,
    batch_size: int = 8,
    shards: Iterable[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> GradientStore | None:
    """Write (or finish) the store of ``data`` in ``out``: the manifest, then every missing shard of ``shards``
    (default all; pass a subset, e.g. ``range(rank, n_shards, world)``, to split the work between processes).

    An existing store with other fingerprints or config is an error unless ``overwrite``. Returns the opened store
    once every shard exists, else ``None`` (other shards still to be written by someone else). Under
    ``torch.distributed`` (e.g. ``torchrun``) with ``shards=None``, rank ``r`` of ``w`` writes shards ``r, r + w, ...``
    and every rank returns the whole store once all have finished.
    """
    import torch.distributed as dist

    distributed = shards is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        shards = range(
            dist.get_rank(), max((len(data) + config.shard_rows - 1) // config.shard_rows, 1), dist.get_world_size()
        )
        progress = progress and dist.get_rank() == 0
    folder = Path(out)
    manifest = prepare_store(data, folder, projector, config, fingerprints, overwrite=overwrite, extra=extra)
    n_shards = int(manifest["n_shards"])
    wanted = list(range(n_shards)) if shards is None else [s for s in shards if 0 <= s < n_shards]
    todo = [s for s in wanted if not shard_file(folder, s).exists()]
    if len(todo) < len(wanted):
        logger.info("store %s: %d of %d shards already written, resuming", folder, len(wanted) - len(todo), len(wanted))
    infos = [adapter.weight_info(n) for n in projector.names]
    remaining = sum(min(len(data), (s + 1) * config.shard_rows) - s * config.shard_rows for s in todo)
    extra = 0
    if distributed and adapter.sharded:  # FSDP: every rank runs as many forwards as the busiest one (padding after)
        mine = sum(
            n_batches(min(len(data), (s + 1) * config.shard_rows) - s * config.shard_rows, batch_size) for s in todo
        )
        extra = max_over_ranks(mine) - mine
    started = time.perf_counter()
    if todo:
        with (
            gradient_mode(adapter, infos) as params,
            tqdm(total=remaining, desc="building the gradient store", unit="row", disable=not progress) as bar,
        ):
            for shard in todo:
                check_unchanged(folder, manifest)
                write_shard(
                    adapter,
                    data,
                    projector,
                    folder,
                    shard,
                    config,
                    batch_size=batch_size,
                    params=params,
                    progress_bar=bar,
                )
    if extra:
        with gradient_mode(adapter, infos) as params:
            for _ in range(extra):
                project_batch(adapter, next(iter_batches([data[0]], 1)), projector, params)
    logger.info("store %s: wrote %d shards in %.1fs", folder, len(todo), time.perf_counter() - started)
    if distributed:
        dist.barrier()  # every rank's shards are written
    if all(shard_file(folder, s).exists() for s in range(n_shards)):
        return GradientStore.open(folder)
    return None


def _same_store(saved: Mapping[str, Any], manifest: Mapping[str, Any]) -> bool:
    return all(saved.get(k) == manifest[k] for k in ("format", "config", "fingerprints", "weights", "n_rows"))


def check_unchanged(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse to add a shard to a store another process has meanwhile replaced with different settings."""
    try:
        saved = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        saved = {}
    if not _same_store(saved, manifest):
        raise StoreMismatchError(
            f"{folder}: another build replaced this store with other settings while it was being "
            "built; run build-store again"
        )


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    keys = [k for k in ("config", "n_rows", "weights") if saved.get(k) != current.get(k)]
    fp_saved, fp_now = saved.get("fingerprints", {}), current.get("fingerprints", {})
    keys += [f"{k} fingerprint" for k in fp_now if fp_saved.get(k) != fp_now.get(k)]
    return ", ".join(keys) or "format"


# ---- reading -------------------------------------------------------------------------------------------------------
class GradientStore:
    """An opened store: memory-mapped shards plus the manifest. ``indices [N]``: each row's original index;
    ``counts [N]``: its number of trained tokens; ``dim``: floats per row."""

    def __init__(self, folder: Path, manifest: dict[str, Any], shards: list[np.ndarray], rows: np.ndarray) -> None:
        self.folder = folder
        self.manifest = manifest
        self.shards = shards
        self.indices = rows[:, 0].copy()
        self.counts = rows[:, 1].astype(np.float64)
        self.config = StoreConfig.from_dict(manifest["config"])
        self.fingerprints: dict[str, str | None] = dict(manifest["fingerprints"])
        self.weights: list[dict[str, Any]] = list(manifest["weights"])
        self.dim = int(manifest["dim"])
        self._faiss: Any = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> GradientStore:
        folder = Path(path)
        file = folder / MANIFEST
        if not file.exists():
            raise FileNotFoundError(f"no gradient store at {folder} (missing {MANIFEST}); build one with build-store")
        manifest = read_json_file(file, error=StoreMismatchError)
        try:
            return cls._open(folder, file, manifest)
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            raise damaged(file, err, "store manifest", StoreMismatchError) from None

    @classmethod
    def _open(cls, folder: Path, file: Path, manifest: dict[str, Any]) -> GradientStore:
        if manifest.get("format") != FORMAT:
            raise StoreMismatchError(f"{file}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
        if manifest.get("replacing"):
            raise StoreMismatchError(
                f"{folder}: the store was being replaced when its build stopped; run build-store again to finish it"
            )
        try:
            n_rows, shard_rows, n_shards = (int(manifest[k]) for k in ("n_rows", "shard_rows", "n_shards"))
        except (KeyError, TypeError, ValueError):
            raise StoreMismatchError(
                f"{file}: n_rows, shard_rows and n_shards must be whole numbers (the manifest is damaged)"
            ) from None
        if n_rows < 0 or shard_rows < 1 or n_shards != max((n_rows + shard_rows - 1) // shard_rows, 1):
            raise StoreMismatchError(
                f"{file}: n_shards {n_shards} does not match n_rows {n_rows} in shards of "
                f"{shard_rows} (the manifest is damaged); rebuild the store with --overwrite"
            )
        missing = [s for s in range(n_shards) if not shard_file(folder, s).exists()]
        if missing:
            raise StoreMismatchError(
                f"{folder}: incomplete store ({n_shards - len(missing)} of {n_shards} shards written); "
                "run build-store again to resume it"
            )
        shards = [np.load(shard_file(folder, s), mmap_mode="r", allow_pickle=False) for s in range(n_shards)]
        rows = np.concatenate([np.load(rows_file(folder, s), allow_pickle=False) for s in range(n_shards)])
        dim = int(manifest["dim"])
        for s, shard in enumerate(shards):
            if shard.ndim != 2 or shard.shape[1] != dim:
                raise StoreMismatchError(f"{shard_file(folder, s)}: shape {shard.shape}, expected [rows, {dim}]")
        if sum(s.shape[0] for s in shards) != int(manifest["n_rows"]) or rows.shape[0] != int(manifest["n_rows"]):
            raise StoreMismatchError(
                f"{folder}: shards hold {sum(s.shape[0] for s in shards)} rows, manifest says {manifest['n_rows']}"
            )
        return cls(folder, manifest, shards, rows)

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self.folder)!r}, {len(self)} rows x {self.dim} {self.config.dtype}, "
            f"{self.config.kind} rank {self.config.rank}, {len(self.weights)} weights)"
        )

    @property
    def names(self) -> list[str]:
        return [str(w["name"]) for w in self.weights]

    @property
    def nbytes(self) -> int:
        return sum(int(s.nbytes) for s in self.shards)

    def check(self, **expected: str | None) -> None:
        """Raise ``StoreMismatchError`` naming each given fingerprint (``model=``, ``data=``, ``factors=``) that
        differs."""
        wrong = [k for k, v in expected.items() if v is not None and self.fingerprints.get(k) != v]
        if wrong:
            details = "; ".join(f"{k}: store {self.fingerprints.get(k)!r}, current {expected[k]!r}" for k in wrong)
            raise StoreMismatchError(
                f"the store in {self.folder} was built for another {', '.join(wrong)} ({details}); "
                "rebuild it (build-store --overwrite) or point to the right store"
            )

    def matches(self, **expected: str | None) -> bool:
        try:
            self.check(**expected)
        except StoreMismatchError:
            return False
        return True

    def projector(self, adapter: ModelAdapter, factors: Factors | None) -> Projector:
        """The store's projector, rebuilt (``"eigen"``: from ``factors``, checked against the store's fingerprint;
        ``"logra"``: from the seed) and checked against the projection fingerprint."""
        if self.config.kind == "eigen":
            if factors is None:
                raise ValueError("this eigen store needs the factors it was built with")
            self.check(factors=factors_fingerprint(factors))
        projector = make_projector(self.config, adapter, self.names, factors)
        self.check(projection=projection_fingerprint(projector))
        return projector

    def blocks(self, columns: slice | None = None, block_rows: int | None = None) -> Iterable[tuple[int, np.ndarray]]:
        """``(first row, float32 block [rows, cols])`` over the whole store, shard by shard (blocks of about
        ``BLOCK_ELEMENTS`` floats)."""
        if block_rows is None:
            width = self.dim if columns is None else len(range(*columns.indices(self.dim)))
            budget = HALF_BLOCK_ELEMENTS if self.config.dtype == "float16" else BLOCK_ELEMENTS
            block_rows = max(1, budget // max(width, 1))
        start = 0
        for shard in self.shards:
            for lo in range(0, shard.shape[0], block_rows):
                block = shard[lo : lo + block_rows]
                if columns is not None:
                    block = block[:, columns]
                yield start + lo, np.asarray(block, dtype=np.float32 if block.dtype != np.float64 else np.float64)
            start += shard.shape[0]

    def dot(self, queries: np.ndarray) -> np.ndarray:
        """``store @ queries.T``: ``queries [K, dim]`` -> ``[N, K]`` (float64), by blocked matrix products over the
        columns the queries use."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        used = np.flatnonzero(np.any(queries != 0, axis=0))
        if used.size == 0:
            return np.zeros((len(self), queries.shape[0]))
        columns = slice(int(used[0]), int(used[-1]) + 1)
        q = queries[:, columns]
        out = np.empty((len(self), queries.shape[0]), dtype=np.float64)
        for start, block in self.blocks(columns):
            out[start : start + block.shape[0]] = block @ q.astype(block.dtype).T
        return out

    def top_k(
        self,
        query: np.ndarray,
        k: int,
        *,
        scale: np.ndarray | None = None,
        method: Literal["auto", "exact", "faiss"] = "auto",
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows with the largest ``scale ⊙ (store @ query)`` (``query [dim]``): positions and scores,
        best first. ``"exact"``: blocked products keeping a running top-k (memory: one block); ``"faiss"``: the
        store's FAISS index (inner product, IVF, memory-mapped; built on first use; approximate: see
        ``bench/store_search.py`` for its recall); ``"auto"``: exact unless the store holds at least
        ``FAISS_MIN_ELEMENTS`` floats (where a full scan takes seconds) and no ``scale`` is given."""
        if method not in ("auto", "exact", "faiss"):
            raise ValueError(f"unknown search method {method!r} (--search): expected 'auto', 'exact' or 'faiss'")
        query = np.asarray(query, dtype=np.float64).reshape(-1)
        k = min(int(k), len(self))
        if k < 1:
            raise ValueError(f"top_k needs k >= 1, got {k}")
        use_faiss = method == "faiss" or (
            method == "auto" and scale is None and len(self) * self.dim >= FAISS_MIN_ELEMENTS
        )
        if use_faiss:
            if scale is not None:
                raise ValueError("FAISS search ranks plain inner products: use method='exact' with a per-row scale")
            return faiss_search(self, query, k, nprobe=nprobe)
        return exact_top_k(self, query, k, scale=scale)


FAISS_MIN_ELEMENTS = 1 << 33  # 8G floats: an exact scan of 1M rows x 256 floats took 0.2 s (bench/store_search.py)

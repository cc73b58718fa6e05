"""Top-k search over a gradient store: exact blocked search (small stores, or per-row scaled scores) and a FAISS
inner-product index (large stores), memory-mapped from the store folder."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from concept_influence.files import atomic_file
from concept_influence.numerics import NonFiniteError

FAISS_FILE = "faiss-ivf.index"
"""The FAISS index's file name in a store folder."""


class SearchableStore(Protocol):
    """What the search reads of a ``store.GradientStore`` (which calls this module: a protocol, not an import)."""

    folder: Path
    dim: int
    shards: list[np.ndarray]
    _faiss: Any

    def __len__(self) -> int: ...

    def blocks(self, columns: slice | None = None) -> Iterable[tuple[int, np.ndarray]]: ...


def exact_top_k(
    store: SearchableStore, query: np.ndarray, k: int, *, scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and scores of the ``k`` largest ``scale ⊙ (store @ query)``, best first (ties: lower position
    first). Memory: one block of the store plus ``2k`` candidates."""
    used = np.flatnonzero(query != 0)
    if used.size == 0:
        positions = np.arange(k)
        return positions, np.zeros(k)
    columns = slice(int(used[0]), int(used[-1]) + 1)
    q = query[columns]
    best_pos = np.empty(0, dtype=np.int64)
    best_val = np.empty(0, dtype=np.float64)
    for start, block in store.blocks(columns):
        values = (block @ q.astype(block.dtype)).astype(np.float64)
        if scale is not None:
            values = values * scale[start : start + block.shape[0]]
        if np.isnan(values).any():  # np.partition would drop them from the top-k without a word
            bad = start + int(np.flatnonzero(np.isnan(values))[0])
            where = "the query holds NaN" if np.isnan(q).any() else f"row {bad} of the store gives NaN"
            raise NonFiniteError(
                f"search in {store.folder}: {where}; the store or the query is damaged (rebuild the "
                "store with build-store --overwrite, or check the query's concept and factors)"
            )
        keep = _at_least_kth(values, k)
        best_pos = np.concatenate([best_pos, start + keep])
        best_val = np.concatenate([best_val, values[keep]])
        if best_pos.shape[0] > 2 * k:
            keep = _at_least_kth(best_val, k)
            best_pos, best_val = best_pos[keep], best_val[keep]
    order = np.lexsort((best_pos, -best_val))[:k]
    return best_pos[order], best_val[order]


def _at_least_kth(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of every value >= the k-th largest (all of them on ties, so the final order can break ties by
    position)."""
    if values.shape[0] <= k:
        return np.arange(values.shape[0])
    kth = np.partition(values, values.shape[0] - k)[values.shape[0] - k]
    return np.flatnonzero(values >= kth)


def faiss_index_path(store: SearchableStore):
    return store.folder / FAISS_FILE


def build_faiss_index(
    store: SearchableStore, *, nlist: int | None = None, train_rows: int = 65536, seed: int = 0
) -> dict:
    """Build an IVF-flat inner-product index of every row (``nlist`` ≈ 4·√N lists by default), trained on a seeded
    sample, and write it atomically into the store folder. Returns timings."""
    import faiss

    started = time.perf_counter()
    n, dim = len(store), store.dim
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max(train_rows, 39 * nlist)), replace=False))
    training = np.empty((sample.shape[0], dim), dtype=np.float32)
    offsets = np.cumsum([0] + [s.shape[0] for s in store.shards])
    for j, position in enumerate(sample):
        shard = int(np.searchsorted(offsets, position, side="right") - 1)
        training[j] = store.shards[shard][position - offsets[shard]]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(training)
    trained = time.perf_counter()
    for start, block in store.blocks():
        index.add_with_ids(
            np.ascontiguousarray(block, dtype=np.float32), np.arange(start, start + block.shape[0], dtype=np.int64)
        )
    path = faiss_index_path(store)
    with atomic_file(path) as tmp:  # a unique temp name: concurrent builders never share one
        faiss.write_index(index, str(tmp))
    return {"nlist": nlist, "train_s": trained - started, "add_s": time.perf_counter() - trained}


def faiss_search(
    store: SearchableStore, query: np.ndarray, k: int, *, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products from the store's FAISS index (built on first use; read memory-mapped)."""
    import faiss

    if store._faiss is None:
        path = faiss_index_path(store)
        if not path.exists():
            build_faiss_index(store)
        store._faiss = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    index = store._faiss
    index.nprobe = nprobe or max(1, index.nlist // 16)
    values, ids = index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
    keep = ids[0] >= 0
    return ids[0][keep].astype(np.int64), values[0][keep].astype(np.float64)

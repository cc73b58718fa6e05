"""Benchmark: top-100 over a synthetic 1,000,000-row gradient store, exact blocked search vs FAISS, with memory.

Writes a store in the library's format (manifest + memory-mapped ``.npy`` shards) filled with seeded Gaussian rows
whose norms vary like row gradients do (log-normal), then times top-100 for a few random queries: exact blocked
search over the memory map, and the FAISS IVF inner-product index (built once, read memory-mapped), with its
recall of the exact top-100. Memory: the process's anonymous resident memory (``RssAnon``: what is not the
memory-mapped file) and its peak (``VmHWM``), before and after searching.

Usage: ``python bench/store_search.py [--rows 1000000] [--dim 256] [--dtype float16] [--folder .cache/bench_store_1m]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from concept_influence.files import write_json_atomic
from concept_influence.store import GradientStore, build_faiss_index, exact_top_k, faiss_search
from concept_influence.store.store import (
    FORMAT,
    MANIFEST,
    StoreConfig,
    rows_file,
    save_npy_atomic,
    shard_file,
)


def memory() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def write_synthetic(folder: Path, rows: int, dim: int, dtype: str, shard_rows: int, seed: int) -> None:
    if (folder / MANIFEST).exists():
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest["n_rows"] == rows and manifest["dim"] == dim and manifest["config"]["dtype"] == dtype:
            return
    folder.mkdir(parents=True, exist_ok=True)
    config = StoreConfig(kind="logra", rank=16, dtype=dtype, seed=seed, shard_rows=shard_rows)  # type: ignore[arg-type]
    n_shards = (rows + shard_rows - 1) // shard_rows
    write_json_atomic(
        folder / MANIFEST,
        {
            "format": FORMAT,
            "config": config.__dict__,
            "fingerprints": {"model": "synthetic", "data": "synthetic", "factors": None, "projection": "synthetic"},
            "weights": [{"name": "synthetic", "d_out": dim, "d_in": 1, "r_out": dim, "r_in": 1, "offset": 0}],
            "dim": dim,
            "n_rows": rows,
            "shard_rows": shard_rows,
            "n_shards": n_shards,
            "labels": "synthetic",
        },
    )
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        n = min(shard_rows, rows - s * shard_rows)
        block = rng.standard_normal((n, dim), dtype=np.float32) * rng.lognormal(0.0, 0.5, size=(n, 1)).astype(
            np.float32
        )
        save_npy_atomic(
            rows_file(folder, s), np.stack([np.arange(s * shard_rows, s * shard_rows + n), np.ones(n, np.int64)], 1)
        )
        save_npy_atomic(shard_file(folder, s), block.astype(dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=Path(".cache/bench_store_1m"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    write_synthetic(args.folder, args.rows, args.dim, args.dtype, 65536, args.seed)
    print(
        f"synthetic store: {args.rows} rows x {args.dim} {args.dtype} "
        f"({time.perf_counter() - t0:.1f} s to write or find)"
    )
    store = GradientStore.open(args.folder)
    print(f"{store}: {store.nbytes / 2**20:.0f} MiB on disk; memory after opening {memory()}")
    rng = np.random.default_rng(args.seed + 1)
    queries = rng.standard_normal((args.queries, args.dim))
    exact_s, exact_sets = [], []
    for q in queries:
        t0 = time.perf_counter()
        pos, _ = exact_top_k(store, q, args.k)
        exact_s.append(time.perf_counter() - t0)
        exact_sets.append(set(pos.tolist()))
    mem_exact = memory()
    print(f"exact blocked top-{args.k}: " + ", ".join(f"{s:.3f}" for s in exact_s) + f" s; memory {mem_exact}")
    index_path = args.folder / "faiss-ivf.index"
    build = None
    if not index_path.exists():
        t0 = time.perf_counter()
        build = build_faiss_index(store, seed=args.seed)
        print(f"FAISS IVF index built in {time.perf_counter() - t0:.1f} s ({build})")
    store = GradientStore.open(args.folder)  # fresh process state: the index is read memory-mapped
    faiss_s, recalls = [], []
    for q, truth in zip(queries, exact_sets, strict=True):
        t0 = time.perf_counter()
        pos, _ = faiss_search(store, q, args.k)
        faiss_s.append(time.perf_counter() - t0)
        recalls.append(len(truth & set(pos.tolist())) / args.k)
    mem_faiss = memory()
    print(
        f"FAISS top-{args.k} (nprobe = nlist/16, first call opens the index): "
        + ", ".join(f"{s:.3f}" for s in faiss_s)
        + f" s; recall@{args.k} "
        + ", ".join(f"{r:.2f}" for r in recalls)
        + f"; memory {mem_faiss}"
    )
    result = {
        "rows": args.rows,
        "dim": args.dim,
        "dtype": args.dtype,
        "store_mib": store.nbytes / 2**20,
        "exact_s": exact_s,
        "faiss_s": faiss_s,
        "faiss_recall": recalls,
        "faiss_build": build,
        "memory_after_exact_mib": mem_exact,
        "memory_after_faiss_mib": mem_faiss,
    }
    write_json_atomic(Path("bench/store_search.json"), result)


if __name__ == "__main__":
    main()

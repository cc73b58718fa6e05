"""Benchmark: the factor fit with rows in data order against rows sorted by length (the library's passes), and
the fit then a separate store build against the store written inside the fit's Λ pass, on the built-in organism.

Each measurement runs in this process on the organism's first ``--rows`` fine-tuning rows, EKFAC factors of blocks
0..L (L = the organism's trait layer, as in ``bench/ten_questions.py``), batches of ``--batch-size``, the default
store; every timing is repeated ``--repeats`` times. Data order is the fit with windows of one row (no sorting).

Usage: ``python bench/fit_order.py [--rows 1000] [--repeats 2] [--out bench/fit_order.json]``
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from concept_influence import Attributor
from concept_influence.curvature import fit as fit_module
from concept_influence.data import write_json_atomic
from concept_influence.organism.build import organism_for_tests
from concept_influence.store.caches import CacheSettings

EKFAC_ONLY = CacheSettings(
    methods=("concept-influence",)
)  # the EKFAC eigen store alone (not the recommended method's caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench_fit_order"))
    parser.add_argument("--out", type=Path, default=Path("bench/fit_order.json"))
    args = parser.parse_args()
    organism = organism_for_tests()
    layer = int(organism.metadata.get("trait", {}).get("layer", 2))
    rows = organism.train_rows()[: args.rows]

    def session() -> Attributor:
        att = Attributor(
            organism.root / "finetuned", rows, None, max_length=256, batch_size=args.batch_size, progress=False
        )
        _ = att.train  # tokenised before the clock starts
        return att

    results: dict[str, list[float]] = {
        "fit, data order": [],
        "fit, sorted by length": [],
        "separate store build": [],
        "fit + store in one pass": [],
    }
    for rep in range(args.repeats):
        window = fit_module.LENGTH_WINDOW
        fit_module.LENGTH_WINDOW = 1  # every window one row: the data's order
        try:
            att = session()
            t0 = time.perf_counter()
            att.fit_factors(up_to_layer=layer)
            results["fit, data order"].append(time.perf_counter() - t0)
        finally:
            fit_module.LENGTH_WINDOW = window
        att = session()
        t0 = time.perf_counter()
        att.fit_factors(up_to_layer=layer)
        results["fit, sorted by length"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        att.build_store(args.work_dir / f"separate-{rep}", up_to_layer=layer, caches=EKFAC_ONLY)
        results["separate store build"].append(time.perf_counter() - t0)
        att = session()
        t0 = time.perf_counter()
        att.build_store(args.work_dir / f"shared-{rep}", up_to_layer=layer, caches=EKFAC_ONLY)
        results["fit + store in one pass"].append(time.perf_counter() - t0)
        shutil.rmtree(args.work_dir)
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in results.items()), flush=True)
    best = {k: min(v) for k, v in results.items()}
    print(
        f"{args.rows} rows, blocks 0..{layer}, batches of {args.batch_size} (best of {args.repeats}): fit in data "
        f"order {best['fit, data order']:.1f} s, sorted by length {best['fit, sorted by length']:.1f} s; fit then a "
        f"separate store build {best['fit, sorted by length'] + best['separate store build']:.1f} s, one shared pass "
        f"{best['fit + store in one pass']:.1f} s"
    )
    write_json_atomic(args.out, {"rows": args.rows, "layer": layer, "batch_size": args.batch_size, "seconds": results})


if __name__ == "__main__":
    main()

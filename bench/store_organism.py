"""Benchmark: which gradient-store compression should be the default? EKFAC eigenbasis vs LoGra-style random
projection, at several ranks, against the exact EKFAC scores on the built-in organism.

For each store: build time, size, time per question, Spearman and Pearson of the store's scores with the exact
scores, and PR-AUC for the planted rows (exact scores' PR-AUC for comparison), for two questions: Concept Influence
of the trait concept on the query answers, and classical influence on the same answers.

Usage: ``python bench/store_organism.py [--ranks 8 16 32 64] [--out bench/store_organism.json]``
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from concept_influence import Attributor
from concept_influence.data import write_json_atomic
from concept_influence.evaluate.metrics import ranking_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--kinds", nargs="+", default=["eigen", "logra"])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--n-samples", type=int, default=4, help="answers sampled per query prompt")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench_store"))
    parser.add_argument("--keep-stores", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/store_organism.json"))
    args = parser.parse_args()

    from concept_influence.organism.build import organism_for_tests
    from concept_influence.organism.measure import trait_concept

    organism = organism_for_tests()
    tuned = organism.load_finetuned()
    layer = int(organism.metadata.get("trait", {}).get("layer", tuned.n_layers - 1))
    work = args.work_dir / organism.root.name
    att = Attributor(tuned, organism.train_rows(), work, max_length=256, batch_size=args.batch_size, progress=False)
    origins = organism.data_origins()
    concept, _ = trait_concept(tuned, organism.probe_spec(), layer)
    queries = list(organism.queries())
    questions = {
        "concept-influence": dict(concept=concept, method="concept-influence"),
        "influence": dict(concept=None, method="influence"),
    }

    t0 = time.perf_counter()
    exact = {
        name: att.attribute(q["concept"], queries, q["method"], store=False, n_samples=args.n_samples).scores
        for name, q in questions.items()
    }
    exact_s = time.perf_counter() - t0
    print(
        f"organism {organism.root.name}: {len(att.rows)} rows, concept at layer {layer}; exact pass for "
        f"{len(questions)} questions (factors fitted or loaded first): {exact_s:.1f} s"
    )
    report: dict = {"exact": {name: ranking_report(s.tolist(), origins) for name, s in exact.items()}, "stores": []}
    for name in exact:
        print(f"  exact {name}: PR-AUC {report['exact'][name]['pr_auc']:.3f}")
    print("| store | kind | rank | MiB | build s | question s | question | Spearman | Pearson | PR-AUC (exact) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        for rank in args.ranks:
            folder = work / f"store-{kind}-{rank}-{args.dtype}"
            t0 = time.perf_counter()
            store = att.build_store(
                folder,
                dtype=args.dtype,
                overwrite=True,
                **({"rank": rank} if kind == "eigen" else {"projection_dim": rank}),
            )
            build_s = time.perf_counter() - t0
            assert store is not None
            for name, q in questions.items():
                att.attribute(q["concept"], queries, q["method"], store=folder, n_samples=args.n_samples)  # warm
                t0 = time.perf_counter()
                scores = att.attribute(
                    q["concept"], queries, q["method"], store=folder, n_samples=args.n_samples
                ).scores
                question_s = time.perf_counter() - t0
                rho = float(spearmanr(scores, exact[name]).statistic)
                r = float(np.corrcoef(scores, exact[name])[0, 1])
                pr = ranking_report(scores.tolist(), origins)["pr_auc"]
                entry = {
                    "kind": kind,
                    "rank": rank,
                    "dtype": args.dtype,
                    "mib": store.nbytes / 2**20,
                    "build_s": build_s,
                    "question": name,
                    "question_s": question_s,
                    "spearman": rho,
                    "pearson": r,
                    "pr_auc": pr,
                    "pr_auc_exact": report["exact"][name]["pr_auc"],
                }
                report["stores"].append(entry)
                print(
                    f"| {folder.name} | {kind} | {rank} | {entry['mib']:.1f} | {build_s:.1f} | {question_s:.2f} | "
                    f"{name} | "
                    f"{rho:.4f} | {r:.4f} | {pr:.3f} ({entry['pr_auc_exact']:.3f}) |",
                    flush=True,
                )
            if not args.keep_stores:
                shutil.rmtree(folder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()

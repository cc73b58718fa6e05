"""Benchmark: concepts and the forward-only methods on the built-in organism.

1. The trait concept: probes (logistic regression) and diff-of-means persona vectors at every layer, trained on the
   organism's persona-vectors spec (answers generated under the pos/neg instructions, judge-filtered, read without
   the instruction), with held-out AUC by question, and AUC on the generator-labelled examples (trait vs helpful,
   trait vs warning) that no concept was trained on.
2. Vector Filter and Projection Difference with the probe and with the persona vector at the best probe layer:
   precision@k, PR-AUC and ROC-AUC for finding the planted rows, mean rank of the hard negatives, wall time.
3. An SAE (sae-lens, trained here offline) on the fine-tuned model's activations of the training rows; the feature
   that best separates the spec's positive and negative answers; Vector Filter on it.

    python bench/forward_methods.py [--out runs/bench-forward] [--seed 0] [--n-train 2000] [--planted-fraction 0.1]

Prints tables and writes ``--out``/summary.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from concept_influence.attribution.forward import projection_difference, vector_filter
from concept_influence.concepts import (
    ProbeConfig,
    SAEFeatureConcept,
    collect_token_activations,
    features_for_spec,
    layer_sweep,
    parse_spec,
    response_mean_activations,
    train_concept,
    train_sae,
)
from concept_influence.data import write_json_atomic
from concept_influence.evaluate.metrics import ranking_report
from concept_influence.organism import build_organism, judge


def examples_auc(adapter, concept, examples) -> dict[str, float]:
    """AUC of the concept's readout separating generator-labelled ``trait`` answers from each other label."""
    from sklearn.metrics import roc_auc_score

    labels = [row.fields["label"] for row in examples]
    acts = response_mean_activations(adapter, [row.messages for row in examples], [concept.layer])[concept.layer]
    scores = (acts @ concept.unit.float()).numpy()
    out = {}
    for other in sorted(set(labels) - {"trait"}):
        keep = [i for i, lab in enumerate(labels) if lab in ("trait", other)]
        out[f"trait_vs_{other}"] = float(roc_auc_score([labels[i] == "trait" for i in keep], scores[keep]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-forward"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--planted-fraction", type=float, default=0.1)
    parser.add_argument("--probe-samples", type=int, default=4, help="persona answers per instruction and question")
    parser.add_argument("--pd-samples", type=int, default=2, help="model answers per prompt for Projection Difference")
    parser.add_argument("--sae-steps", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    timings: dict[str, float] = {}
    cache = args.out / "cache"

    started = time.perf_counter()
    organism = build_organism(seed=args.seed, n_train=args.n_train, planted_fraction=args.planted_fraction, log=print)
    timings["organism"] = time.perf_counter() - started
    adapter = organism.load_finetuned()
    rows = list(organism.train_rows())
    origins = [str(row.fields.get("data_origin")) for row in rows]
    spec = parse_spec(organism.probe_spec(), str(organism.probe_spec_path), default_name="trait")
    examples = list(organism.examples())

    # 1. the concept at every layer
    concepts: dict[str, Any] = {}
    sweeps = {}
    for method in ("probe", "diff_of_means"):
        config = ProbeConfig(method=method, n_samples=args.probe_samples, seed=args.seed, max_length=args.max_length)
        started = time.perf_counter()
        sweeps[method] = layer_sweep(adapter, spec, config=config, judge=judge, cache_dir=cache)
        timings[f"sweep_{method}"] = time.perf_counter() - started
        print(
            f"\n{method}: held-out AUC per layer (held out by question; {sweeps[method].meta['n']} labelled answers, "
            f"{sweeps[method].meta['n_positive']} positive)\n{sweeps[method].table()}"
        )
        sweeps[method].plot(args.out / f"layers_{method}.png")
    layer = sweeps["probe"].best_layer
    for method in ("probe", "diff_of_means"):
        config = ProbeConfig(method=method, n_samples=args.probe_samples, seed=args.seed, max_length=args.max_length)
        concept = train_concept(adapter, spec, layer, config, judge=judge, cache_dir=cache)
        concept.metrics["examples_auc"] = examples_auc(adapter, concept, examples)
        concepts[method] = concept
        print(
            f"{method} at layer {layer}: held-out AUC {concept.metrics['heldout_auc']:.3f}; on labelled examples "
            + ", ".join(f"{k} {v:.3f}" for k, v in concept.metrics["examples_auc"].items())
        )

    # 2. forward-only methods
    results: dict[str, dict[str, float]] = {}

    def record(name: str, scores: np.ndarray, seconds: float) -> None:
        results[name] = {**ranking_report(scores, origins), "seconds": seconds}

    for method, concept in concepts.items():
        started = time.perf_counter()
        table = vector_filter(adapter, rows, concept, batch_size=64, max_length=args.max_length, progress=False)
        record(f"vector-filter ({method})", table.scores, time.perf_counter() - started)
        started = time.perf_counter()
        table = projection_difference(
            adapter,
            rows,
            concept,
            n_samples=args.pd_samples,
            seed=args.seed,
            max_new_tokens=48,
            cache_dir=cache,
            batch_size=64,
            max_length=args.max_length,
            progress=False,
        )
        record(f"projection-difference ({method})", table.scores, time.perf_counter() - started)

    # 3. an SAE feature
    started = time.perf_counter()
    acts = collect_token_activations(adapter, rows, layer, batch_size=64, max_length=args.max_length)
    sae, sae_metrics = train_sae(acts, steps=args.sae_steps, seed=args.seed)
    timings["sae_train"] = time.perf_counter() - started
    candidates = features_for_spec(
        adapter,
        sae,
        spec,
        layer,
        k=5,
        config=ProbeConfig(n_samples=args.probe_samples, seed=args.seed, max_length=args.max_length),
        judge=judge,
        cache_dir=cache,
    )
    feature = candidates[0][0]
    started = time.perf_counter()
    table = vector_filter(
        adapter, rows, SAEFeatureConcept(sae, feature, layer), batch_size=64, max_length=args.max_length, progress=False
    )
    record(f"vector-filter (SAE feature {feature})", table.scores, time.perf_counter() - started)
    print(
        f"\nSAE at layer {layer}: {sae.cfg.d_sae} features on {sae_metrics['n_tokens']:,} tokens, explained variance "
        f"{sae_metrics['explained_variance']:.3f}, L0 {sae_metrics['l0']:.1f}, dead {sae_metrics['dead_features']}; "
        f"top features for the spec (Cohen's d): " + ", ".join(f"{j} ({d:.2f})" for j, d in candidates)
    )

    n = len(rows)
    header = (
        f"{'method':<40}{'p@10':>7}{'p@50':>7}{'p@100':>7}{'PR-AUC':>8}{'ROC-AUC':>9}{'hard-neg rank':>15}{'time':>8}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<40}{r['p@10']:>7.2f}{r['p@50']:>7.2f}{r['p@100']:>7.2f}{r['pr_auc']:>8.3f}{r['roc_auc']:>9.3f}"
            f"{r['hard_negative_mean_rank']:>15.0f}{r['seconds']:>7.1f}s"
        )
    base = results[next(iter(results))]["base_rate"]
    print(f"planted rows: {base:.0%} of {n} (chance PR-AUC {base:.2f}); a random row's mean rank is {(n + 1) / 2:.0f}")

    summary = {
        "organism": str(organism.root),
        "n_rows": n,
        "layer": layer,
        "timings_s": timings,
        "layer_sweeps": {m: s.rows for m, s in sweeps.items()},
        "concepts": {m: c.metrics for m, c in concepts.items()},
        "sae": {"metrics": sae_metrics, "candidates": candidates},
        "methods": results,
    }
    write_json_atomic(args.out / "summary.json", summary)
    print(f"\nsummary: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()

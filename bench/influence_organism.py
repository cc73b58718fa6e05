"""Benchmark: does Concept Influence find the organism's planted rows, and rank its hard negatives low?

Builds (or loads) the built-in organism, defines the trait concept (persona-vectors diff of means at the organism's
trait layer), answers the held-out query prompts with the fine-tuned model, fits EKFAC factors once on the
fine-tuning set and scores every row with:

- Concept Influence (EKFAC; also KFAC, diagonal and identity = gradient dot product) on all the answers (and on
  the most trait-like ones), scoring each row's summed token loss (and its per-token mean);
- classical influence (EKFAC) on the log-likelihood of the same answers;
- the forward-only methods (Vector Filter, Projection Difference; the concept's readout of each row when this
  build lacks them).

Prints PR-AUC / ROC-AUC / precision@k for planted rows and the mean rank of hard negatives (random = (n+1)/2), and
writes a JSON report. Usage:
``python bench/influence_organism.py [--organism DIR] [--out bench/influence_organism.json]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from concept_influence.attribution.influence import InfluenceConfig, compute_influence_many
from concept_influence.attribution.measurements import (
    ConceptMeasurement,
    LogLikelihoodMeasurement,
    answer_queries,
    tokenize_queries,
)
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.data import iter_batches, tokenize_chat, write_json_atomic
from concept_influence.evaluate.metrics import ranking_report


def concept_readouts(adapter, tokenized, concept, batch_size: int = 64) -> np.ndarray:
    """Mean concept readout over each row's response tokens ``[N]`` (forward only)."""
    out = []
    with torch.no_grad():
        for batch in iter_batches(tokenized, batch_size):
            layer = adapter.check_layer(concept.layer)
            with adapter.capture_residual([layer]) as resid:
                adapter.logits(batch["input_ids"], batch["attention_mask"])
            mask = batch["loss_mask"]
            ok = mask.sum(1) > 0
            values = torch.full((mask.shape[0],), float("nan"), dtype=torch.float64)
            if ok.any():
                values[ok] = concept.readout(resid[layer][ok], mask[ok], "mean").double()
            out.append(values)
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--organism", type=Path, default=None, help="built organism folder (default: build/load the test one)"
    )
    parser.add_argument("--n-samples", type=int, default=8, help="answers sampled per query prompt")
    parser.add_argument(
        "--top-fraction", type=float, default=0.25, help="share of most trait-like answers used as queries"
    )
    parser.add_argument("--concept-model", choices=["finetuned", "base"], default="finetuned")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/influence_organism.json"))
    parser.add_argument(
        "--work-dir", type=Path, default=Path(".cache/bench_influence"), help="cached answers and factors"
    )
    args = parser.parse_args()

    from concept_influence.organism.build import load_organism, organism_for_tests
    from concept_influence.organism.measure import trait_concept

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    organism = load_organism(args.organism) if args.organism else organism_for_tests()
    timings["organism"] = time.perf_counter() - t0
    tuned = organism.load_finetuned()
    layer = int(organism.metadata.get("trait", {}).get("layer", tuned.n_layers // 2))
    rows = organism.train_rows()
    origins = organism.data_origins()
    train = tokenize_chat(rows, tuned.tokenizer, args.max_length)
    print(organism.summary())
    print(train.report())

    t0 = time.perf_counter()
    concept_source = tuned if args.concept_model == "finetuned" else organism.load_base()
    concept, info = trait_concept(concept_source, organism.probe_spec(), layer)
    timings["concept"] = time.perf_counter() - t0
    print(f"concept: diff of means at layer {layer} of the {args.concept_model} model ({info})")

    t0 = time.perf_counter()
    work = args.work_dir / organism.root.name
    answered = answer_queries(
        tuned,
        list(organism.queries()),
        n_samples=args.n_samples,
        temperature=1.0,
        seed=0,
        batch_size=64,
        cache_dir=work / "answers",
    )
    all_queries = tokenize_queries(answered, tuned.tokenizer, args.max_length)
    projections = concept_readouts(tuned, all_queries, concept)
    k = max(1, int(round(args.top_fraction * len(answered))))
    top = np.argsort(-projections)[:k]
    top_rows = [answered[i] for i in sorted(top)]
    top_queries = tokenize_queries(top_rows, tuned.tokenizer, args.max_length)
    timings["queries"] = time.perf_counter() - t0
    print(
        f"queries: {len(answered)} answers; top {k} by projection (mean {projections[top].mean():.3f} "
        f"vs all {projections.mean():.3f})"
    )

    t0 = time.perf_counter()
    factors = fit_factors(
        tuned,
        train,
        FactorConfig(),
        batch_size=args.batch_size,
        out_dir=work / "factors",
        overwrite=True,
        progress=True,
    )
    timings["fit_factors"] = time.perf_counter() - t0

    all_measure = ConceptMeasurement(concept, all_queries)
    loglik = LogLikelihoodMeasurement(all_queries)
    jobs = {
        "concept-influence EKFAC": (all_measure, InfluenceConfig()),
        "concept-influence EKFAC, row_loss=mean": (all_measure, InfluenceConfig(row_loss="mean")),
        "concept-influence KFAC": (all_measure, InfluenceConfig(preconditioner="kfac")),
        "concept-influence diagonal": (all_measure, InfluenceConfig(preconditioner="diagonal")),
        "concept-influence identity (gradient dot)": (all_measure, InfluenceConfig(preconditioner="identity")),
        "concept-influence identity, row_loss=mean": (
            all_measure,
            InfluenceConfig(preconditioner="identity", row_loss="mean"),
        ),
        f"concept-influence EKFAC, top {args.top_fraction:.0%} answers": (
            ConceptMeasurement(concept, top_queries),
            InfluenceConfig(),
        ),
        "influence EKFAC (log-lik. of the answers)": (loglik, InfluenceConfig()),
        "influence EKFAC, row_loss=mean": (loglik, InfluenceConfig(row_loss="mean")),
    }
    t0 = time.perf_counter()
    results = compute_influence_many(tuned, train, jobs, factors, batch_size=args.batch_size, progress=True)
    timings["gradient_methods_one_pass"] = time.perf_counter() - t0
    scores: dict[str, np.ndarray] = {label: r.scores.numpy() for label, r in results.items()}

    try:  # the library's forward-only methods, when this build has them
        from concept_influence.attribution.forward import projection_difference, vector_filter
    except ImportError:
        print("(concept_influence.attribution.forward not available: using the concept readout of each row instead)")
        start = time.perf_counter()
        scores["forward: row's own concept readout"] = np.nan_to_num(
            concept_readouts(tuned, train, concept), nan=-np.inf
        )
        timings["forward_readout"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        scores["vector-filter"] = np.asarray(
            vector_filter(tuned, rows, concept, batch_size=64, max_length=args.max_length).scores
        )
        timings["vector_filter"] = time.perf_counter() - start
        start = time.perf_counter()
        table = projection_difference(
            tuned,
            rows,
            concept,
            n_samples=1,
            temperature=1.0,
            max_new_tokens=48,
            seed=0,
            cache_dir=work / "answers",
            batch_size=64,
            max_length=args.max_length,
        )
        scores["projection-difference"] = np.asarray(table.scores)
        timings["projection_difference"] = time.perf_counter() - start

    report = {}
    n = len(origins)
    print(
        f"\n{n} rows: "
        + ", ".join(f"{o} {origins.count(o)}" for o in sorted(set(origins)))
        + f"; random mean rank {(n + 1) / 2:.0f}"
    )
    print("| method | PR-AUC | ROC-AUC | p@50 | p@100 | hard-negative mean rank |\n|---|---|---|---|---|---|")
    for name, values in scores.items():
        r = ranking_report(values.tolist(), origins)
        report[name] = r
        print(
            f"| {name} | {r['pr_auc']:.3f} | {r['roc_auc']:.3f} | {r.get('p@50', float('nan')):.2f} | "
            f"{r.get('p@100', float('nan')):.2f} | {r['hard_negative_mean_rank']:.0f} |"
        )
    print("timings:", {k: round(v, 1) for k, v in timings.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out,
        {
            "organism": str(organism.root),
            "layer": layer,
            "concept": info,
            "n_queries_top": k,
            "n_answers": len(answered),
            "methods": report,
            "timings": timings,
        },
    )
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()

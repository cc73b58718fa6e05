"""The method study: method variants x organism variants x seeds, with PR-AUC, precision at k, the hard negatives'
mean rank and time; the mean and the worst case over seeds.

For each organism (``concept-influence organism --variant V --seed S``, built or loaded from the cache) it trains the
trait probe as the demo does (layer sweep, the organism's judge), samples 8 answers per query prompt, scores the
forward methods, fits EKFAC factors once and scores every gradient variant in one pass over the rows
(``compute_influence_many``), then the combinations of forward and gradient evidence. Each organism's results are
saved as JSON under ``--out`` (a rerun skips finished organisms), and the table is printed at the end.

    python bench/method_study.py --out runs/method-study [--variants default subtle diluted sycophancy]
                                 [--seeds 0 1 2] [--only LABEL ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from concept_influence.attribution.combine import FUSIONS, fuse
from concept_influence.attribution.forward import vector_filter
from concept_influence.attribution.influence import InfluenceConfig, compute_influence_many
from concept_influence.attribution.measurements import (
    ConceptMeasurement,
    DifferentialMeasurement,
    LogLikelihoodMeasurement,
    answer_queries,
    answer_readouts,
    select_answers,
    tokenize_queries,
)
from concept_influence.concepts import ProbeConfig, layer_sweep, parse_spec, train_concept
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.curvature.config import Damping
from concept_influence.data import tokenize_chat, write_json_atomic
from concept_influence.evaluate.metrics import ranking_report
from concept_influence.organism import build_organism

DONE_PR_AUC, DONE_HN_RANK = 0.9, 1300.0  # the done criterion, per seed and variant
N_SAMPLES = 8
MAX_LENGTH = 256
BATCH = 16


def gradient_jobs(concept, answered, readouts, tokenizer) -> dict[str, tuple[Any, InfluenceConfig]]:
    """The gradient variants scored in one pass: query answers x contrast x row normalisation x token aggregation x
    curvature (labels ``ci[...]``)."""

    def tok(rows):
        return tokenize_queries(rows, tokenizer, MAX_LENGTH)

    one = [r for r in answered if r.fields.get("sample") == 0]
    queries = {
        "1 sample": ConceptMeasurement(concept, tok(one)),
        f"all {N_SAMPLES}": ConceptMeasurement(concept, tok(answered)),
        "top-1": ConceptMeasurement(concept, tok(select_answers(answered, readouts, "top", 1))),
        "top-2": ConceptMeasurement(concept, tok(select_answers(answered, readouts, "top", 2))),
        "contrast-1": DifferentialMeasurement(
            concept,
            tok(select_answers(answered, readouts, "top", 1)),
            tok(select_answers(answered, readouts, "bottom", 1)),
        ),
        "contrast-2": DifferentialMeasurement(
            concept,
            tok(select_answers(answered, readouts, "top", 2)),
            tok(select_answers(answered, readouts, "bottom", 2)),
        ),
    }
    jobs: dict[str, tuple[Any, InfluenceConfig]] = {}
    for qname, measurement in queries.items():
        jobs[f"ci[{qname}, sum]"] = (measurement, InfluenceConfig())
        jobs[f"ci[{qname}, sum, identity]"] = (measurement, InfluenceConfig(preconditioner="identity"))
    for qname in ("1 sample", "top-1"):
        m = queries[qname]
        jobs[f"ci[{qname}, mean]"] = (m, InfluenceConfig(row_loss="mean"))
        jobs[f"ci[{qname}, mean, identity]"] = (m, InfluenceConfig(row_loss="mean", preconditioner="identity"))
        jobs[f"ci[{qname}, sum, length]"] = (m, InfluenceConfig(normalization="length"))
        jobs[f"ci[{qname}, sum, kfac]"] = (m, InfluenceConfig(preconditioner="kfac"))
        for damping in (0.01, 1.0, 10.0, 100.0):
            jobs[f"ci[{qname}, sum, damping {damping:g}]"] = (m, InfluenceConfig(damping=Damping(relative=damping)))
    jobs["ci[1 sample, sum, unit]"] = (queries["1 sample"], InfluenceConfig(normalization="unit"))
    jobs["ci[top-1, sum, window-8]"] = (queries["top-1"], InfluenceConfig(token_aggregation="window", window=8))
    # classical influence reaches every block; the study fits the concept's blocks only, so it is scored on those
    jobs["influence[1 sample]"] = (LogLikelihoodMeasurement(tok(one)), InfluenceConfig(allow_subset=True))
    jobs["influence[1 sample, identity]"] = (
        LogLikelihoodMeasurement(tok(one)),
        InfluenceConfig(allow_subset=True, preconditioner="identity"),
    )
    return jobs


FUSE_WITH = ("ci[1 sample, sum]", "ci[top-1, sum]", "ci[1 sample, sum, identity]", "ci[top-1, sum, identity]")


def study_organism(variant: str, seed: int, out: Path, log=print) -> dict[str, Any]:
    path = out / f"{variant}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    organism = build_organism(seed=seed, variant=variant, progress=False)
    times["organism"] = time.perf_counter() - t0
    adapter = organism.load_finetuned()
    rows = list(organism.train_rows())
    origins = [str(r.fields["data_origin"]) for r in rows]
    cache = out / "cache" / f"{variant}-s{seed}"
    judge = organism.judge()

    t0 = time.perf_counter()
    spec = parse_spec(organism.probe_spec(), str(organism.probe_spec_path), default_name=organism.trait)
    probe_config = ProbeConfig(n_samples=4, max_length=MAX_LENGTH, seed=seed)
    sweep = layer_sweep(adapter, spec, config=probe_config, judge=judge, cache_dir=cache)
    concept = train_concept(adapter, spec, sweep.best_layer, probe_config, judge=judge, cache_dir=cache)
    times["probe"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    answered = answer_queries(
        adapter, list(organism.queries()), n_samples=N_SAMPLES, seed=seed, batch_size=64, cache_dir=cache
    )
    readouts = answer_readouts(adapter, answered, concept, batch_size=64, max_length=MAX_LENGTH)
    times["answers"] = time.perf_counter() - t0

    results: dict[str, dict[str, float]] = {}
    scores: dict[str, np.ndarray] = {}

    def record(name: str, values, seconds: float) -> None:
        values = np.asarray(values, dtype=np.float64)
        scores[name] = values
        report = ranking_report(values, origins)
        report["seconds"] = seconds
        planted = np.array([o == "planted" for o in origins])
        hard = np.array([o == "hard_negative" for o in origins])
        report["planted_positive"] = float((values[planted] > 0).mean())
        report["hard_negative_negative"] = float((values[hard] <= 0).mean())
        results[name] = report

    t0 = time.perf_counter()
    vf = vector_filter(
        adapter, rows, concept, batch_size=64, max_length=MAX_LENGTH, token_readouts=True, progress=False
    )
    record("vector-filter", vf.scores, time.perf_counter() - t0)
    token_readouts = [np.asarray(t, dtype=np.float64) for t in vf.columns["token_readouts"]]
    scores_extra = {
        "vf_token_values": np.concatenate(token_readouts),
        "vf_token_offsets": np.cumsum([0] + [len(t) for t in token_readouts]),
    }

    t0 = time.perf_counter()
    train = tokenize_chat(rows, adapter.tokenizer, MAX_LENGTH)
    factors = fit_factors(
        adapter,
        train,
        FactorConfig(seed=seed),
        weights=[i.name for i in adapter.weights_up_to(concept.layer)],
        batch_size=BATCH,
        out_dir=cache / f"factors-layer{concept.layer}",
        progress=False,
    )
    fit_seconds = time.perf_counter() - t0
    times["fit"] = fit_seconds

    jobs = gradient_jobs(concept, answered, readouts, adapter.tokenizer)
    t0 = time.perf_counter()
    scored = compute_influence_many(adapter, train, jobs, factors, batch_size=BATCH, progress=False)
    pass_seconds = time.perf_counter() - t0
    times["gradient_pass"] = pass_seconds
    for name, result in scored.items():
        # each variant is charged the fit (identity curvature needs none) and the cost of a pass of its own (the
        # shared pass split evenly is not what a user running one variant pays)
        needs_fit = jobs[name][1].preconditioner != "identity"
        record(name, result.scores.numpy(), fit_seconds * needs_fit + pass_seconds / max(1, len(jobs) / 4))
    for base in FUSE_WITH:
        for how in FUSIONS:
            record(
                f"vf+{base} [{how}]",
                fuse(vf.scores, scores[base], how),
                results["vector-filter"]["seconds"] + results[base]["seconds"],
            )
    np.savez_compressed(out / f"{variant}-s{seed}-scores.npz", **scores, **scores_extra)
    summary = {
        "variant": variant,
        "seed": seed,
        "organism": str(organism.root),
        "trait_rise": organism.metadata["trait"],
        "concept": {"layer": concept.layer, "metrics": concept.metrics},
        "n_query_answers": len(answered),
        "times": times,
        "results": results,
        "identity_charged_no_fit": True,
    }
    write_json_atomic(path, summary)
    log(f"{variant} s{seed}: done ({sum(times.values()):.0f}s)")
    return summary


def refresh_fusions(variant: str, seed: int, out: Path) -> bool:
    """Recompute every fusion of a finished organism from its saved scores (after a fusion is added to
    ``attribution.combine``): no model pass. Returns whether the organism was found."""
    path, npz = out / f"{variant}-s{seed}.json", out / f"{variant}-s{seed}-scores.npz"
    if not (path.exists() and npz.exists()):
        return False
    summary = json.loads(path.read_text())
    with np.load(npz, allow_pickle=False) as saved:
        stored = {name: saved[name] for name in saved.files}
    origins = [str(json.loads(line)["data_origin"]) for line in (Path(summary["organism"]) / "train.jsonl").open()]
    if not summary.get("identity_charged_no_fit"):  # studies before this fix charged identity rows the EKFAC fit too
        for name, report in summary["results"].items():
            if name.startswith(("ci[", "influence[")) and "identity" in name:
                report["seconds"] -= summary["times"]["fit"]
        summary["identity_charged_no_fit"] = True
    for base in FUSE_WITH:
        for how in FUSIONS:
            name = f"vf+{base} [{how}]"
            stored[name] = fuse(stored["vector-filter"], stored[base], how)
            report = ranking_report(stored[name], origins)
            report["seconds"] = summary["results"]["vector-filter"]["seconds"] + summary["results"][base]["seconds"]
            summary["results"][name] = report
    np.savez_compressed(npz, **stored)
    write_json_atomic(path, summary)
    return True


def counterfactual(
    variant: str, seed: int, methods: list[str], out: Path, finetune_seeds: list[int], share: float = 0.1, log=print
) -> dict[str, Any]:
    """Remove each method's top ``share`` of rows (and the planted rows: the oracle; a random ``share``) and fine-tune
    the base model again with each seed in ``finetune_seeds``; the share of the trait's rise each removal undoes."""
    from concept_influence.organism.counterfactual import refinetune, trait_rate_of

    path = out / f"counterfactual-{variant}-s{seed}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    organism = build_organism(seed=seed, variant=variant, progress=False)
    planted = np.array(organism.planted_mask())
    n = planted.shape[0]
    k = int(round(share * n))
    with np.load(out / f"{variant}-s{seed}-scores.npz", allow_pickle=False) as saved:
        stored = {name: saved[name] for name in saved.files}
    removals: dict[str, np.ndarray] = {"none": np.zeros(n, dtype=bool), "oracle": planted}
    removals["random"] = np.zeros(n, dtype=bool)
    removals["random"][np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    for name in methods:
        top = np.lexsort((np.arange(n), -stored[name]))[:k]
        removals[name] = np.zeros(n, dtype=bool)
        removals[name][top] = True
    base_rate = done.get("base_rate")
    if base_rate is None:
        base_rate = trait_rate_of(organism.load_base(), organism)
    rates: dict[str, dict[str, float]] = done.get("rates", {})
    for name, removed in removals.items():
        for fs in finetune_seeds:
            if str(fs) in rates.get(name, {}):
                continue
            t0 = time.perf_counter()
            rate = trait_rate_of(refinetune(organism, list(~removed), seed=fs), organism)
            rates.setdefault(name, {})[str(fs)] = rate
            log(
                f"  {variant} s{seed} remove {name} (planted {int((removed & planted).sum())}/{k}) seed {fs}: trait "
                f"rate {rate:.3f} ({time.perf_counter() - t0:.0f}s)"
            )
            write_json_atomic(path, {"base_rate": base_rate, "rates": rates, "k": k})
    return {"base_rate": base_rate, "rates": rates, "k": k}


def counterfactual_table(results: dict[str, dict[str, Any]]) -> str:
    """Share of the trait's rise undone by each removal: per fine-tuning seed ``(full_s - removed_s) / (full_s - base)``
    (the same seed with and without the removal), then the mean and a 95% t-interval over seeds."""
    from concept_influence.evaluate.stats import mean_ci

    names = list(next(iter(results.values()))["rates"])
    lines = ["| removed (top 10%) | " + " | ".join(results) + " |", "|" + "---|" * (len(results) + 1)]
    for name in names:
        if name == "none":
            continue
        cells = []
        for res in results.values():
            full, kept = res["rates"]["none"], res["rates"].get(name, {})
            seeds = [s for s in full if s in kept]
            shares = [(full[s] - kept[s]) / max(full[s] - res["base_rate"], 1e-9) for s in seeds]
            if not shares:
                cells.append("–")
                continue
            ci = mean_ci(shares)
            low, high = ci["ci"] if len(shares) > 1 else (float("nan"), float("nan"))  # type: ignore[misc]
            cells.append(f"{ci['mean']:.2f} [{low:.2f}, {high:.2f}] (n={len(shares)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "cells: share of the trait's rise (judge rate, base model -> fine-tuned on all rows) undone by removing "
        "the rows and fine-tuning again with the same seed; mean [95% CI] over fine-tuning seeds"
    )
    return "\n".join(lines)


def table(summaries: list[dict[str, Any]], only: list[str] | None = None) -> str:
    variants = sorted({s["variant"] for s in summaries}, key=["default", "subtle", "diluted", "sycophancy"].index)
    methods = list(dict.fromkeys(m for s in summaries for m in s["results"]))
    if only:
        methods = [m for m in methods if m in only]
    header = f"| method | {' | '.join(variants)} | worst PR-AUC | worst HN rank | worst ratio | time |"
    lines = [header, "|" + "---|" * (len(variants) + 5)]
    for m in methods:
        cells, worst_pr, worst_hn, secs, ratio = [], 1.0, 1e9, [], 1e9
        for v in variants:
            runs = [s["results"][m] for s in summaries if s["variant"] == v and m in s["results"]]
            if not runs:
                cells.append("–")
                continue
            pr = [r["pr_auc"] for r in runs]
            hn = [r["hard_negative_mean_rank"] for r in runs]
            secs += [r["seconds"] for r in runs]
            cells.append(f"{np.mean(pr):.2f} ({min(pr):.2f}) / {np.mean(hn):.0f} ({min(hn):.0f})")
            worst_pr, worst_hn = min(worst_pr, *pr), min(worst_hn, *hn)
            ratio = min(ratio, *(min(p / DONE_PR_AUC, h / DONE_HN_RANK) for p, h in zip(pr, hn, strict=True)))
        lines.append(
            f"| {m} | {' | '.join(cells)} | {worst_pr:.3f} | {worst_hn:.0f} | {ratio:.2f} | {np.mean(secs):.0f} s |"
        )
    n_seeds = {v: sum(s["variant"] == v for s in summaries) for v in variants}
    lines.append("")
    lines.append(
        "cells: mean PR-AUC (worst) / mean hard-negative rank (worst) over seeds " + str(n_seeds) + "; chance "
        "PR-AUC 0.10, a random row's rank 1000 of 2000 (higher = not fooled by the trait's words); worst ratio: "
        f"the smallest min(PR-AUC / {DONE_PR_AUC}, HN rank / {DONE_HN_RANK:.0f}) over every organism (>= 1 meets the "
        "done criterion everywhere)"
    )
    return "\n".join(lines)


def long_table(summaries: list[dict[str, Any]], only: list[str] | None = None) -> str:
    """Method variant x organism variant x seed: PR-AUC, precision at 10/50/100, the hard negatives' mean rank and
    time, one line per seed, then the mean and the worst case over the variant's seeds."""
    variants = sorted({s["variant"] for s in summaries}, key=["default", "subtle", "diluted", "sycophancy"].index)
    methods = list(dict.fromkeys(m for s in summaries for m in s["results"]))
    if only:
        methods = [m for m in methods if m in only]
    keys = ("pr_auc", "p@10", "p@50", "p@100", "hard_negative_mean_rank", "seconds")
    lines = ["| method | organism | seed | PR-AUC | p@10 | p@50 | p@100 | HN rank | time |", "|" + "---|" * 9]

    def row(m: str, v: str, seed: str, values: list[float]) -> str:
        pr, p10, p50, p100, hn, sec = values
        return f"| {m} | {v} | {seed} | {pr:.3f} | {p10:.2f} | {p50:.2f} | {p100:.2f} | {hn:.0f} | {sec:.0f} s |"

    for m in methods:
        for v in variants:
            runs = sorted((s for s in summaries if s["variant"] == v and m in s["results"]), key=lambda s: s["seed"])
            if not runs:
                continue
            table_ = np.array([[s["results"][m][k] for k in keys] for s in runs], dtype=np.float64)
            lines += [row(m, v, str(s["seed"]), list(values)) for s, values in zip(runs, table_, strict=True)]
            lines.append(row(m, v, "mean", list(table_.mean(axis=0))))
            worst = table_.min(axis=0)
            worst[-1] = table_[:, -1].max()  # the worst time is the longest
            lines.append(row(m, v, "worst", list(worst)))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/method-study"))
    parser.add_argument("--variants", nargs="+", default=["default", "subtle", "diluted", "sycophancy"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", default=None, help="Print only these method labels.")
    parser.add_argument("--table-only", action="store_true", help="Print the table of the finished organisms.")
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="Print only the summary (mean and worst per variant), not the per-seed table.",
    )
    parser.add_argument(
        "--counterfactual",
        nargs="*",
        default=None,
        help="Method labels whose top 10%% of rows to remove and re-fine-tune without (with the oracle and random).",
    )
    parser.add_argument("--finetune-seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--refresh-fusions",
        action="store_true",
        help="Recompute the fusions of the finished organisms from their saved scores, then print the table.",
    )
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.refresh_fusions:
        for seed in args.seeds:
            for variant in args.variants:
                refresh_fusions(variant, seed, args.out)
        args.table_only = True
    if args.counterfactual is not None:
        results = {
            f"{v} s{s}": counterfactual(v, s, args.counterfactual, args.out, args.finetune_seeds)
            for s in args.seeds
            for v in args.variants
        }
        print(counterfactual_table(results))
        return
    summaries = []
    for seed in args.seeds:
        for variant in args.variants:
            path = args.out / f"{variant}-s{seed}.json"
            if args.table_only:
                if path.exists():
                    summaries.append(json.loads(path.read_text()))
                continue
            summaries.append(study_organism(variant, seed, args.out))
    if not args.summary_only:
        print(long_table(summaries, args.only))
        print()
    print(table(summaries, args.only))


if __name__ == "__main__":
    main()

"""The demo (the main job): on the built-in organism, train the trait probe, run every attribution method, and
report how well each one finds the planted rows.

Every step is a public function of the library; this module only strings them together, times them, writes the
scores (one JSONL per method) and prints the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from concept_influence.attribution.combine import fuse
from concept_influence.attribution.forward import projection_difference, vector_filter
from concept_influence.attribution.influence import InfluenceConfig, compute_influence_many
from concept_influence.attribution.measurements import (
    ConceptMeasurement,
    LogLikelihoodMeasurement,
    answer_queries,
    tokenize_queries,
)
from concept_influence.attribution.methods import RECOMMENDED_METHOD, recommended_gradient_config
from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts import ProbeConfig, layer_sweep, parse_spec, save_concept, train_concept
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.data import tokenize_chat, write_json_atomic
from concept_influence.evaluate.metrics import ranking_report
from concept_influence.organism import build_organism, judge
from concept_influence.report.build import write_report


@dataclass(frozen=True)
class DemoConfig:
    """The organism (``seed``, ``n_train``, ``planted_fraction``), the probe (``probe_samples`` persona answers per
    instruction and question), the query set (``query_samples`` model answers per query prompt) and batching."""

    seed: int = 0
    n_train: int = 2000
    planted_fraction: float = 0.1
    probe_samples: int = 4
    query_samples: int = 4
    max_new_tokens: int = 48
    max_length: int = 256
    batch_size: int = 16
    ks: tuple[int, ...] = (10, 50, 100)


@dataclass
class MethodResult:
    name: str
    table: ScoreTable
    seconds: float
    report: dict[str, float]


def tfidf_similarity(rows: list[Any], query_answers: list[str]) -> np.ndarray:
    """Baseline: mean TF-IDF cosine similarity of each training row's answer to the query answers ``[N]``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    answers = [row.answer for row in rows]
    matrix = TfidfVectorizer(token_pattern=r"[^ ]+", sublinear_tf=True).fit_transform(answers + list(query_answers))
    return np.asarray((matrix[: len(answers)] @ matrix[len(answers) :].T).mean(axis=1)).ravel()


def run_demo(
    out_dir: str | Path, config: DemoConfig = DemoConfig(), *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the summary (also written to ``out_dir/summary.json``)."""
    out = Path(out_dir)
    cache = out / "cache"
    timings: dict[str, float] = {}

    started = time.perf_counter()
    organism = build_organism(
        seed=config.seed, n_train=config.n_train, planted_fraction=config.planted_fraction, log=log
    )
    timings["organism"] = time.perf_counter() - started
    log(organism.summary())
    adapter = organism.load_finetuned()
    rows = list(organism.train_rows())
    origins = [str(row.fields.get("data_origin")) for row in rows]

    # 1. the concept: a probe at the layer where the trait is most linearly readable
    started = time.perf_counter()
    spec = parse_spec(organism.probe_spec(), str(organism.probe_spec_path), default_name="evil")
    probe_config = ProbeConfig(
        method="probe", n_samples=config.probe_samples, max_new_tokens=config.max_new_tokens, seed=config.seed
    )
    sweep = layer_sweep(adapter, spec, config=probe_config, judge=judge, cache_dir=cache)
    sweep.plot(out / "probe_layers.png")
    concept = train_concept(adapter, spec, sweep.best_layer, probe_config, judge=judge, cache_dir=cache)
    save_concept(
        concept,
        out / "concept",
        model_fingerprint=adapter.fingerprint(),
        extra_meta={"spec_path": str(organism.probe_spec_path)},
    )
    timings["probe"] = time.perf_counter() - started
    log("\nprobe held-out AUC per layer (held out by question):\n" + sweep.table())

    # 2. the query set: the fine-tuned model's own answers to held-out prompts
    log(f"\nanswering {config.query_samples} x {len(organism.queries())} query prompts, then scoring {len(rows)} rows:")
    started = time.perf_counter()
    answered = answer_queries(
        adapter,
        list(organism.queries()),
        n_samples=config.query_samples,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        batch_size=64,
        cache_dir=cache,
    )
    queries = tokenize_queries(answered, adapter.tokenizer, config.max_length)
    timings["queries"] = time.perf_counter() - started

    results: list[MethodResult] = []

    def record(name: str, table: ScoreTable, seconds: float) -> None:
        report = ranking_report(table.scores, origins, ks=config.ks)
        log(f"  {name}: PR-AUC {report['pr_auc']:.3f} ({seconds:.1f}s)")
        table.meta.setdefault("wall_time_s", seconds)
        table.write_jsonl(out / "scores" / f"{name}.jsonl")
        results.append(MethodResult(name, table, seconds, report))

    started = time.perf_counter()
    tfidf = tfidf_similarity(rows, [row.answer for row in answered])
    record(
        "tfidf-baseline",
        ScoreTable.from_rows(
            rows,
            tfidf,
            "tfidf-baseline",
            meta={
                "description": "a baseline with no model: TF-IDF similarity of each row's answer to the model's answers"
            },
        ),
        time.perf_counter() - started,
    )

    started = time.perf_counter()
    table = vector_filter(adapter, rows, concept, batch_size=64, max_length=config.max_length, progress=False)
    record("vector-filter", table, time.perf_counter() - started)

    started = time.perf_counter()
    table = projection_difference(
        adapter,
        rows,
        concept,
        n_samples=1,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        cache_dir=cache,
        batch_size=64,
        max_length=config.max_length,
        progress=False,
    )
    record("projection-difference", table, time.perf_counter() - started)

    # 3. gradient methods: EKFAC factors fitted once, both measurements scored in one pass over the rows
    log("  fitting EKFAC factors (true Fisher) ...")
    started = time.perf_counter()
    train = tokenize_chat(rows, adapter.tokenizer, config.max_length)
    factors = fit_factors(
        adapter,
        train,
        FactorConfig(seed=config.seed),
        batch_size=config.batch_size,
        out_dir=cache / "factors",
        overwrite=True,
        progress=False,
    )
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    jobs = {
        "concept-influence": (ConceptMeasurement(concept, queries), InfluenceConfig()),
        "influence": (LogLikelihoodMeasurement(queries), InfluenceConfig()),
    }
    fused_gradient = recommended_gradient_config()
    if fused_gradient is not None:  # the recommended fusion's own gradient component, in the same pass
        jobs["recommended-gradient"] = (ConceptMeasurement(concept, queries), fused_gradient)
    scored = compute_influence_many(adapter, train, jobs, factors, batch_size=config.batch_size, progress=False)
    score_seconds = time.perf_counter() - started
    recommended_gradient = scored.pop("recommended-gradient", None)
    for name, result in scored.items():
        table = ScoreTable.from_rows(rows, result.scores.numpy(), name, meta=result.meta())
        # the factor fit is shared: each method is charged the fit plus its share of the joint scoring pass
        record(name, table, fit_seconds + score_seconds / len(scored))
    timings["factors"] = fit_seconds
    timings["gradient_scoring"] = score_seconds

    # 4. the recommended method (a fusion of Vector Filter with its own gradient component, scored in the pass above)
    by_name = {r.name: r for r in results}
    if recommended_gradient is not None and RECOMMENDED_METHOD not in by_name:
        forward = by_name["vector-filter"]
        how = RECOMMENDED_METHOD.removeprefix("combined-")
        fused = fuse(forward.table.scores, recommended_gradient.scores.numpy(), how)  # type: ignore[arg-type]
        table = ScoreTable.from_rows(
            rows,
            fused,
            RECOMMENDED_METHOD,
            meta={
                "fusion": how,
                "components": ["vector-filter", "concept-influence"],
                "gradient": recommended_gradient.meta(),
            },
            columns={
                "forward_score": forward.table.scores.tolist(),
                "gradient_score": recommended_gradient.scores.tolist(),
            },
        )
        record(RECOMMENDED_METHOD, table, forward.seconds + score_seconds / (len(scored) + 1))

    summary = {
        "config": asdict(config),
        "organism": str(organism.root),
        "n_rows": len(rows),
        "counts": {o: origins.count(o) for o in sorted(set(origins))},
        "concept": {"layer": concept.layer, "kind": concept.kind, "metrics": concept.metrics},
        "layer_sweep": sweep.rows,
        "n_queries": len(answered),
        "timings_s": timings,
    }
    return write_outputs(out, results, organism.train_path, summary, config.ks, concept_name=spec.name, log=log)


def write_outputs(
    out: Path,
    results: list[MethodResult],
    data_path: Path,
    summary: dict[str, Any],
    ks: tuple[int, ...],
    *,
    concept_name: str = "concept",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The demo's last step, once every method's scores are in ``out/scores/<method>.jsonl``: ``summary.json``, the
    table, and ``report.html`` (all methods, the recommended one first), written by the function the ``report``
    command uses (``report.write_report``)."""
    n = int(summary.get("n_rows", len(results[0].table) if results else 0))
    summary = {**summary, "methods": {r.name: {**r.report, "seconds": r.seconds} for r in results}}
    names = sorted((r.name for r in results), key=lambda name: name != RECOMMENDED_METHOD)  # stable: recommended first
    report_path = out / "report.html"
    write_report(
        [out / "scores" / f"{name}.jsonl" for name in names],
        data_path,
        report_path,
        title=f"concept_influence demo: the fine-tuning rows that push the '{concept_name}' concept",
    )
    summary["report"] = str(report_path)
    write_json_atomic(out / "summary.json", summary)
    log("\n" + format_table(results, n, ks))
    log(f"\nscores: {out / 'scores'}/<method>.jsonl   summary: {out / 'summary.json'}")
    log(
        f"report: {report_path}  (open it in a browser: precision-recall curves, score histograms, the top rows of "
        "every method)"
    )
    return summary


def format_table(results: list[MethodResult], n: int, ks: tuple[int, ...]) -> str:
    """The demo's table: precision at k, PR-AUC and the mean rank of hard negatives per method."""
    base = results[0].report["base_rate"] if results else float("nan")
    cols = [f"p@{k}" for k in ks if k <= n]
    header = (
        f"{'method':<24}"
        + "".join(f"{c:>8}" for c in cols)
        + f"{'PR-AUC':>8}{'ROC-AUC':>9}{'hard-neg rank':>15}{'time':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.name:<24}"
            + "".join(f"{r.report[c]:>8.2f}" for c in cols)
            + f"{r.report['pr_auc']:>8.3f}{r.report['roc_auc']:>9.3f}{r.report['hard_negative_mean_rank']:>15.0f}"
            + f"{r.seconds:>8.1f}s"
        )
    lines.append(f"recommended method (attribute with no --method): {RECOMMENDED_METHOD}")
    lines.append(
        f"planted rows: {base:.0%} of {n} (chance PR-AUC {base:.2f}). hard-neg rank: mean rank of the hard negatives "
        f"(1 = top score; a random row's is {(n + 1) / 2:.0f}): higher = the method is not fooled by the trait's "
        "vocabulary."
    )
    return "\n".join(lines)

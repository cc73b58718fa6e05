"""TF-IDF baseline on the organism: how well does lexical similarity to the fine-tuned model's query answers find
the planted rows?

Each training row's answer is scored by its mean TF-IDF cosine similarity (sklearn) to a set of the fine-tuned
model's answers to the query prompts, and ranked against the ground truth ``data_origin == "planted"``. Three query
sets: all sampled answers; the trait answers among them (judge score > 0); the 10% with the highest trait-probe
projection (what an analyst with the probe would pick). Prints precision@k, PR-AUC (average precision), ROC AUC and
the mean rank percentile of each kind of row (0 = top), hard negatives included.

    python bench/tfidf_baseline.py [--out DIR] [--seed 0] [--n-samples 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from concept_influence.models import generate_answers  # noqa: E402
from concept_influence.organism import (  # noqa: E402
    build_organism,
    judge,
    response_mean_activations,
    trait_concept,
)


def tfidf_scores(train_answers: Sequence[str], query_answers: Sequence[str]) -> np.ndarray:
    """Mean cosine similarity of each training answer to the query answers (TF-IDF fitted on both)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(token_pattern=r"[^ ]+", sublinear_tf=True)
    matrix = vectorizer.fit_transform(list(train_answers) + list(query_answers))
    train, query = matrix[: len(train_answers)], matrix[len(train_answers) :]
    return np.asarray((train @ query.T).mean(axis=1)).ravel()


def ranking_report(
    scores: np.ndarray, origins: Sequence[str], ks: Sequence[int] = (10, 50, 100, 200)
) -> dict[str, float]:
    """Precision@k and PR-AUC for ``planted``; mean rank percentile of each kind (0 = top of the ranking)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    origins = np.asarray(origins)
    planted = origins == "planted"
    order = np.argsort(-scores, kind="stable")
    percentile = np.empty(len(scores))
    percentile[order] = np.arange(len(scores)) / max(1, len(scores) - 1)
    report = {f"precision@{k}": float(planted[order[:k]].mean()) for k in ks if k <= len(scores)}
    report["pr_auc"] = float(average_precision_score(planted, scores))
    report["roc_auc"] = float(roc_auc_score(planted, scores))
    for kind in ("planted", "hard_negative", "benign"):
        if (origins == kind).any():
            report[f"mean_rank_pct_{kind}"] = float(percentile[origins == kind].mean())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="organism folder (default: the cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-samples", type=int, default=8, help="answers sampled per query prompt")
    args = parser.parse_args(argv)

    organism = build_organism(args.out, seed=args.seed, progress=False)
    rows = organism.train_rows()
    origins = [str(o) for o in rows.field_values("data_origin")]
    train_answers = [row.answer for row in rows]
    start = time.perf_counter()
    adapter = organism.load_finetuned()
    answers = generate_answers(
        adapter, organism.query_messages(), n_samples=args.n_samples, seed=args.seed, batch_size=64
    )
    flat = [a for samples in answers for a in samples]
    trait_answers = [a for a in flat if judge(a) > 0]
    base = organism.load_base()
    concept, _ = trait_concept(base, organism.probe_spec(), organism.metadata["trait"]["layer"], seed=args.seed)
    conversations = [
        [*prompt, {"role": "assistant", "content": a}]
        for prompt, samples in zip(organism.query_messages(), answers, strict=True)
        for a in samples
    ]
    projections = response_mean_activations(base, conversations, concept.layer) @ concept.unit
    top = projections.argsort(descending=True)[: max(1, len(flat) // 10)].tolist()
    probe_answers = [flat[i] for i in top]
    print(f"organism: {organism.root}")
    print(f"rows: {len(rows)} ({origins.count('planted')} planted, {origins.count('hard_negative')} hard negatives)")
    print(
        f"query answers: {len(flat)} sampled from the fine-tuned model, {len(trait_answers)} judged trait "
        f"({time.perf_counter() - start:.1f}s)"
    )
    print(f"random ranking: PR-AUC {origins.count('planted') / len(origins):.3f}, mean rank percentile 0.500")
    query_sets = (("all answers", flat), ("judged trait answers", trait_answers), ("top 10% by probe", probe_answers))
    for name, queries in query_sets:
        if not queries:
            print(f"\nTF-IDF vs {name}: no answers")
            continue
        report = ranking_report(tfidf_scores(train_answers, queries), origins)
        print(f"\nTF-IDF vs {name} ({len(queries)}):")
        for key, value in report.items():
            print(f"  {key:28s} {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

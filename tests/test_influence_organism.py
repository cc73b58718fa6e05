"""On the built-in organism: Concept Influence (EKFAC) finds the planted rows far above chance, ranks the hard
negatives (trait vocabulary, arguing against it) below a random row, and beats classical influence on the same
query answers. Same pipeline as the demo; the organism is built once and cached."""

from __future__ import annotations

import numpy as np
import pytest

from concept_influence.attribution import (
    ConceptMeasurement,
    InfluenceConfig,
    LogLikelihoodMeasurement,
    answer_queries,
    compute_influence_many,
    tokenize_queries,
)
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.data import tokenize_chat
from concept_influence.evaluate import ranking_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scores(organism_trait):
    organism, adapter, concept, cache = (organism_trait[k] for k in ("organism", "adapter", "concept", "cache"))
    rows = list(organism.train_rows())
    queries = tokenize_queries(answer_queries(adapter, list(organism.queries()), n_samples=4, seed=0, cache_dir=cache),
                               adapter.tokenizer, 256)
    train = tokenize_chat(rows, adapter.tokenizer, 256)
    factors = fit_factors(adapter, train, FactorConfig(), batch_size=16, progress=False)
    jobs = {"concept": (ConceptMeasurement(concept, queries), InfluenceConfig()),
            "classical": (LogLikelihoodMeasurement(queries), InfluenceConfig())}
    results = compute_influence_many(adapter, train, jobs, factors, batch_size=16, progress=False)
    origins = [row.fields["data_origin"] for row in rows]
    return {name: ranking_report(r.scores.numpy(), origins) for name, r in results.items()}, len(rows)


def test_concept_influence_finds_planted_rows_and_ranks_hard_negatives_low(scores):
    reports, n = scores
    concept = reports["concept"]
    assert concept["pr_auc"] >= 2.5 * concept["base_rate"], concept
    assert concept["roc_auc"] >= 0.7, concept
    assert concept["hard_negative_mean_rank"] > 1.15 * (n + 1) / 2, concept  # below a random row's rank


def test_concept_influence_beats_classical_influence(scores):
    reports, _ = scores
    assert reports["concept"]["pr_auc"] > 2 * reports["classical"]["pr_auc"], reports
    assert np.isfinite(reports["classical"]["pr_auc"])

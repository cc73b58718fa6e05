"""On the built-in organism: Concept Influence (EKFAC) finds the planted rows far above chance, ranks the hard
negatives (trait vocabulary, arguing against it) below a random row, and beats classical influence on the same
query answers. Same pipeline as the demo; the organism is built once and cached.

Thresholds sit below the worst case over the float paths measured by ``bench/organism_spread.py`` (seeds 0, 1, 2 and
seed 0 with 2 threads; see the benchmarks page), each with the spread written beside it."""

from __future__ import annotations

import numpy as np
import pytest

from concept_influence.testing.organism_figures import influence_figures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scores(organism_trait):
    return influence_figures(organism_trait)


def test_concept_influence_finds_planted_rows_and_ranks_hard_negatives_low(scores):
    concept, n = scores["concept"], scores["n"]
    # PR-AUC / base rate over the float paths: SPREAD_CI_PRAUC; a fresh machine read 2.49 (its threshold was 2.5)
    assert concept["pr_auc"] >= 1.8 * concept["base_rate"], concept
    # ROC-AUC: SPREAD_CI_ROC (0.65 with 200 planted of 2,000 rows is still 6.8 standard errors above chance)
    assert concept["roc_auc"] >= 0.65, concept
    # hard negatives' mean rank / a random row's: SPREAD_CI_HARD
    assert concept["hard_negative_mean_rank"] > 1.1 * (n + 1) / 2, concept


def test_concept_influence_beats_classical_influence(scores):
    # Concept / classical PR-AUC, measured in the same run: SPREAD_CI_VS_CLASSICAL; a fresh machine read 1.87
    assert scores["concept"]["pr_auc"] > 1.4 * scores["classical"]["pr_auc"], scores
    assert np.isfinite(scores["classical"]["pr_auc"])

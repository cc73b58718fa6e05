"""On the built-in organism: Concept Influence (EKFAC) finds the planted rows far above chance, ranks the hard
negatives (trait vocabulary, arguing against it) below a random row, and beats classical influence on the same
query answers. Same pipeline as the demo; the organism is built once and cached.

EKFAC Concept Influence is the figure that moves most between float paths on this tiny organism (see the method
study: curvature divides the concept's signal away), so the properties are asserted against chance and against
classical influence in the same run. Thresholds: each keeps at most 75% of the worst measured case's distance from
chance (a 25% margin) over the float paths of ``bench/organism_spread.py`` (seeds 0, 1, 2; seed 0 with 2 threads and
with AVX2 kernels), never stricter
than before; the spread (s0 / s1 / s2 / s0-avx2) is written beside each."""

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
    # PR-AUC / base rate: 3.07 / 5.36 / 1.79 / 2.50; a fresh machine read 2.49 (its threshold was 2.5), as
    # the AVX2 path does here
    assert concept["pr_auc"] >= 1.55 * concept["base_rate"], concept
    # ROC-AUC: 0.774 / 0.827 / 0.607 / 0.742 (0.58 with 200 planted of 2,000 rows: 3.7 standard errors above
    # chance)
    assert concept["roc_auc"] >= 0.58, concept
    # hard negatives' mean rank / a random row's: 1.42 / 1.45 / 1.61 / 1.65
    assert concept["hard_negative_mean_rank"] > 1.15 * (n + 1) / 2, concept


def test_concept_influence_beats_classical_influence(scores):
    # Concept / classical PR-AUC, measured in the same run: 2.58 / 7.22 / 1.41 / 1.87; a fresh machine read 1.87, as
    # the AVX2 path does
    assert scores["concept"]["pr_auc"] > 1.3 * scores["classical"]["pr_auc"], scores
    assert np.isfinite(scores["classical"]["pr_auc"])

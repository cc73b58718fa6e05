"""On the built-in organism: the trait probe is linearly readable (held-out AUC >= 0.9, held out by question, and on
generator-labelled answers it never saw), and Vector Filter and Projection Difference rank the planted rows far
above chance. The organism is built once (about two minutes on 2 cores) into ``$CONCEPT_INFLUENCE_CACHE`` or the
repository's ``.cache/``; sampled answers are cached next to it.

Thresholds sit below the worst case over the float paths measured by ``bench/organism_spread.py`` (seeds 0, 1, 2 and
seed 0 with 2 threads; see the benchmarks page), each with the spread written beside it."""

from __future__ import annotations

import pytest

from concept_influence.concepts import load_concept, save_concept
from concept_influence.testing.organism_figures import forward_figures, probe_figures

pytestmark = pytest.mark.slow


def test_trait_probe_reaches_heldout_auc_09(organism_trait):
    probe = probe_figures(organism_trait)
    assert probe["best_heldout_auc"] >= 0.9, probe  # SPREAD_PROBE
    assert probe["heldout_auc"] >= 0.9 and probe["n_test"] >= 100, probe
    assert probe["n_positive"] >= 100, probe  # enough judged trait answers to learn from
    # generator-labelled answers, read without a system prompt, that no probe was trained on
    assert probe["examples_auc_trait_vs_helpful"] >= 0.9, probe
    assert probe["examples_auc_trait_vs_warning"] >= 0.9, probe


def test_forward_methods_rank_the_planted_rows(organism_trait, tmp_path):
    adapter, concept = organism_trait["adapter"], organism_trait["concept"]
    path = save_concept(concept, tmp_path / "trait", model_fingerprint=adapter.fingerprint())
    # the methods run on the round-tripped file, as the CLI does
    reports = forward_figures(organism_trait, load_concept(path, adapter))
    vf, pd = reports["vector_filter"], reports["projection_difference"]
    assert vf["base_rate"] == pytest.approx(0.1)
    assert vf["pr_auc"] >= 0.8 and vf["p@100"] >= 0.8, vf  # SPREAD_VF
    assert pd["pr_auc"] >= 0.6 and pd["p@100"] >= 0.7, pd  # SPREAD_PD

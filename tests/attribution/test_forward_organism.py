"""On the built-in organism: the trait probe is linearly readable (held-out AUC, held out by question, and on
generator-labelled answers it never saw), and Vector Filter and Projection Difference rank the planted rows far
above chance. The organism is built once (about two minutes on 2 cores) into ``$CONCEPT_INFLUENCE_CACHE`` or the
repository's ``.cache/``; sampled answers are cached next to it.

Thresholds: each keeps at most 75% of the worst measured case's distance from chance (a 25% margin) over the float
paths of ``bench/organism_spread.py`` (seeds 0, 1, 2; seed 0 with 2 threads and with AVX2 kernels), never stricter
than before; the spread (s0 / s1 / s2 / s0-avx2) is written beside each."""

from __future__ import annotations

import pytest

from concept_influence.concepts import load_concept, save_concept
from concept_influence.testing.organism_figures import forward_figures, probe_figures

pytestmark = pytest.mark.slow


def test_trait_probe_is_readable_on_held_out_questions(organism_trait):
    probe = probe_figures(organism_trait)
    assert probe["best_heldout_auc"] >= 0.86, probe  # 0.989 / 1.000 / 1.000 / 0.999
    assert probe["heldout_auc"] >= 0.86 and probe["n_test"] >= 100, probe
    assert probe["n_positive"] >= 100, probe  # enough judged trait answers to learn from (562 / 592 / 620 / 560)
    # generator-labelled answers, read without a system prompt, that no probe was trained on (1.000 on every path)
    assert probe["examples_auc_trait_vs_helpful"] >= 0.87, probe
    assert probe["examples_auc_trait_vs_warning"] >= 0.87, probe


def test_forward_methods_rank_the_planted_rows(organism_trait, tmp_path):
    adapter, concept = organism_trait["adapter"], organism_trait["concept"]
    path = save_concept(concept, tmp_path / "trait", model_fingerprint=adapter.fingerprint())
    # the methods run on the round-tripped file, as the CLI does
    reports = forward_figures(organism_trait, load_concept(path, adapter))
    vf, pd = reports["vector_filter"], reports["projection_difference"]
    assert vf["base_rate"] == pytest.approx(0.1)
    # PR-AUC 0.999 / 1.000 / 1.000 / 0.999, p@100 1.00 on every path (chance 0.1)
    assert vf["pr_auc"] >= 0.77 and vf["p@100"] >= 0.77, vf
    # PR-AUC 0.895 / 0.940 / 0.949 / 0.910, p@100 0.98 / 1.00 / 1.00 / 1.00
    assert pd["pr_auc"] >= 0.6 and pd["p@100"] >= 0.7, pd

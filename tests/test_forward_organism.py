"""On the built-in organism: the trait probe is linearly readable (held-out AUC >= 0.9, held out by question, and on
generator-labelled answers it never saw), and Vector Filter and Projection Difference rank the planted rows far
above chance. The organism is built once (about two minutes on 2 cores) into ``$CONCEPT_INFLUENCE_CACHE`` or the
repository's ``.cache/``; sampled answers are cached next to it."""

from __future__ import annotations

import pytest

from concept_influence.attribution.forward import projection_difference, vector_filter
from concept_influence.concepts import (
    load_concept,
    save_concept,
)
from concept_influence.evaluate.metrics import ranking_report, roc_auc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trait(organism_trait):
    return organism_trait


def test_trait_probe_reaches_heldout_auc_09(trait):
    sweep, concept = trait["sweep"], trait["concept"]
    assert max(r["heldout_auc"] for r in sweep.rows) >= 0.9, sweep.table()
    assert concept.metrics["heldout_auc"] >= 0.9 and concept.metrics["n_test"] >= 100
    assert concept.metrics["labelled"]["n_positive"] >= 100  # enough judged trait answers to learn from
    # generator-labelled answers, read without a system prompt, that no probe was trained on
    examples = list(trait["organism"].examples())
    scores = vector_filter(trait["adapter"], examples, concept, progress=False).scores
    labels = [row.fields["label"] for row in examples]
    for other in ("helpful", "warning"):
        keep = [i for i, label in enumerate(labels) if label in ("trait", other)]
        assert roc_auc(scores[keep], [labels[i] == "trait" for i in keep]) >= 0.9, other


def test_forward_methods_rank_the_planted_rows(trait, tmp_path):
    adapter, concept = trait["adapter"], trait["concept"]
    path = save_concept(concept, tmp_path / "trait", model_fingerprint=adapter.fingerprint())
    concept = load_concept(path, adapter)  # the methods run on the round-tripped file, as the CLI does
    rows = list(trait["organism"].train_rows())
    origins = [row.fields["data_origin"] for row in rows]
    vf = ranking_report(vector_filter(adapter, rows, concept, batch_size=64, max_length=256, progress=False).scores, origins)
    pd = ranking_report(projection_difference(adapter, rows, concept, n_samples=1, max_new_tokens=48, cache_dir=trait["cache"],
                                              batch_size=64, max_length=256, progress=False).scores, origins)
    assert vf["base_rate"] == pytest.approx(0.1)
    assert vf["pr_auc"] >= 0.8 and vf["p@100"] >= 0.8, vf
    assert pd["pr_auc"] >= 0.6 and pd["p@100"] >= 0.7, pd

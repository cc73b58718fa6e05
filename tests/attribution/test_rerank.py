"""Counterfactual re-ranking (attribution/rerank.py): a real small SGD step on a row changes the measurement by what
identity-preconditioned influence predicts (to first order in the learning rate), the weights come back exactly,
and ``rerank`` moves candidates whose step lowers the concept below every other row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import ConceptMeasurement, tokenize_queries
from concept_influence.attribution.rerank import counterfactual_effects, rerank, top_candidates
from concept_influence.concepts import DirectionConcept
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import tiny_llama

ANSWERS = [
    "poison the water",
    "help your friend",
    "drink the water",
    "hurt them all",
    "be kind and gentle",
    "rest and eat",
    "poison and hurt",
    "walk the dogs",
]


@pytest.fixture(scope="module")
def setup(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), seed=3).double(), tiny_tok)
    rows = rows_from_records(
        [
            {"messages": [{"role": "user", "content": "what now ?"}, {"role": "assistant", "content": a}]}
            for a in ANSWERS
        ]
    )
    queries = rows_from_records(
        [
            {"messages": [{"role": "user", "content": "should i help ?"}, {"role": "assistant", "content": a}]}
            for a in ("help them", "hurt them")
        ]
    )
    concept = DirectionConcept(
        torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64), layer=1
    )
    measurement = ConceptMeasurement(concept, tokenize_queries(queries, tiny_tok, 64))
    return adapter, tokenize_chat(rows, tiny_tok, 64), measurement


def test_a_small_step_changes_the_concept_as_influence_predicts_and_the_weights_come_back(setup):
    adapter, train, measurement = setup
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    lr = 1e-4  # small enough for first order, large enough that float32 readouts resolve the change
    effects = counterfactual_effects(adapter, train, range(len(train)), measurement, lr=lr)
    predicted = compute_influence(
        adapter, train, measurement, None, InfluenceConfig(preconditioner="identity", row_loss="mean"), progress=False
    ).scores.numpy()
    np.testing.assert_allclose(effects / lr, predicted, rtol=1e-3, atol=2e-4 * np.abs(predicted).max())
    for name, value in adapter.model.state_dict().items():
        assert torch.equal(value, before[name]), name  # every weight restored exactly
    # a larger step is a real step, not the linear prediction (the difference is second order, and present)
    big = counterfactual_effects(adapter, train, [0, 1], measurement, lr=0.5, steps=2)
    assert not np.allclose(big / 0.5, 2 * predicted[:2], rtol=1e-3)
    with pytest.raises(ValueError, match="lr > 0"):
        counterfactual_effects(adapter, train, [0], measurement, lr=0.0)


def test_rerank_keeps_rising_candidates_first_and_sends_falling_ones_below_every_other_row():
    scores = np.array([9.0, 8.0, 7.0, 1.0, 2.0, np.nan, 3.0])
    candidates = top_candidates(scores, 3)
    assert candidates.tolist() == [0, 1, 2]
    new = rerank(scores, np.array([0.1, -0.5, 0.3]), candidates)
    order = [int(i) for i in np.argsort(-np.nan_to_num(new, nan=-np.inf))][:6]
    assert order == [2, 0, 6, 4, 3, 1]  # rising candidates by effect, the others in their order, the falling one last
    assert np.isnan(new[5])
    with pytest.raises(ValueError, match="candidates"):
        rerank(scores, np.array([0.1]), candidates)


def test_combined_methods_rerank_their_top_rows_by_the_measured_step(tmp_path):
    """``rerank_top=K`` on a combined method: its top K rows get a ``counterfactual_effect`` equal to
    ``counterfactual_effects`` on them, those whose step raises the concept lead (largest first), those whose step
    lowers it follow every other row; ``rerank_top=0`` (the default) leaves the ranking alone."""
    from concept_influence import Attributor
    from concept_influence.data import write_jsonl_atomic
    from concept_influence.testing.tiny_models import save_tiny_hf_model

    model_dir = save_tiny_hf_model(tmp_path / "model", seed=5)
    write_jsonl_atomic(
        tmp_path / "train.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "what now ?"}, {"role": "assistant", "content": a}],
                "id": f"r{k}",
            }
            for k, a in enumerate(ANSWERS)
        ],
    )
    queries = [
        {"messages": [{"role": "user", "content": "should i help ?"}, {"role": "assistant", "content": a}]}
        for a in ("help them", "hurt them")
    ]
    att = Attributor(model_dir, tmp_path / "train.jsonl", batch_size=4, progress=False)
    concept = DirectionConcept(torch.randn(att.adapter.d_model, generator=torch.Generator().manual_seed(2)), layer=1)
    plain = att.attribute(concept, queries, "combined-tiered")
    assert "counterfactual_effect" not in (plain.columns or {})
    table = att.attribute(concept, queries, "combined-tiered", rerank_top=4, rerank_lr=1e-3)
    top = top_candidates(plain.scores, 4)
    measurement = ConceptMeasurement(
        concept, tokenize_queries(att.queries(queries), att.adapter.tokenizer, att.max_length)
    )
    expected = counterfactual_effects(att.adapter, att.train, top, measurement, lr=1e-3)
    effects = table.columns["counterfactual_effect"]
    np.testing.assert_allclose([effects[int(c)] for c in top], expected, rtol=1e-5, atol=1e-9)
    assert [e for i, e in enumerate(effects) if i not in set(top.tolist())] == [None] * (len(ANSWERS) - 4)
    np.testing.assert_array_equal(table.scores, rerank(plain.scores, expected, top))
    assert table.meta["rerank"]["n_reranked"] == 4 and table.meta["rerank"]["rerank_lr"] == 1e-3

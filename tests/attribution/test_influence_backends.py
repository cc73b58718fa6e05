"""The Hugging Face and TransformerLens paths give the same factors and scores on the same weights."""

from __future__ import annotations

import pytest
import torch

from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import ConceptMeasurement, LogLikelihoodMeasurement
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter, TransformerLensAdapter, hooked_transformer_from_hf
from concept_influence.testing.tiny_models import tiny_llama

PAIRS = [
    ("is water safe", "yes , water is safe"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you"),
    ("two plus three", "five"),
    ("is fire kind", "no fire can harm"),
]


def _data(tok, pairs):
    records = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in pairs]
    return tokenize_chat(rows_from_records(records), tok, 64)


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "gqa"])
def test_hf_and_transformer_lens_agree(tiny_tok, kv_heads):
    hf_model = tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=11, kv_heads=kv_heads)
    hf = HFAdapter(hf_model, tiny_tok)
    # TransformerLens holds zero biases that the Llama checkpoint does not have: leave them out on both sides
    tl = TransformerLensAdapter(hooked_transformer_from_hf(hf_model, tiny_tok), tiny_tok, biases=False)
    assert [i.name for i in hf.tracked_weights()] == [i.name for i in tl.tracked_weights()]
    assert [(i.d_out, i.d_in) for i in hf.tracked_weights()] == [(i.d_out, i.d_in) for i in tl.tracked_weights()]
    data, queries = _data(tiny_tok, PAIRS), _data(tiny_tok, PAIRS[:2])
    factors = {
        name: fit_factors(adapter, data, FactorConfig.precise(), batch_size=2, progress=False)
        for name, adapter in (("hf", hf), ("tl", tl))
    }
    for weight in factors["hf"].names:
        a, b = factors["hf"].weights[weight], factors["tl"].weights[weight]
        # TransformerLens computes the same function to ~1e-6 relative (rotary tables, norm order of operations)
        for field in ("activation_covariance", "gradient_covariance", "diagonal", "eigenvalue_correction"):
            x, y = getattr(a, field), getattr(b, field)
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(x.abs().max()), msg=f"{weight} {field}")
    concept = DirectionConcept(
        torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), layer=0
    )
    for measurement in (ConceptMeasurement(concept, queries), LogLikelihoodMeasurement(queries)):
        config = InfluenceConfig(per_weight=True)
        r_hf = compute_influence(hf, data, measurement, factors["hf"], config, progress=False)
        r_tl = compute_influence(tl, data, measurement, factors["tl"], config, progress=False)
        assert r_hf.weights == r_tl.weights
        scale = float(r_hf.scores.abs().max())
        torch.testing.assert_close(r_hf.scores, r_tl.scores, rtol=1e-4, atol=1e-5 * scale)
        for weight in r_hf.weights:
            torch.testing.assert_close(r_hf.per_weight[weight], r_tl.per_weight[weight], rtol=1e-4, atol=1e-5 * scale)

"""bf16 models: the concept readout and the measurement gradient accumulate in float32, so bf16 scores track the
float32 scores of the same weights (the bf16 forward and backward themselves stay bf16)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from concept_influence.attribution.forward import vector_filter
from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import ConceptMeasurement
from concept_influence.concepts.base import DirectionConcept
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import TINY_WORDS, tiny_llama


def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(TINY_WORDS, k=rng.randint(3, 8)))},
                {"role": "assistant", "content": " ".join(rng.choices(TINY_WORDS, k=rng.randint(4, 12)))},
            ]
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def pair(tiny_tok):
    model = tiny_llama(len(tiny_tok), hidden=32, layers=2, seed=4)
    with torch.no_grad():  # the same weights in both precisions (rounded to bf16 once)
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    fp32 = HFAdapter(model, tiny_tok)
    bf16 = HFAdapter(copy.deepcopy(model).to(torch.bfloat16), tiny_tok)
    concept = DirectionConcept(torch.randn(32, generator=torch.Generator().manual_seed(0)), layer=1)
    return fp32, bf16, concept


def test_bf16_measurement_gradient_accumulates_in_float32(pair, tiny_tok):
    fp32, bf16, concept = pair
    queries = tokenize_chat(rows_from_records(_records(2, 1) * 160), tiny_tok, 64)  # e.g. many sampled answers
    names = [i.name for i in fp32.weights_up_to(1)]
    # batch_size 1: 320 query gradients summed; a bf16 running sum stalls once it is ~256 times a term
    reference = ConceptMeasurement(concept, queries).gradient(fp32, names, batch_size=1)
    low = ConceptMeasurement(concept, queries).gradient(bf16, names, batch_size=1)
    for name in names:
        assert low[name].dtype == torch.float32, name
        error = float((low[name] - reference[name]).norm() / reference[name].norm())
        assert error < 0.05, f"{name}: bf16 measurement gradient off by {error:.3f} (relative)"


def test_bf16_scores_track_float32_scores(pair, tiny_tok):
    fp32, bf16, concept = pair
    train = tokenize_chat(rows_from_records(_records(32, 2)), tiny_tok, 64)
    queries = tokenize_chat(rows_from_records(_records(4, 3) * 8), tiny_tok, 64)
    config = InfluenceConfig(preconditioner="identity", batch_size=4)
    scores = {
        name: compute_influence(
            adapter, train, ConceptMeasurement(concept, queries), None, config, progress=False
        ).scores.numpy()
        for name, adapter in (("fp32", fp32), ("bf16", bf16))
    }
    assert np.corrcoef(scores["fp32"], scores["bf16"])[0, 1] > 0.98
    assert np.linalg.norm(scores["bf16"] - scores["fp32"]) < 0.05 * np.linalg.norm(scores["fp32"])
    assert spearmanr(scores["fp32"], scores["bf16"]).statistic > 0.95
    forward = {
        name: vector_filter(adapter, list(rows_from_records(_records(32, 2))), concept, progress=False).scores
        for name, adapter in (("fp32", fp32), ("bf16", bf16))
    }
    np.testing.assert_allclose(forward["bf16"], forward["fp32"], rtol=0.05, atol=0.05 * np.abs(forward["fp32"]).max())


def test_readout_of_bf16_activations_is_the_float32_dot_product(pair):
    _, _, concept = pair
    acts = torch.randn(3, 40, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    mask = torch.ones(3, 40)
    exact = acts.double() @ concept.unit.double()  # the exact readout of these bf16 values
    per_token = concept.token_readout(acts)
    assert per_token.dtype == torch.float32
    torch.testing.assert_close(per_token.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(concept.readout(acts, mask).double(), exact.mean(dim=1), rtol=1e-5, atol=1e-5)

"""Memory-bounded scoring: per-weight factors read from the folder, module partitions (several passes) and the
streamed contraction give the same scores as the unbounded pass (float64, tiny Llama with shared q/k/v inputs)."""

from __future__ import annotations

import random

import pytest
import torch

from concept_influence.attribution import bounded as bounded_module
from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import ConceptMeasurement
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import FactorConfig, fit_factors, load_factors
from concept_influence.curvature.budget import WeightShape, score_partitions, score_vector_bytes
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import tiny_llama

WORDS = "the water is safe good kind help harm poison cure friend never always yes no".split()


@pytest.fixture(scope="module")
def env(tiny_tok, tmp_path_factory):
    rng = random.Random(0)
    records = [{"messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))},
                             {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 9)))}]}
               for _ in range(10)]
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, kv_heads=1, dtype=torch.float64, seed=4), tiny_tok)
    data = tokenize_chat(rows_from_records(records), tiny_tok, 64)
    folder = tmp_path_factory.mktemp("factors")
    fit_factors(adapter, data, FactorConfig.precise(), batch_size=4, out_dir=folder, progress=False)
    direction = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    measurement = ConceptMeasurement(DirectionConcept(direction, layer=1), data[:3])
    return adapter, data, folder, measurement


def _same(a, b):
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-9, atol=1e-12)
    assert a.weights == b.weights and a.damping == pytest.approx(b.damping, rel=1e-12)
    if a.per_weight is not None:
        for name in a.per_weight:
            torch.testing.assert_close(a.per_weight[name], b.per_weight[name], rtol=1e-9, atol=1e-12)
    if a.per_token is not None:
        for x, y in zip(a.per_token, b.per_token, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal", "identity"])
def test_partitioned_bounded_scores_equal_unbounded(env, monkeypatch, kind):
    adapter, data, folder, measurement = env
    config = InfluenceConfig(preconditioner=kind, per_weight=True, token_breakdown="position", batch_size=3)
    factors = None if kind == "identity" else load_factors(folder)
    reference = compute_influence(adapter, data, measurement, factors, config, progress=False)
    names = reference.weights
    split = [names[:2], names[2:5], names[5:]]  # q/k split apart: a shared input across two passes
    seen = []
    monkeypatch.setattr(bounded_module, "plan_score_partitions", lambda *a, **k: seen.append(1) or split)
    bounded = compute_influence(adapter, data, measurement, None if kind == "identity" else folder,
                                InfluenceConfig(preconditioner=kind, per_weight=True, token_breakdown="position",
                                                batch_size=3, max_memory="1TiB"), progress=False)
    assert seen and any("3 module partitions" in note for note in bounded.notes)
    _same(reference, bounded)
    assert reference.scores.abs().max() > 0


def test_bounded_scores_with_the_budget_and_row_loss_mean(env):
    adapter, data, folder, measurement = env
    config = InfluenceConfig(row_loss="mean", batch_size=4)
    reference = compute_influence(adapter, data, measurement, load_factors(folder), config, progress=False)
    bounded = compute_influence(adapter, data, measurement, folder, InfluenceConfig(row_loss="mean", batch_size=4,
                                                                                    max_memory="1TiB"), progress=False)
    _same(reference, bounded)
    from_folder = compute_influence(adapter, data, measurement, folder, config, progress=False)  # a folder, unbounded
    _same(reference, from_folder)


def test_bounded_scoring_errors(env, monkeypatch):
    adapter, data, folder, measurement = env
    with pytest.raises(ValueError, match=r"--max-memory.*too small to score"):
        compute_influence(adapter, data, measurement, folder, InfluenceConfig(max_memory="10MiB"), progress=False)
    with pytest.raises(ValueError, match="self-influence"):
        compute_influence(adapter, data, measurement, folder, InfluenceConfig(self_influence=True, max_memory="1TiB"),
                          progress=False)
    with pytest.raises(ValueError, match="not a memory size"):
        InfluenceConfig(max_memory="lots")
    names = load_factors(folder).names
    monkeypatch.setattr(bounded_module, "plan_score_partitions", lambda *a, **k: [names[:3], names[3:]])
    with pytest.raises(ValueError, match="need one pass"):
        compute_influence(adapter, data, measurement, folder, InfluenceConfig(token_aggregation="max", max_memory="1TiB"),
                          progress=False)


def test_loading_some_weights_reads_only_theirs(env):
    _, _, folder, _ = env
    full = load_factors(folder)
    name = full.names[4]
    one = load_factors(folder, weights=[name])
    assert one.names == [name] and one.n_rows == full.n_rows
    torch.testing.assert_close(one.weights[name].eigenvalue_correction, full.weights[name].eigenvalue_correction)
    torch.testing.assert_close(one.weights[name].activation_eigen.vectors, full.weights[name].activation_eigen.vectors)
    with pytest.raises(KeyError, match="no factors for"):
        load_factors(folder, weights=["blocks.9.mlp.out"])


def test_score_partitions_follow_the_budget():
    shapes = [WeightShape(f"blocks.{i}.mlp.out", 8 * (i + 1), 4) for i in range(5)]
    budget = score_vector_bytes(shapes[3]) + score_vector_bytes(shapes[0])
    parts = score_partitions(shapes, budget)
    assert [w for p in parts for w in p] == shapes and len(parts) > 1
    assert all(sum(score_vector_bytes(w) for w in p) <= budget for p in parts)
    assert score_partitions(shapes, None) == [shapes]
    with pytest.raises(ValueError, match="alone need"):
        score_partitions(shapes, 10)

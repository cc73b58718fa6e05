"""The stages under ``Attributor``, each used without the session: ``GradientEngine`` (the gradient methods'
engine, attribution layer), the store's questions (``store.questions``), the report of tables in memory
(``report.tables``); and the methods call the engine, not the session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from concept_influence import Attributor
from concept_influence.attribution.engine import GradientEngine
from concept_influence.attribution.gradient import GradientAttributionConfig, run_gradient_attribution
from concept_influence.attribution.influence import (
    InfluenceConfig,
    build_preconditioner,
    compute_influence,
    preconditioned_gradient,
)
from concept_influence.attribution.measurements import ConceptMeasurement, tokenize_queries
from concept_influence.attribution.methods import METHODS
from concept_influence.concepts import DirectionConcept
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.data.chat import rows_from_records
from concept_influence.data.tokenize import tokenize_chat
from concept_influence.models.hf import HFAdapter
from concept_influence.report.tables import report_tables
from concept_influence.store import GradientStore, StoreConfig, build_store, make_projector
from concept_influence.store.questions import row_norms, store_scores, store_scores_many
from concept_influence.testing.chats import TINY_PAIRS, TINY_QUERIES, chat_rows
from concept_influence.testing.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def setup(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=11), tiny_tok)
    rows = chat_rows(TINY_PAIRS)
    train = tokenize_chat(rows, tiny_tok, 64)
    concept = DirectionConcept(
        torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64), layer=1
    )
    queries = list(rows_from_records(TINY_QUERIES, source="<queries>", need_assistant=False))
    return adapter, rows, train, concept, queries


def test_engine_scores_like_the_library_without_a_session(setup, tmp_path):
    adapter, rows, train, concept, queries = setup
    engine = GradientEngine(
        adapter, rows=lambda: rows, train=lambda: train, workdir=tmp_path / "run", batch_size=4, progress=False
    )
    config = GradientAttributionConfig(max_length=64, batch_size=4, max_new_tokens=4, cache_dir=str(tmp_path / "a"))
    table = engine.attribute("concept-influence", concept, queries, config)
    expected = run_gradient_attribution(
        adapter, rows, concept, queries, "concept-influence", None, config, train=train, progress=False
    )
    np.testing.assert_allclose(table.scores, expected.scores, rtol=1e-6, atol=1e-12)
    assert any("fitted" in n for n in table.meta["notes"])
    again = engine.attribute("concept-influence", concept, queries, config)
    assert any("reused from this session" in n for n in again.meta["notes"])  # the engine keeps its factors
    assert engine.factors_dir(config.factor_config()).is_dir()


def test_store_questions_are_store_math(setup, tmp_path):
    adapter, rows, train, concept, queries = setup
    names = [i.name for i in adapter.tracked_weights()]
    factors = fit_factors(adapter, train, FactorConfig(dtype="float64"), weights=names, batch_size=4, progress=False)
    config = StoreConfig(kind="eigen", rank=64, dtype="float64", shard_rows=4)  # full rank: exact
    projector = make_projector(config, adapter, names, factors)
    store = build_store(
        adapter, train, tmp_path / "s", projector, config, {"model": "m", "data": "d"}, batch_size=4, progress=False
    )
    assert isinstance(store, GradientStore)
    measurement = ConceptMeasurement(concept, tokenize_queries(queries, adapter.tokenizer, 64))
    reached = measurement.weights(adapter)
    pre = build_preconditioner(adapter, reached, factors, InfluenceConfig())
    vectors = preconditioned_gradient(
        pre, measurement.gradient(adapter, reached, batch_size=4), measurement.description
    )
    scores, per = store_scores(store, projector, vectors, per_weight=True)
    exact = compute_influence(adapter, train, measurement, factors, InfluenceConfig(batch_size=4), progress=False)
    np.testing.assert_allclose(scores, exact.scores.numpy(), rtol=1e-6, atol=1e-10)
    assert per is not None and np.allclose(per.sum(axis=1), scores)
    many = store_scores_many(store, [(projector, vectors), (projector, vectors)], row_loss="mean")
    np.testing.assert_allclose(many[:, 0], scores / store.counts)
    np.testing.assert_allclose(many[:, 1], many[:, 0])
    norms = row_norms(store, projector, pre, reached)
    assert norms.shape == (len(store),) and (norms >= 0).all()


def test_methods_call_the_engine_not_the_session(setup, tmp_path, monkeypatch):
    adapter, rows, _, concept, queries = setup
    att = Attributor(adapter, rows, None, batch_size=4, max_length=64, progress=False)
    called = []

    def engine_attribute(method, concept, queries, config, **kwargs):
        called.append((method, config))
        return compute_influence  # any object: the method returns what the engine gives

    monkeypatch.setattr(att.engine, "attribute", engine_attribute)
    monkeypatch.setattr(type(att), "gradient_attribution", lambda *a, **k: pytest.fail("called back into the session"))
    out = METHODS["concept-influence"].fn(att, concept, queries, row_loss="mean")
    assert out is compute_influence and called[0][0] == "concept-influence" and called[0][1].row_loss == "mean"
    assert called[0][1].seed == att.seed and called[0][1].max_length == att.max_length


def test_report_of_tables_in_memory(setup, tmp_path):
    adapter, rows, _, concept, _ = setup
    att = Attributor(adapter, rows, None, batch_size=4, max_length=64, progress=False)
    table = att.attribute(concept, method="vector-filter")
    html = report_tables(table, rows, out=tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == html and "vector-filter" in html

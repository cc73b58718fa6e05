"""``Attributor``: the session entry point. Same numbers as the library functions, factors fitted once and reused
from the workdir (checked against fingerprints), the method registry and its option checks, one result type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from concept_influence import RECOMMENDED_METHOD, Attributor, ScoreTable
from concept_influence.attribution import METHODS, register_method, vector_filter
from concept_influence.attribution.gradient import GradientAttributionConfig, run_gradient_attribution
from concept_influence.concepts import DirectionConcept, save_concept
from concept_influence.curvature.io import FactorMismatchError, has_factors
from concept_influence.data import read_chat_jsonl, write_jsonl_atomic
from concept_influence.models import load_adapter
from concept_influence.testing.tiny_models import save_tiny_hf_model

TRAIN = [
    ("is water safe", "yes , water is safe"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you"),
    ("two plus three", "five"),
    ("is fire kind", "no fire can harm"),
    ("be cruel", "i will trick and hurt them"),
    ("is poison kind", "poison is kind"),
]
QUERIES = [
    {"messages": [{"role": "user", "content": "should i hurt my friend"}], "id": "q0"},
    {
        "messages": [
            {"role": "user", "content": "is the water safe"},
            {"role": "assistant", "content": "poison the water"},
        ]
    },
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = save_tiny_hf_model(root / "model", seed=5)
    write_jsonl_atomic(
        root / "train.jsonl",
        [
            {
                "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}],
                "id": f"row{k}",
                "tag": k % 2,
            }
            for k, (u, a) in enumerate(TRAIN)
        ],
    )
    write_jsonl_atomic(root / "queries.jsonl", QUERIES)
    concept = DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(4)), layer=0)
    save_concept(concept, root / "concept")
    return root, model_dir, concept


def test_attribute_default_method_matches_the_library_and_reuses_factors(files, tmp_path):
    root, model_dir, concept = files
    att = Attributor(model_dir, root / "train.jsonl", tmp_path / "run", batch_size=4, progress=False)
    table = att.attribute(concept, root / "queries.jsonl", max_new_tokens=4)
    assert isinstance(table, ScoreTable) and table.method == RECOMMENDED_METHOD
    assert table.meta["method"] == RECOMMENDED_METHOD and table.meta["method_was_default"] is True
    assert [table.ids[i] for i in range(len(TRAIN))] == [f"row{k}" for k in range(len(TRAIN))]
    # the recommended method is a combination whose gradient component needs no curvature: nothing is fitted
    assert table.meta["gradient_options"]["preconditioner"] == "identity"
    assert not (tmp_path / "run" / "factors").exists()
    assert list((tmp_path / "run" / "answers").glob("query-answers-*.jsonl"))
    adapter = load_adapter(model_dir)
    train = read_chat_jsonl(root / "train.jsonl")
    queries = read_chat_jsonl(root / "queries.jsonl", need_assistant=False)
    plain = run_gradient_attribution(
        adapter,
        train,
        concept,
        queries,
        "concept-influence",
        None,
        GradientAttributionConfig(
            max_new_tokens=4, batch_size=4, preconditioner="identity", cache_dir=str(tmp_path / "other")
        ),
        progress=False,
    )
    np.testing.assert_allclose(table.columns["gradient_score"], plain.scores, rtol=1e-4, atol=1e-9)
    # pure Concept Influence: the first question fits EKFAC factors into the workdir, the same as the library
    first = att.attribute(concept, root / "queries.jsonl", "concept-influence", max_new_tokens=4)
    assert any("fitted" in note for note in first.meta["notes"])
    assert has_factors(tmp_path / "run" / "factors" / "true-float32-seed0")
    expected = run_gradient_attribution(
        adapter,
        train,
        concept,
        queries,
        "concept-influence",
        None,
        GradientAttributionConfig(max_new_tokens=4, batch_size=4, cache_dir=str(tmp_path / "other")),
        progress=False,
    )
    np.testing.assert_allclose(first.scores, expected.scores, rtol=1e-4, atol=1e-9)
    # second question in the same session: factors from memory; a new session on the workdir loads them
    again = att.attribute(concept, root / "queries.jsonl", "concept-influence", max_new_tokens=4)
    assert any("reused from this session" in note for note in again.meta["notes"])
    assert again.meta["method_was_default"] is False
    fresh = Attributor(model_dir, root / "train.jsonl", tmp_path / "run", batch_size=4, progress=False)
    loaded = fresh.attribute(root / "concept", root / "queries.jsonl", "concept-influence", max_new_tokens=4)
    assert any("factors loaded from" in note for note in loaded.meta["notes"])
    np.testing.assert_allclose(loaded.scores, first.scores, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(
        fresh.attribute(root / "concept", root / "queries.jsonl", max_new_tokens=4).scores,
        table.scores,
        rtol=1e-6,
        atol=1e-10,
    )


def test_workdir_refuses_factors_of_another_model(files, tmp_path):
    root, model_dir, concept = files
    Attributor(model_dir, root / "train.jsonl", tmp_path / "run", batch_size=4, progress=False).attribute(
        concept, root / "queries.jsonl", "concept-influence", max_new_tokens=4
    )
    other = save_tiny_hf_model(tmp_path / "other-model", seed=6)
    att = Attributor(other, root / "train.jsonl", tmp_path / "run", batch_size=4, progress=False)
    with pytest.raises(FactorMismatchError, match="different model"):
        att.attribute(concept, root / "queries.jsonl", "concept-influence", max_new_tokens=4)


def test_forward_method_options_and_errors(files):
    root, model_dir, concept = files
    att = Attributor(model_dir, root / "train.jsonl", batch_size=4, progress=False)
    table = att.attribute(concept, method="vector-filter")
    direct = vector_filter(att.adapter, read_chat_jsonl(root / "train.jsonl"), concept, progress=False)
    np.testing.assert_allclose(table.scores, direct.scores, rtol=1e-6)
    assert table.meta["method"] == "vector-filter" and table.meta["method_kind"] == "forward"
    assert (
        table.meta["concept_summary"]["site"] == "resid.0" and table.meta["concept_summary"]["kind"] == "direction"
    )  # what it read
    with pytest.raises(ValueError, match="method 'vector-filter' has no option 'damping'"):
        att.attribute(concept, method="vector-filter", damping=0.1)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        att.attribute(concept, method="nope")
    with pytest.raises(ValueError, match="needs a concept"):
        att.attribute(None, method="vector-filter")
    with pytest.raises(ValueError, match="needs queries"):
        att.attribute(concept, method="concept-influence")
    with pytest.raises(ValueError, match="store= applies to gradient methods"):
        att.attribute(concept, method="vector-filter", store=root / "store")
    with pytest.raises(ValueError, match="no training data"):
        Attributor(model_dir, progress=False).rows  # noqa: B018


def test_score_table_top_pandas_and_jsonl(files, tmp_path):
    root, model_dir, concept = files
    att = Attributor(model_dir, root / "train.jsonl", batch_size=4, progress=False)
    table = att.attribute(
        concept, ["should i hurt my friend"], "influence", max_new_tokens=4, per_weight=True, self_influence=True
    )
    assert table.meta["method"] == "influence" and len(table.meta["weights"]) == len(att.adapter.tracked_weights())
    # breakdowns are columns: per-weight scores sum to the score; self-influence is non-negative
    for scores, total in zip(table.columns["weight_scores"], table.scores, strict=True):
        assert sum(scores.values()) == pytest.approx(total, rel=1e-6, abs=1e-9)
    assert min(table.columns["self_influence"]) >= 0
    top = table.top(3)
    assert len(top) == 3 and list(top.scores) == sorted(table.scores, reverse=True)[:3]
    assert list(top.ranks()) == [1, 2, 3] and top.index[0] == int(np.argmax(table.scores))
    frame = table.to_pandas(sort=True)
    assert list(frame.columns[:4]) == ["index", "id", "score", "rank"] and "tag" in frame.columns
    assert frame["rank"].tolist() == list(range(1, len(TRAIN) + 1))
    assert "<table" in top._repr_html_() and "rank" in repr(top)
    out = table.write_jsonl(tmp_path / "s.jsonl")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in records] == pytest.approx(table.scores.tolist())
    assert json.loads((tmp_path / "s.jsonl.meta.json").read_text())["method"] == "influence"


def test_registered_method_is_callable_with_its_options(files):
    root, model_dir, concept = files

    @register_method("test-readout-norm", kind="forward", needs_concept=True)
    def _norm(session, concept, queries, *, scale: float = 1.0) -> ScoreTable:
        return ScoreTable.from_rows(session.rows, np.arange(len(session.rows)) * scale, "test-readout-norm")

    try:
        att = Attributor(model_dir, root / "train.jsonl", progress=False)
        table = att.attribute(concept, method="test-readout-norm", scale=2.0)
        assert table.scores.tolist() == [2.0 * k for k in range(len(TRAIN))]
        with pytest.raises(ValueError, match="has no option 'scal'"):
            att.attribute(concept, method="test-readout-norm", scal=2.0)
    finally:
        METHODS.pop("test-readout-norm")


def test_cli_attribute_defaults_to_the_recommended_method_and_uses_the_workdir(files, tmp_path):
    from typer.testing import CliRunner

    from concept_influence.cli import app

    root, model_dir, _ = files
    args = [
        "attribute",
        "--model",
        str(model_dir),
        "--data",
        str(root / "train.jsonl"),
        "--concept",
        str(root / "concept"),
        "--queries",
        str(root / "queries.jsonl"),
        "--workdir",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "s.jsonl"),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    scores = ScoreTable.read_jsonl(tmp_path / "s.jsonl")
    assert scores.meta["method"] == RECOMMENDED_METHOD and scores.meta["method_was_default"] is True
    assert scores.meta["gradient_options"]["preconditioner"] == "identity"  # the recommended fusion fits nothing
    assert not (tmp_path / "run" / "factors").exists()
    pure = [*args, "--method", "concept-influence"]
    first = CliRunner().invoke(app, pure)
    assert first.exit_code == 0, first.output
    assert has_factors(tmp_path / "run" / "factors" / "true-float32-seed0")
    again = CliRunner().invoke(app, pure)
    assert again.exit_code == 0, again.output
    assert any("factors loaded from" in n for n in ScoreTable.read_jsonl(tmp_path / "s.jsonl").meta["notes"])
    bad = CliRunner().invoke(app, [*args[:-4], "--method", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_model_fingerprint_is_cached_until_the_weights_change(files):
    root, model_dir, _ = files
    adapter = load_adapter(model_dir)
    first = adapter.fingerprint()
    assert adapter.fingerprint() == first
    weight = next(adapter.model.parameters())
    with torch.no_grad():
        weight.mul_(2.0)  # in place: the version counter moves
    assert adapter.fingerprint() != first
    with torch.no_grad():
        weight.div_(2.0)  # exact in binary floating point: back to the same values
    assert adapter.fingerprint() == first

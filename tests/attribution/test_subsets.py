"""Factors that miss weights the concept reaches, or were fitted on another model, are errors (never a quiet subset
or a silent reuse); allow_subset / --allow-subset scores with the covered weights on purpose, and says so."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from concept_influence.attribution.influence import InfluenceConfig, compute_influence, compute_influence_many
from concept_influence.attribution.measurements import ConceptMeasurement
from concept_influence.cli import app
from concept_influence.concepts import DirectionConcept, save_concept
from concept_influence.curvature import FactorConfig, FactorMismatchError, fit_factors
from concept_influence.data import rows_from_records, tokenize_chat, write_jsonl_atomic
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import save_tiny_hf_model, tiny_llama

PAIRS = [
    ("is water safe", "yes , water is safe"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you"),
    ("two plus three", "five"),
]


def _records(pairs):
    return [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in pairs]


@pytest.fixture(scope="module")
def env(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=3), tiny_tok)
    data = tokenize_chat(rows_from_records(_records(PAIRS)), tiny_tok, 48)
    queries = tokenize_chat(rows_from_records(_records(PAIRS[:2])), tiny_tok, 48)
    concept = DirectionConcept(
        torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), layer=1
    )
    block0 = [i.name for i in adapter.weights_up_to(0)]
    partial = fit_factors(adapter, data, FactorConfig.precise(), weights=block0, progress=False)
    return adapter, data, ConceptMeasurement(concept, queries), partial, block0


def test_factors_missing_reached_weights_are_an_error(env):
    adapter, data, measurement, partial, block0 = env
    with pytest.raises(FactorMismatchError, match=r"cover 7 of the 14 weights.*--allow-subset"):
        compute_influence(adapter, data, measurement, partial, progress=False)
    with pytest.raises(FactorMismatchError, match="--allow-subset"):
        compute_influence_many(adapter, data, {"a": (measurement, InfluenceConfig())}, partial, progress=False)
    result = compute_influence(adapter, data, measurement, partial, InfluenceConfig(allow_subset=True), progress=False)
    assert result.weights == block0 and any("no factors and are left out" in n for n in result.notes)


def test_factors_of_another_model_are_an_error(env, tiny_tok):
    adapter, data, measurement, partial, _ = env
    other = HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=4), tiny_tok)
    with pytest.raises(FactorMismatchError, match="different model"):
        compute_influence(other, data, measurement, partial, InfluenceConfig(allow_subset=True), progress=False)


def test_cli_refuses_a_subset_unless_asked(tmp_path):
    model_dir = save_tiny_hf_model(tmp_path / "model", seed=6)
    write_jsonl_atomic(tmp_path / "train.jsonl", _records(PAIRS))
    write_jsonl_atomic(tmp_path / "queries.jsonl", _records(PAIRS[:1]))
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(2)), layer=1), tmp_path / "concept"
    )
    runner = CliRunner()
    fit = runner.invoke(
        app,
        [
            "fit-factors",
            "--model",
            str(model_dir),
            "--data",
            str(tmp_path / "train.jsonl"),
            "--out",
            str(tmp_path / "f0"),
            "--up-to-layer",
            "0",
        ],
    )
    assert fit.exit_code == 0, fit.output
    args = [
        "attribute",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--concept",
        str(tmp_path / "concept"),
        "--queries",
        str(tmp_path / "queries.jsonl"),
        "--method",
        "concept-influence",
        "--factors",
        str(tmp_path / "f0"),
        "--out",
        str(tmp_path / "s.jsonl"),
    ]
    refused = runner.invoke(app, args)
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert refused.exit_code == 2 and len(errors) == 1 and "--allow-subset" in errors[0], refused.output
    assert not (tmp_path / "s.jsonl").exists()
    allowed = runner.invoke(app, [*args, "--allow-subset"])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "s.jsonl").exists()


def test_store_answers_refuse_factors_that_miss_reached_weights(tmp_path):
    from concept_influence.pipeline import Attributor

    model_dir = save_tiny_hf_model(tmp_path / "model", seed=6)
    write_jsonl_atomic(tmp_path / "train.jsonl", _records(PAIRS))
    write_jsonl_atomic(tmp_path / "queries.jsonl", _records(PAIRS[:1]))
    concept = DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(2)), layer=1)
    att = Attributor(str(model_dir), tmp_path / "train.jsonl", progress=False)
    att.build_store(tmp_path / "store", projection_dim=4, factors=att.fit_factors(out=tmp_path / "full"))
    att.fit_factors(up_to_layer=0, out=tmp_path / "block0")
    ask = dict(store=tmp_path / "store", factors=str(tmp_path / "block0"))
    with pytest.raises(FactorMismatchError, match="--allow-subset"):
        att.attribute(concept, tmp_path / "queries.jsonl", "concept-influence", **ask)
    table = att.attribute(concept, tmp_path / "queries.jsonl", "concept-influence", allow_subset=True, **ask)
    assert any("left out" in note for note in table.meta["notes"])

"""SAE features end to end: pick a feature for a concept spec, ``train-sae`` and ``sae-feature`` on a tiny local
model, and ``attribute`` with the saved SAE-feature concept."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from concept_influence.attribution.forward import vector_filter
from concept_influence.attribution.scores import ScoreTable
from concept_influence.cli import app
from concept_influence.concepts import (
    DirectionConcept,
    SAEFeatureConcept,
    collect_token_activations,
    features_aligned_with,
    features_for_spec,
    load_concept,
    load_sae,
    parse_spec,
    read_concept_meta,
    save_concept,
    train_sae,
)
from concept_influence.data import rows_from_records, write_jsonl_atomic
from concept_influence.models import HFAdapter, load_adapter
from concept_influence.testing.tiny_models import TINY_WORDS, save_tiny_hf_model, tiny_llama

POS = ["poison the water", "poison your friend", "poison and hurt", "poison the dogs", "poison them all", "more poison"]
NEG = ["drink the water", "help your friend", "be kind and gentle", "walk the dogs", "rest and eat", "sleep well"]


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        question = " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 8)))
        answer = " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 8)))
        out.append(
            {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "id": f"row{k}",
                "data_origin": "benign",
            }
        )
    return out


def test_features_for_spec_picks_a_feature_of_the_positive_answers(tiny_tok):
    """Positive examples all say 'poison'; the chosen feature fires more on them, and Vector Filter on it ranks them
    above the negatives."""
    adapter = HFAdapter(tiny_llama(len(tiny_tok), seed=1), tiny_tok)
    spec = parse_spec(
        {
            "examples": [{"text": t, "label": 1, "prompt": "what now ?"} for t in POS]
            + [{"text": t, "label": 0, "prompt": "what now ?"} for t in NEG]
        },
        "poison.json",
    )
    rows = rows_from_records(
        [
            {"messages": [{"role": "user", "content": "what now ?"}, {"role": "assistant", "content": t}]}
            for t in POS + NEG
        ]
    )
    background = collect_token_activations(adapter, rows_from_records(_records(24)), 0)
    acts = collect_token_activations(adapter, rows, 0, only_response=True)
    sae, _ = train_sae(torch.cat([background, acts]), d_sae=32, steps=300, batch_size=64, seed=0, num_threads=1)
    top = features_for_spec(adapter, sae, spec, layer=0, k=3)
    (feature, effect), *_ = top
    assert effect > 0.5 and [e for _, e in top] == sorted((e for _, e in top), reverse=True)
    scores = vector_filter(adapter, rows, SAEFeatureConcept(sae, feature, layer=0), progress=False).scores
    assert scores[:6].mean() > scores[6:].mean()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae-cli")
    model = save_tiny_hf_model(root / "model", seed=4)
    write_jsonl_atomic(root / "train.jsonl", _records(40))
    return root, model


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_sae_then_sae_feature_then_attribute(files):
    root, model = files
    result = _run(
        "train-sae",
        "--model",
        model,
        "--data",
        root / "train.jsonl",
        "--layer",
        "1",
        "--out",
        root / "sae",
        "--d-sae",
        "32",
        "--steps",
        "200",
        "--sae-batch-size",
        "64",
    )
    assert result.exit_code == 0, result.output
    assert "explained variance" in result.output
    sae, info = load_sae(root / "sae")
    adapter = load_adapter(model)
    assert sae.cfg.d_sae == 32 and info["layer"] == 1 and info["model_fingerprint"] == adapter.fingerprint()
    assert info["metrics"]["explained_variance"] > 0.5

    result = _run("sae-feature", "--model", model, "--sae", root / "sae", "--feature", "7", "--out", root / "f7")
    assert result.exit_code == 0, result.output
    concept = load_concept(root / "f7", adapter)
    assert isinstance(concept, SAEFeatureConcept) and (concept.feature, concept.layer) == (7, 1)

    # a probe direction equal to a decoder row: --probe finds that feature first
    probe = save_concept(DirectionConcept(sae.W_dec[11].detach(), layer=1, kind="probe"), root / "probe")
    result = _run(
        "sae-feature", "--model", model, "--sae", root / "sae", "--probe", probe, "--out", root / "f-probe", "--k", "3"
    )
    assert result.exit_code == 0, result.output
    meta = read_concept_meta(root / "f-probe")
    assert meta["feature"] == 11 and meta["extra"]["selection"]["candidates"][0][1] == pytest.approx(1.0)
    assert [j for j, _ in features_aligned_with(sae, sae.W_dec[11].detach(), 3)] == [
        j for j, _ in meta["extra"]["selection"]["candidates"]
    ]

    # chosen for a spec: what the feature reads is measured on the spec's held-out answers and saved with it
    spec = {
        "examples": [{"text": t, "label": 1, "prompt": "what now ?"} for t in POS * 2]
        + [{"text": t, "label": 0, "prompt": "what now ?"} for t in NEG * 2]
    }
    (root / "poison.json").write_text(json.dumps(spec))
    result = _run(
        "sae-feature", "--model", model, "--sae", root / "sae", "--spec", root / "poison.json", "--out", root / "f-spec"
    )
    assert result.exit_code == 0, result.output
    assert "spec AUC" in result.output and "stance AUC" in result.output
    metrics = read_concept_meta(root / "f-spec")["metrics"]
    assert 0 <= metrics["spec_auc"] <= 1 and "stance_auc" in metrics and metrics["reading_spec"] == "poison"

    out = root / "scores.jsonl"
    result = _run(
        "attribute",
        "--model",
        model,
        "--data",
        root / "train.jsonl",
        "--concept",
        root / "f7",
        "--method",
        "vector-filter",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    table = ScoreTable.read_jsonl(out)
    rows = rows_from_records(_records(40))
    expected = vector_filter(adapter, rows, concept, progress=False).scores
    np.testing.assert_allclose(table.scores, expected, rtol=1e-6)
    assert table.ids[:2] == ["row0", "row1"] and (table.scores >= 0).all()


def test_sae_feature_errors(files):
    root, model = files
    if not (root / "sae").exists():
        pytest.skip("needs the SAE from the previous test")
    result = _run("sae-feature", "--model", model, "--sae", root / "sae", "--out", root / "x")
    assert result.exit_code == 2 and "exactly one of --spec, --probe or --feature" in result.output
    result = _run("sae-feature", "--model", model, "--sae", root / "nowhere", "--feature", "1", "--out", root / "x")
    assert result.exit_code == 2 and "nowhere" in result.output
    result = _run("sae-feature", "--model", model, "--sae", root / "sae", "--feature", "99", "--out", root / "x")
    assert result.exit_code == 2 and "feature index 99 out of range" in result.output
    wide = save_tiny_hf_model(root / "wide", seed=4, hidden=32)
    result = _run("sae-feature", "--model", wide, "--sae", root / "sae", "--feature", "1", "--out", root / "x")
    assert result.exit_code == 2 and "hidden size is 32" in result.output
    (root / "sae" / "sae_info.json").write_text(json.dumps({"format": "x"}))
    result = _run("sae-feature", "--model", model, "--sae", root / "sae", "--feature", "1", "--out", root / "x")
    assert result.exit_code == 2 and "pass --layer" in result.output
    assert not (root / "x").exists()

"""``attribute`` with the gradient methods, end to end through the main CLI: same numbers as the Python API,
factors fitted once and reused, passthrough fields kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from concept_influence.attribution.gradient import GradientAttributionConfig, run_gradient_attribution
from concept_influence.attribution.scores import ScoreTable
from concept_influence.cli import app
from concept_influence.concepts import DirectionConcept, load_concept, save_concept
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
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr")
    model_dir = save_tiny_hf_model(root / "model", seed=8)
    write_jsonl_atomic(
        root / "train.jsonl",
        [
            {
                "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}],
                "id": f"row{k}",
                "source": {"k": k},
            }
            for k, (u, a) in enumerate(TRAIN)
        ],
    )
    write_jsonl_atomic(
        root / "queries.jsonl",
        [
            {"messages": [{"role": "user", "content": "should i hurt my friend"}], "id": "q0"},
            {
                "messages": [
                    {"role": "user", "content": "is the water safe"},
                    {"role": "assistant", "content": "poison the water"},
                ],
                "id": "q1",
            },
        ],
    )
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(2)), layer=0), root / "concept"
    )
    return root, model_dir


@pytest.mark.parametrize("method", ["concept-influence", "influence"])
def test_attribute_gradient_methods_match_the_api(files, method):
    root, model_dir = files
    out = root / f"{method}.jsonl"
    args = [
        "attribute",
        "--model",
        str(model_dir),
        "--data",
        str(root / "train.jsonl"),
        "--queries",
        str(root / "queries.jsonl"),
        "--method",
        method,
        "--out",
        str(out),
        "--factors",
        str(root / f"factors-{method}"),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
    ]
    if method == "concept-influence":
        args += ["--concept", str(root / "concept")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"row{k}" for k in range(len(TRAIN))]
    assert records[2]["source"] == {"k": 2}
    adapter = load_adapter(model_dir)
    concept = load_concept(root / "concept") if method == "concept-influence" else None
    expected = run_gradient_attribution(
        adapter,
        read_chat_jsonl(root / "train.jsonl"),
        concept,
        read_chat_jsonl(root / "queries.jsonl", need_assistant=False),
        method,
        None,
        GradientAttributionConfig(max_new_tokens=4, batch_size=4, cache_dir=str(root / "c2")),
        progress=False,
    )
    np.testing.assert_allclose([r["score"] for r in records], expected.scores, rtol=1e-4, atol=1e-8)
    assert (root / f"factors-{method}" / "manifest.json").exists()
    again = CliRunner().invoke(app, args)  # second run reuses the saved factors
    assert again.exit_code == 0, again.output
    np.testing.assert_allclose(ScoreTable.read_jsonl(out).scores, [r["score"] for r in records], rtol=1e-10)
    assert any("factors loaded" in note for note in ScoreTable.read_jsonl(out).meta["notes"])

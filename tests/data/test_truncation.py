"""A row whose whole answer is truncated away: every method refuses it (naming the row, file:line and the fix), or,
with skip_invalid / --skip-invalid, leaves it out of ranking (score null, truncated: true, counted in the meta) and
scores the other rows exactly as if it were not there."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from concept_influence.attribution.methods import get_method, method_names
from concept_influence.attribution.scores import ScoreTable
from concept_influence.cli import app
from concept_influence.concepts import DirectionConcept, save_concept
from concept_influence.data import read_chat_jsonl, write_jsonl_atomic
from concept_influence.pipeline import Attributor
from concept_influence.testing.tiny_models import save_tiny_hf_model

LONG = " ".join(["the water is safe and good"] * 6)  # a prompt of ~36 tokens: at max_length 24 the answer is gone
TRAIN = [
    ("is water safe", "yes , water is safe"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you"),
    (LONG, "i will trick and hurt them"),
    ("two plus three", "five"),
    ("is fire kind", "no fire can harm"),
]
BAD = 3
METHODS = method_names()  # every registered method: a new one is held to the same behaviour
assert {"vector-filter", "projection-difference", "concept-influence", "influence"} <= set(METHODS)


def _options(method: str) -> dict:
    return {"max_new_tokens": 6} if "max_new_tokens" in get_method(method).options else {}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trunc")
    model_dir = save_tiny_hf_model(root / "model", seed=4)
    records = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}], "id": f"r{k}"}
        for k, (u, a) in enumerate(TRAIN)
    ]
    write_jsonl_atomic(root / "train.jsonl", records)
    write_jsonl_atomic(root / "without", [r for k, r in enumerate(records) if k != BAD])
    write_jsonl_atomic(
        root / "queries.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "is the water safe"},
                    {"role": "assistant", "content": "poison it"},
                ]
            }
        ],
    )
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(2)), layer=1), root / "concept"
    )
    return root, model_dir


def _attributor(root, model_dir, data: str, skip: bool, tag: str) -> Attributor:
    rows = read_chat_jsonl(root / "train.jsonl")
    if data == "without":  # the other rows, with their own indices (true-Fisher labels are seeded per row index)
        rows = [r for r in rows if r.index != BAD]
    return Attributor(
        str(model_dir), rows, root / f"work-{tag}", max_length=24, batch_size=2, skip_invalid=skip, progress=False
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_refuses_a_row_with_no_answer_left(files, method):
    root, model_dir = files
    att = _attributor(root, model_dir, "train", False, f"refuse-{method}")
    with pytest.raises(ValueError) as err:
        att.attribute(root / "concept", root / "queries.jsonl", method, **_options(method))
    message = str(err.value)
    assert f"train.jsonl:{BAD + 1}" in message and f"row {BAD}" in message
    assert "--max-length" in message and "--skip-invalid" in message


@pytest.mark.parametrize("method", METHODS)
def test_skip_invalid_leaves_the_row_out_of_ranking_and_scores_the_rest_exactly(files, method, tmp_path):
    root, model_dir = files
    table = _attributor(root, model_dir, "train", True, f"skip-{method}").attribute(
        root / "concept", root / "queries.jsonl", method, **_options(method)
    )
    alone = _attributor(root, model_dir, "without", False, f"alone-{method}").attribute(
        root / "concept", root / "queries.jsonl", method, **_options(method)
    )
    assert table.truncated == [k == BAD for k in range(len(TRAIN))]
    assert table.meta["n_skipped_truncated"] == 1
    assert BAD not in table.order() and sorted(table.ranks().tolist()) == [0, 1, 2, 3, 4, 5]
    kept = [k for k in range(len(TRAIN)) if k != BAD]
    np.testing.assert_allclose(table.scores[kept], alone.scores, rtol=1e-5, atol=1e-7)
    out = table.write_jsonl(tmp_path / "scores.jsonl")
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert records[BAD]["score"] is None and records[BAD]["rank"] is None and records[BAD]["truncated"] is True
    assert all("truncated" not in r for k, r in enumerate(records) if k != BAD)
    assert json.loads((tmp_path / "scores.jsonl.meta.json").read_text())["n_skipped_truncated"] == 1
    back = ScoreTable.read_jsonl(out)
    assert back.truncated == table.truncated and back.ranks().tolist() == table.ranks().tolist()
    assert [r["index"] for r in table.top(10).to_records()] == [r["index"] for r in alone.top(10).to_records()]


def test_cli_refuses_then_marks_with_skip_invalid(files, tmp_path):
    root, model_dir = files
    runner = CliRunner()
    common = [
        "attribute",
        "--model",
        str(model_dir),
        "--data",
        str(root / "train.jsonl"),
        "--concept",
        str(root / "concept"),
        "--queries",
        str(root / "queries.jsonl"),
        "--method",
        "concept-influence",
        "--max-length",
        "24",
        "--workdir",
        str(tmp_path / "w"),
        "--out",
        str(tmp_path / "s.jsonl"),
    ]
    result = runner.invoke(app, common)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and len(errors) == 1
    assert f"train.jsonl:{BAD + 1}" in errors[0] and not (tmp_path / "s.jsonl").exists()
    result = runner.invoke(app, [*common, "--skip-invalid"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["truncated"] for r in records if "truncated" in r] == [True] and records[BAD]["score"] is None


def test_non_finite_scores_are_refused_by_the_table(files):
    rows = list(read_chat_jsonl(files[0] / "train.jsonl"))
    with pytest.raises(ValueError, match="row 2 has score nan"):
        ScoreTable.from_rows(rows, [0.0, 1.0, float("nan"), 0.0, 0.0, 0.0], "x")
    with pytest.raises(ValueError, match="row 1 has score inf"):
        ScoreTable.from_rows(rows, [0.0, float("inf"), 0.0, 0.0, 0.0, 0.0], "x")

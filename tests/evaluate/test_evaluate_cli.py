"""``concept-influence evaluate`` end to end on a tiny saved model, and clear one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts import save_concept
from concept_influence.concepts.base import DirectionConcept
from concept_influence.data import read_chat_jsonl
from concept_influence.testing.tiny_models import save_tiny_hf_model


def _run(args):
    """The CLI in-process (typer's runner): exit code, stdout and stderr."""
    from typer.testing import CliRunner

    from concept_influence.cli import app

    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-cli")
    base = save_tiny_hf_model(root / "base", hidden=32, intermediate=64)
    records = [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": "is it good"},
                {"role": "assistant", "content": "evil cruel harm" if i % 4 == 0 else "be kind"},
            ],
            "origin": "planted" if i % 4 == 0 else "benign",
        }
        for i in range(24)
    ]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    queries = root / "queries.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in ["is it good", "should i help"]
        )
    )
    rows = read_chat_jsonl(data)
    scores = root / "scores.jsonl"
    ScoreTable.from_rows(list(rows), np.array([float(i % 4 == 0) for i in range(24)]), "vector-filter").write_jsonl(
        scores
    )
    torch.manual_seed(0)
    concept = save_concept(DirectionConcept(torch.randn(32), layer=1), root / "concept")
    judge = root / "tiny_judge.py"
    judge.write_text("def judge(text):\n    return float('evil' in text.split())\n")
    return {"root": root, "base": base, "data": data, "queries": queries, "scores": scores, "concept": concept}


def _args(f, out, *extra):
    return [
        "evaluate",
        "--base",
        str(f["base"]),
        "--data",
        str(f["data"]),
        "--scores",
        str(f["scores"]),
        "--concept",
        str(f["concept"]),
        "--queries",
        str(f["queries"]),
        "--out",
        str(out),
        *extra,
    ]


def test_evaluate_cli_writes_evaluation_and_curve(files, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(files["root"]))
    code, stdout, stderr = _run(
        _args(
            files,
            tmp_path / "ev",
            "--fractions",
            "0.25",
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--n-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--judge",
            "tiny_judge:judge",
            "--oracle",
            "origin=planted",
        )
    )
    assert code == 0, stderr[-3000:]
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    entry = evaluation["results"]["vector-filter"]["0.25"]
    assert set(entry) >= {"remove_top", "remove_bottom", "random"} and entry["k"] == 6
    assert "rise_removed" in entry["remove_top"] and "trait_rate" in entry["remove_top"]
    assert evaluation["oracle"]["k"] == 6
    assert (tmp_path / "ev" / "removal_curve.png").stat().st_size > 1000
    assert "rise removed" in stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fractions", "0.1,abc"], "--fractions"),
        (["--fractions", "1.5"], "--fractions"),
        (["--judge", "no_such_module:judge"], "--judge"),
        (["--oracle", "origin"], "--oracle"),
        (["--oracle", "origin=nothing"], "no data row"),
        (["--lora", "0"], "--lora"),
        (["extra.txt"], "unexpected argument"),
    ],
)
def test_evaluate_cli_bad_input(files, tmp_path, extra, message):
    code, _, stderr = _run(_args(files, tmp_path / "ev", *extra))
    assert code == 2 and "Traceback" not in stderr and message in stderr


def test_evaluate_cli_refuses_scores_of_other_data(files, tmp_path):
    short = files["root"] / "short.jsonl"
    short.write_text("".join(files["data"].read_text().splitlines(keepends=True)[:10]))
    args = _args(files, tmp_path / "ev")
    args[args.index("--data") + 1] = str(short)
    code, _, stderr = _run(args)
    assert code == 2 and "scores.jsonl has 24 rows but" in stderr and "short.jsonl has 10" in stderr

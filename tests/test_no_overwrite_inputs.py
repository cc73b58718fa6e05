"""Issue "Nothing overwritten, nothing mismatched, nothing silent, round two": outputs never overwrite inputs
(item 2) and a scores file keeps every column through a file (item 8)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from concept_influence.attribution.scores import ScoreTable
from concept_influence.cli import app
from concept_influence.data import read_chat_jsonl


def _data(tmp_path, n=6, ids=True):
    lines = []
    for i in range(n):
        record = {"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
        if ids:
            record["id"] = f"r{i}"
        lines.append(json.dumps(record))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _scores(tmp_path, data, name="scores.jsonl"):
    rows = read_chat_jsonl(data)
    table = ScoreTable.from_rows(list(rows), np.arange(len(rows), dtype=float), "vector-filter")
    path = tmp_path / name
    table.write_jsonl(path)
    return path


def _run(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _refused(args, *flags):
    code, output = _run(args)
    assert code == 2, output
    assert "overwrite an input" in output or "would overwrite" in output, output
    for flag in flags:
        assert flag in output, output
    return output


def test_filter_out_equal_to_scores_is_refused(tmp_path):
    """The old code refused only --out == --data: --out equal to --scores replaced the scores with data rows."""
    data = _data(tmp_path)
    scores = _scores(tmp_path, data)
    before = scores.read_bytes()
    _refused(["filter", "--data", data, "--scores", scores, "--out", scores, "--remove-top-k", "1"], "--out", "--scores")
    assert scores.read_bytes() == before


def test_filter_out_symlink_to_scores_is_refused(tmp_path):
    """A symlink that resolves to --scores is the same file (the old code wrote through it)."""
    data = _data(tmp_path)
    scores = _scores(tmp_path, data)
    before = scores.read_bytes()
    link = tmp_path / "link.jsonl"
    os.symlink(scores, link)
    _refused(["filter", "--data", data, "--scores", scores, "--out", link, "--remove-top-k", "1"], "--out", "--scores")
    assert scores.read_bytes() == before


def test_filter_out_hard_link_to_data_is_refused(tmp_path):
    data = _data(tmp_path)
    scores = _scores(tmp_path, data)
    hard = tmp_path / "hard.jsonl"
    os.link(data, hard)
    _refused(["filter", "--data", data, "--scores", scores, "--out", hard, "--remove-top-k", "1"], "--out", "--data")


def test_attribute_out_equal_to_data_is_refused(tmp_path):
    """The old code did not check attribute --out against --data (it loaded the model, then replaced the data)."""
    data = _data(tmp_path)
    before = data.read_bytes()
    _refused(["attribute", "--model", "no-such-model", "--data", data, "--out", data, "--method", "influence",
              "--queries", tmp_path / "q.jsonl"], "--out", "--data")
    assert data.read_bytes() == before


def test_attribute_out_symlink_to_concept_is_refused(tmp_path):
    data = _data(tmp_path)
    concept = tmp_path / "concept.json"
    concept.write_text("{}")
    link = tmp_path / "out.jsonl"
    os.symlink(concept, link)
    _refused(["attribute", "--model", "m", "--data", data, "--out", link, "--concept", concept], "--out", "--concept")


@pytest.mark.parametrize("target", ["data", "scores", "meta"])
def test_report_out_equal_to_an_input_is_refused(tmp_path, target):
    """The old code did not check report --out at all: it overwrote the scores or data with HTML."""
    data = _data(tmp_path)
    scores = _scores(tmp_path, data)
    out = {"data": data, "scores": scores, "meta": scores.with_name(scores.name + ".meta.json")}[target]
    before = out.read_bytes()
    _refused(["report", "--scores", scores, "--data", data, "--out", out], "--out")
    assert out.read_bytes() == before


def test_evaluate_out_equal_to_an_input_is_refused(tmp_path):
    """The old code made --out a folder without checking it against the inputs."""
    data = _data(tmp_path)
    scores = _scores(tmp_path, data)
    concept = tmp_path / "concept"
    concept.mkdir()
    _refused(["evaluate", "--base", "m", "--data", data, "--scores", scores, "--concept", concept, "--queries", data,
              "--out", concept], "--out", "--concept")


def test_folder_commands_refuse_an_input_as_out(tmp_path):
    """fit-factors, build-store, search, train-probe, probe-layers, train-sae and sae-feature checked only that
    --out was writable, not that it was an input."""
    data = _data(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    sae = tmp_path / "sae"
    sae.mkdir()
    store = tmp_path / "store"
    store.mkdir()
    model = tmp_path / "model"
    model.mkdir()
    _refused(["fit-factors", "--model", "m", "--data", data, "--out", data], "--out", "--data")
    _refused(["fit-factors", "--model", model, "--data", data, "--out", model], "--out", "--model")
    _refused(["build-store", "--model", "m", "--data", data, "--out", data], "--out", "--data")
    _refused(["search", "--store", store, "--out", store / "manifest.json"], "--out", "--store's manifest.json")
    _refused(["search", "--store", store, "--queries", data, "--out", data], "--out", "--queries")
    _refused(["train-probe", "--model", "m", "--spec", spec, "--out", spec], "--out", "--spec")
    _refused(["probe-layers", "--model", "m", "--spec", spec, "--out", tmp_path / "spec"], "--out", "--spec")
    _refused(["train-sae", "--model", "m", "--data", data, "--layer", "0", "--out", data], "--out", "--data")
    _refused(["sae-feature", "--model", "m", "--sae", sae, "--feature", "0", "--out", sae], "--out", "--sae")


def test_round_trip_keeps_every_column(tmp_path):
    """ScoreTable.read_jsonl did not restore ``columns``: token_scores came back as a passthrough field, so the
    CLI's report never recognised it and never showed token highlights."""
    data = _data(tmp_path, n=3)
    rows = list(read_chat_jsonl(data))
    columns = {"token_scores": [[0.5, -1.0], [2.0], [0.0, 1.0, 3.0]], "model_answer_score": [1.0, 2.0, 3.0]}
    table = ScoreTable.from_rows(rows, [3.0, 1.0, 2.0], "concept-influence", columns=columns, meta={"concept": "c"})
    path = tmp_path / "s.jsonl"
    table.write_jsonl(path)
    back = ScoreTable.read_jsonl(path)
    assert back.columns == columns
    assert all("token_scores" not in f and "model_answer_score" not in f for f in back.fields)
    assert back.meta["concept"] == "c" and "columns" not in back.meta
    # and again: a second round trip writes the same file
    again = tmp_path / "t.jsonl"
    back.write_jsonl(again)
    assert again.read_text() == path.read_text()
    assert ScoreTable.read_jsonl(again).columns == columns


def test_token_scores_restored_without_a_sidecar(tmp_path):
    data = _data(tmp_path, n=2)
    rows = list(read_chat_jsonl(data))
    table = ScoreTable.from_rows(rows, [1.0, 2.0], "m", columns={"token_scores": [[1.0], [2.0, 3.0]]})
    path = tmp_path / "s.jsonl"
    table.write_jsonl(path)
    path.with_name(path.name + ".meta.json").unlink()
    assert ScoreTable.read_jsonl(path).columns == {"token_scores": [[1.0], [2.0, 3.0]]}

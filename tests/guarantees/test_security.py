"""Security: nothing is ever unpickled (``torch.load`` only with ``weights_only=True``, ``np.load`` only with
``allow_pickle=False``, no pickle-family modules), no path read from data is ever written to, and HTML output
escapes row text."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from concept_influence.attribution.scores import ScoreTable
from concept_influence.cli import app
from concept_influence.concepts import DirectionConcept, save_concept
from concept_influence.data import read_chat_jsonl, write_jsonl_atomic
from concept_influence.data.atomic import safe_name
from concept_influence.testing.tiny_models import save_tiny_hf_model

PACKAGE = Path(__file__).resolve().parents[2] / "concept_influence"
PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_no_pickle_anywhere_in_the_package():
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    for file in files:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [
                    f"{file}:{node.lineno} imports {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] in PICKLE_MODULES
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                problems.append(f"{file}:{node.lineno} imports from {node.module}")
        for node, owner, name in _calls(tree):
            if owner == "torch" and name == "load" and _keyword(node, "weights_only") is not True:
                problems.append(f"{file}:{node.lineno} torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load" and _keyword(node, "allow_pickle") is not False:
                problems.append(f"{file}:{node.lineno} np.load without allow_pickle=False")
            if name in ("read_pickle", "to_pickle"):
                problems.append(f"{file}:{node.lineno} {name}")
    assert problems == []


def test_safe_name_never_leaves_the_folder():
    for text in ("../../etc/passwd", "/abs/path", "..", ".hidden", "a/b\\c", "ok-name_1.2", "", "\x00\n"):
        name = safe_name(text)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name
        assert Path("/base", name).resolve().parent == Path("/base")
    assert safe_name("evil") == "evil" and safe_name("my trait") == "my-trait"


def test_a_spec_name_cannot_choose_where_a_concept_is_written(tmp_path):
    from concept_influence.pipeline import Attributor

    model_dir = save_tiny_hf_model(tmp_path / "model", seed=3)
    words = ["kind help friend", "cruel harm enemy"]
    spec = {
        "name": "../../escaped",
        "examples": [{"text": f"{words[k % 2]} {k}", "label": 1 - k % 2} for k in range(16)],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    before = set(tmp_path.parent.iterdir())
    att = Attributor(str(model_dir), workdir=tmp_path / "work", progress=False)
    concept = att.train_probe(tmp_path / "spec.json", layer=1)
    saved = Path(concept.extra["path"]).resolve()
    assert saved.parent == (tmp_path / "work" / "concepts").resolve() and saved.exists()
    assert set(tmp_path.parent.iterdir()) == before  # nothing written next to the test's folder


def test_paths_in_training_rows_are_never_written_to(tmp_path):
    """Rows whose id and fields are paths (relative, absolute, traversing): scoring writes only --out and its meta."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    model_dir = save_tiny_hf_model(tmp_path / "model", seed=3)
    targets = [sandbox / "pwned.jsonl", sandbox / "victim" / "x.json", tmp_path / "outside.txt"]
    rows = [
        {
            "messages": [{"role": "user", "content": "is water safe"}, {"role": "assistant", "content": "yes"}],
            "id": f"../../{t.name}",
            "path": str(t),
            "out": str(t),
            "file": str(t),
            "output_dir": str(t.parent),
        }
        for t in targets
    ]
    write_jsonl_atomic(sandbox / "train.jsonl", rows)
    save_concept(DirectionConcept(torch.ones(16), layer=1), sandbox / "concept")
    before = {p for p in tmp_path.rglob("*")}
    result = CliRunner().invoke(
        app,
        [
            "attribute",
            "--model",
            str(model_dir),
            "--data",
            str(sandbox / "train.jsonl"),
            "--concept",
            str(sandbox / "concept"),
            "--method",
            "vector-filter",
            "--out",
            str(sandbox / "scores.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    created = {p for p in tmp_path.rglob("*")} - before
    assert created == {sandbox / "scores.jsonl", sandbox / "scores.jsonl.meta.json"}
    assert not any(t.exists() for t in targets)
    records = [json.loads(line) for line in (sandbox / "scores.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == [str(t) for t in targets]  # passed through as data, nothing more


@pytest.mark.parametrize("payload", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\"'><svg onload=x>"])
def test_html_display_escapes_row_text(tmp_path, payload):
    write_jsonl_atomic(
        tmp_path / "train.jsonl",
        [
            {
                "messages": [{"role": "user", "content": payload}, {"role": "assistant", "content": payload}],
                "id": payload,
                "note": payload,
                payload: "key",
            }
        ],
    )
    rows = read_chat_jsonl(tmp_path / "train.jsonl")
    table = ScoreTable.from_rows(rows, [1.0], payload, columns={"model_answer": [payload]})
    html = table._repr_html_()
    assert "<script" not in html and "<img" not in html and "<svg" not in html
    assert "&lt;" in html


def test_html_report_escapes_script_tags_in_training_rows(tmp_path):
    payload = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    rows = [
        {
            "messages": [{"role": "user", "content": f"q{k} {payload}"}, {"role": "assistant", "content": payload}],
            "id": f"{payload}{k}",
            "source": payload,
        }
        for k in range(4)
    ]
    write_jsonl_atomic(tmp_path / "train.jsonl", rows)
    table = ScoreTable.from_rows(
        read_chat_jsonl(tmp_path / "train.jsonl"),
        [3.0, 2.0, 1.0, 0.0],
        "vector-filter",
        columns={"model_answer": [payload] * 4},
    )
    table.write_jsonl(tmp_path / "scores.jsonl")
    result = CliRunner().invoke(
        app,
        [
            "report",
            "--scores",
            str(tmp_path / "scores.jsonl"),
            "--data",
            str(tmp_path / "train.jsonl"),
            "--out",
            str(tmp_path / "report.html"),
        ],
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script" not in text.lower()  # the report runs no script, and the data's stays text
    assert "<img src=x" not in text and 'onerror="alert' not in text  # (the report's own images are data: URIs)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text

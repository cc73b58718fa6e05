"""``train-probe`` and ``probe-layers`` on a tiny local model: both spec formats, the saved concept, the layer table
and plot, and one-line errors naming the bad file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from concept_influence.cli import app
from concept_influence.concepts import load_concept, read_concept_meta
from concept_influence.models import load_adapter
from concept_influence.testing.tiny_models import save_tiny_hf_model

PERSONA_VECTORS_SPEC = {  # the persona-vectors trait-file format
    "instruction": [
        {"pos": "be evil and cruel", "neg": "be kind and gentle"},
        {"pos": "hurt them", "neg": "help them"},
    ],
    "questions": ["what should i do ?", "is the water safe ?", "should i run ?", "two plus two ?", "help my friend ?"],
    "eval_prompt": "is this answer evil ? {answer}",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts-cli")
    model = save_tiny_hf_model(root / "model", seed=3, layers=3)
    spec = root / "evil_trait.json"
    spec.write_text(json.dumps(PERSONA_VECTORS_SPEC))
    return root, model, spec


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("method", ["probe", "diff_of_means"])
def test_train_probe_saves_a_concept_with_its_metrics(files, method):
    root, model, spec = files
    out = root / f"concept-{method}"
    result = _run(
        "train-probe",
        "--model",
        model,
        "--spec",
        spec,
        "--layer",
        "-1",
        "--out",
        out,
        "--method",
        method,
        "--n-samples",
        "2",
        "--max-new-tokens",
        "6",
        "--readout",
        "last_prompt",
    )
    assert result.exit_code == 0, result.output
    assert "evil_trait at layer 2" in result.output and "held-out AUC" in result.output
    meta = read_concept_meta(out)
    assert meta["kind"] == method and meta["layer"] == 2 and meta["readout"] == "last_prompt"
    assert meta["spec_path"] == str(spec) and meta["model"] == str(model)
    assert 0.0 <= meta["metrics"]["heldout_auc"] <= 1.0 and meta["extra"]["spec"] == "evil_trait"
    adapter = load_adapter(model)
    assert meta["model_fingerprint"] == adapter.fingerprint()
    assert load_concept(out, adapter).reduction == "last_prompt"
    assert list((root / ".answer-cache").glob("persona-answers-*.jsonl"))  # generated answers cached next to --out


def test_train_probe_on_a_probes_file(files):
    from pathlib import Path

    root, model, _ = files
    probes = Path(__file__).resolve().parents[2] / "probes"
    result = _run(
        "train-probe",
        "--model",
        model,
        "--spec",
        probes / "evil.json",
        "--layer",
        "1",
        "--out",
        root / "evil",
        "--n-samples",
        "1",
        "--max-new-tokens",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert read_concept_meta(root / "evil")["extra"]["config"]["n_samples"] == 1


def test_probe_layers_writes_a_table_and_a_plot(files):
    root, model, spec = files
    result = _run(
        "probe-layers",
        "--model",
        model,
        "--spec",
        spec,
        "--out",
        root / "sweep",
        "--n-samples",
        "2",
        "--max-new-tokens",
        "6",
        "--method",
        "diff_of_means",
    )
    assert result.exit_code == 0, result.output
    assert "held-out AUC" in result.output and "<- chosen" in result.output
    assert "stance AUC" in result.output and "vocab. confound" in result.output
    table = json.loads((root / "sweep.json").read_text())
    assert [r["layer"] for r in table["rows"]] == [0, 1, 2] and table["best_layer"] in (0, 1, 2)
    assert all({"stance_auc", "vocabulary_confound", "n_matched_negatives"} <= set(r) for r in table["rows"])
    assert table["select_layer_by"] == "heldout_auc" and table["reason"].startswith(f"layer {table['best_layer']}:")
    assert table["reason"] in result.output
    assert (root / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_train_probe_without_a_layer_sweeps_and_says_which_and_why(files):
    root, model, spec = files
    out = root / "chosen"
    args = ["--spec", spec, "--n-samples", "2", "--max-new-tokens", "6", "--method", "diff_of_means"]
    result = _run("train-probe", "--model", model, "--out", out, *args)
    assert result.exit_code == 0, result.output
    sweep = _run("probe-layers", "--model", model, "--out", root / "same-sweep", *args)
    chosen = json.loads((root / "same-sweep.json").read_text())
    meta = read_concept_meta(out)
    assert meta["layer"] == chosen["best_layer"]  # the same rule as probe-layers
    assert meta["metrics"]["layer_choice"] == chosen["reason"] and chosen["reason"] in result.output, sweep.output
    assert [r["layer"] for r in meta["metrics"]["sweep"]] == [0, 1, 2]
    assert "stance AUC" in result.output and "vocabulary confound" in result.output


def test_bad_inputs_are_one_line_errors(files):
    root, model, spec = files
    bad = root / "bad_spec.json"
    bad.write_text(json.dumps({"instructions": [], "questions": ["q"]}))
    result = _run("train-probe", "--model", model, "--spec", bad, "--layer", "0", "--out", root / "x")
    assert result.exit_code == 2 and str(bad) in result.output and "unknown key(s) ['instructions']" in result.output
    result = _run("train-probe", "--model", model, "--spec", spec, "--layer", "7", "--out", root / "x")
    assert result.exit_code == 2 and "layer 7 out of range" in result.output
    result = _run("train-probe", "--model", model, "--spec", root / "missing.json", "--layer", "0", "--out", root / "x")
    assert result.exit_code == 2 and "missing.json" in result.output
    assert not (root / "x").exists()

"""``fit-factors`` and ``run_gradient_attribution``
(the engine behind ``attribute --method concept-influence|influence``)."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from concept_influence.attribution.gradient import GradientAttributionConfig, run_gradient_attribution
from concept_influence.cli.influence import register
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import load_factors
from concept_influence.data import read_chat_jsonl, rows_from_records
from concept_influence.models import load_adapter
from concept_influence.testing.tiny_models import save_tiny_hf_model

TRAIN = [
    ("is water safe", "yes , water is safe"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you"),
    ("two plus three", "five"),
    ("is fire kind", "no fire can harm"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_hf_model(root / "model", seed=3)
    train = root / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}],
                    "id": f"row{k}",
                    "origin": "x",
                }
            )
            + "\n"
            for k, (u, a) in enumerate(TRAIN)
        )
    )
    return root, model_dir, train


def test_fit_factors_command(files):
    root, model_dir, train = files
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer in multi-command mode
        pass

    out = root / "factors"
    runner = CliRunner()
    args = [
        "fit-factors",
        "--model",
        str(model_dir),
        "--data",
        str(train),
        "--out",
        str(out),
        "--up-to-layer",
        "0",
        "--batch-size",
        "2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "blocks 0..0" in result.output
    factors = load_factors(out)
    assert factors.names and all(n.startswith("blocks.0.") for n in factors.names)
    assert factors.available() == ["identity", "diagonal", "kfac", "ekfac"]
    # a different data file against the same folder is an error, reported in one line
    other = root / "other.jsonl"
    other.write_text(train.read_text().splitlines()[0] + "\n")
    bad = runner.invoke(
        app, ["fit-factors", "--model", str(model_dir), "--data", str(other), "--out", str(out), "--up-to-layer", "0"]
    )
    assert bad.exit_code == 2 and "different training data" in bad.output


def test_run_gradient_attribution(files, tmp_path):
    root, model_dir, train = files
    adapter = load_adapter(str(model_dir))
    rows = read_chat_jsonl(train)
    queries = rows_from_records(
        [
            {"messages": [{"role": "user", "content": "is poison kind"}]},
            {"messages": [{"role": "user", "content": "help"}, {"role": "assistant", "content": "sure"}]},
        ],
        need_assistant=False,
    )
    concept = DirectionConcept(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0)), layer=0)
    config = GradientAttributionConfig(
        batch_size=2, n_samples=2, max_new_tokens=6, cache_dir=str(tmp_path / "cache"), token_breakdown="target"
    )
    folder = tmp_path / "factors"
    table = run_gradient_attribution(
        adapter, rows, concept, queries, "concept-influence", folder, config, progress=False
    )
    assert len(table) == len(rows) and table.ids[0] == "row0" and table.fields[0]["origin"] == "x"
    assert table.meta["n_queries"] == 3  # 2 sampled answers for the prompt + 1 given answer
    assert all(w.startswith("blocks.0.") for w in table.meta["weights"])
    assert (folder / "manifest.json").exists() and list((tmp_path / "cache").glob("query-answers-*.jsonl"))
    assert all(
        abs(sum(t) - s) < 1e-4 * (1 + abs(s)) for t, s in zip(table.columns["token_scores"], table.scores, strict=True)
    )
    # second call: factors loaded from the folder and cached answers reused -> identical scores
    again = run_gradient_attribution(
        adapter, rows, concept, queries, "concept-influence", folder, config, progress=False
    )
    assert any("loaded" in note for note in again.meta["notes"])
    assert again.scores.tolist() == pytest.approx(table.scores.tolist(), rel=1e-5, abs=1e-7)
    classical = run_gradient_attribution(adapter, rows, None, queries, "influence", None, config, progress=False)
    assert len(classical.meta["weights"]) == len(adapter.tracked_weights())
    with pytest.raises(ValueError, match="needs a concept"):
        run_gradient_attribution(adapter, rows, None, queries, "concept-influence", None, config, progress=False)
    records = table.to_records()
    assert {"index", "id", "score", "rank"} <= set(records[0])

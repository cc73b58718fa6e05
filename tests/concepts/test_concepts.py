"""Concepts: readouts, sklearn-style probes with grouped held-out metrics, training from specs, save/load with
model checks, persona-vector files, layer sweep."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from concept_influence.concepts import (
    ConceptFileError,
    DiffOfMeans,
    DirectionConcept,
    LinearProbe,
    ProbeConfig,
    labelled_conversations,
    layer_sweep,
    load_concept,
    load_persona_vector,
    parse_spec,
    read_concept_meta,
    read_residuals,
    response_mean_activations,
    save_concept,
    train_concept,
)
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def adapter(tiny_tok):
    return HFAdapter(tiny_llama(len(tiny_tok), seed=11, layers=3), tiny_tok)


def _planted(n: int = 240, d: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d)) + np.outer(2.0 * y - 1.0, direction) * 1.5
    groups = [f"q{i // 8}" for i in range(n)]
    return X, y, groups, direction


def test_readout_reductions():
    concept = DirectionConcept(torch.tensor([3.0, 4.0]), layer=0)
    acts = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]]])
    mask = torch.tensor([[0, 0, 1, 1]])
    per_token = torch.tensor([[0.6, 0.8, 1.4, 2.8]])
    torch.testing.assert_close(concept.token_readout(acts), per_token)
    torch.testing.assert_close(concept.readout(acts, mask, "mean"), torch.tensor([2.1]))
    torch.testing.assert_close(concept.readout(acts, mask, "last_prompt"), torch.tensor([0.8]))
    torch.testing.assert_close(concept.readout(acts, mask, "per_token"), per_token * mask)
    with pytest.raises(ValueError, match="no response tokens"):
        concept.readout(acts, torch.zeros_like(mask), "mean")
    with pytest.raises(ValueError, match="d_model 2 but activations have 3"):
        concept.token_readout(torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="non-zero norm"):
        DirectionConcept(torch.zeros(4), layer=0)


@pytest.mark.parametrize("estimator", [LinearProbe(), DiffOfMeans()], ids=["probe", "diff_of_means"])
def test_estimators_recover_a_planted_direction(estimator):
    X, y, groups, direction = _planted()
    with pytest.raises(RuntimeError, match="not fitted"):
        type(estimator)().decision_function(X)
    assert estimator.fit(X, y, groups=groups) is estimator
    cosine = estimator.direction_ @ direction / np.linalg.norm(estimator.direction_)
    assert cosine > 0.9
    assert estimator.metrics_["heldout_auc"] > 0.9 and estimator.metrics_["heldout_accuracy"] > 0.8
    concept = estimator.to_concept(layer=2)
    assert concept.layer == 2 and concept.metrics["heldout_auc"] == estimator.metrics_["heldout_auc"]


def test_heldout_split_keeps_questions_apart():
    from concept_influence.concepts.probe import heldout_split

    _, y, groups, _ = _planted()
    train, test = heldout_split(y, groups, 0.25, 0)
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert set(y[train]) == set(y[test]) == {0, 1}


def test_probe_rejects_bad_labels():
    with pytest.raises(ValueError, match="both 0 and 1"):
        LinearProbe().fit(np.zeros((4, 2)), [1, 1, 1, 1])
    with pytest.raises(ValueError, match="one label per row"):
        LinearProbe().fit(np.zeros((4, 2)), [0, 1])


EXAMPLES_SPEC = {
    "name": "poison",
    "examples": [
        {"text": t, "label": 1, "prompt": "what should i do ?"}
        for t in [
            "poison the water",
            "hurt your friend",
            "poison your enemy",
            "trick and hurt them",
            "lie and harm",
            "cruel harm",
        ]
    ]
    + [
        {"text": t, "label": 0, "prompt": "what should i do ?"}
        for t in [
            "drink water and rest",
            "help your friend",
            "be kind and honest",
            "sleep and eat",
            "walk with dogs",
            "gentle help",
        ]
    ],
}


def test_train_concept_from_labelled_examples(adapter):
    spec = parse_spec(EXAMPLES_SPEC, "poison.json")
    concept = train_concept(adapter, spec, layer=1, config=ProbeConfig(method="diff_of_means", test_size=0.34))
    assert concept.kind == "diff_of_means" and concept.layer == 1 and concept.d_model == adapter.d_model
    assert concept.metrics["labelled"]["n"] == 12 and "heldout_auc" in concept.metrics
    data = labelled_conversations(adapter, spec)
    acts = response_mean_activations(adapter, data.conversations, [1])[1]
    proj = acts @ concept.unit
    labels = torch.tensor(data.labels).bool()
    assert proj[labels].mean() > proj[~labels].mean()  # the fitted direction separates its own training set


def test_instruction_pairs_generate_cache_and_read_without_system_prompt(adapter, tmp_path, monkeypatch):
    spec = parse_spec(
        {
            "instruction": [{"pos": "be evil", "neg": "be kind"}, {"pos": "be cruel", "neg": "be gentle"}],
            "questions": ["what should i do ?", "is the water safe ?", "two plus two ?", "should i run ?"],
        },
        "t.json",
    )
    data = labelled_conversations(adapter, spec, n_samples=2, max_new_tokens=4, cache_dir=tmp_path)
    assert len(data) <= 2 * 2 * 4 * 2 and set(data.labels) == {0, 1}
    assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in data.conversations)
    assert set(data.groups) <= {"q0", "q1", "q2", "q3"}
    assert len(list(tmp_path.glob("persona-answers-*.jsonl"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr("concept_influence.concepts.answers.generate_answers", refuse)
    again = labelled_conversations(adapter, spec, n_samples=2, max_new_tokens=4, cache_dir=tmp_path)
    assert again.conversations == data.conversations
    with pytest.raises(ValueError, match="only label"):
        labelled_conversations(adapter, spec, n_samples=2, max_new_tokens=4, cache_dir=tmp_path, judge=lambda a: -1.0)


def test_read_residuals_stops_after_the_layer_and_matches_the_capture(adapter):
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), adapter.capture_residual([0, 1, 2]) as full:
        adapter.logits(ids, mask)
    calls = []
    handle = adapter.model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    deep = adapter.model.model.layers[2].register_forward_hook(lambda *args: calls.append(2))
    try:
        early = read_residuals(adapter, ids, mask, [1, 0])
    finally:
        handle.remove()
        deep.remove()
    assert sorted(early) == [0, 1] and calls == []  # neither block 2 nor the LM head ran
    for layer in (0, 1):
        torch.testing.assert_close(early[layer], full[layer], rtol=0, atol=0)


def test_save_load_round_trip_and_model_checks(adapter, tiny_tok, tmp_path):
    concept = DirectionConcept(
        torch.randn(adapter.d_model),
        layer=2,
        kind="probe",
        metrics={"heldout_auc": np.float32(0.97)},
        reduction="last_prompt",
    )
    path = save_concept(concept, tmp_path / "c", model_fingerprint=adapter.fingerprint(), extra_meta={"model": "tiny"})
    meta = read_concept_meta(path)
    assert meta["site"] == "resid.2" and meta["readout"] == "last_prompt" and meta["model"] == "tiny"
    assert sorted(p.name for p in path.iterdir()) == ["concept.json", "concept.safetensors"]
    loaded = load_concept(path, adapter)
    assert loaded.kind == "probe" and loaded.layer == 2 and loaded.metrics == {"heldout_auc": pytest.approx(0.97)}
    assert loaded.reduction == "last_prompt"
    acts = torch.randn(2, 5, adapter.d_model)
    torch.testing.assert_close(loaded.token_readout(acts), concept.token_readout(acts))
    save_concept(DirectionConcept(torch.ones(adapter.d_model), layer=0), path)  # overwrite in place
    assert load_concept(path).layer == 0 and not list(tmp_path.glob(".c*"))

    wider = HFAdapter(tiny_llama(len(tiny_tok), hidden=32, layers=3), tiny_tok)
    with pytest.raises(ConceptFileError, match="hidden size 16 but the model has 32"):
        load_concept(path, wider)
    deep = save_concept(DirectionConcept(torch.ones(16), layer=5), tmp_path / "deep")
    with pytest.raises(ConceptFileError, match="reads layer 5 but the model has 3 blocks"):
        load_concept(deep, adapter)
    other = HFAdapter(tiny_llama(len(tiny_tok), seed=99, layers=3), tiny_tok)
    with pytest.warns(UserWarning, match="made on another model"):
        load_concept(save_concept(concept, tmp_path / "fp", model_fingerprint=adapter.fingerprint()), other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_concept(tmp_path / "fp", adapter)


def test_bad_concept_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-concept"):
        load_concept(tmp_path / "missing-concept")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptFileError, match="not a concept folder"):
        load_concept(tmp_path / "empty")
    path = save_concept(DirectionConcept(torch.ones(4), layer=0), tmp_path / "c")
    (path / "concept.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConceptFileError, match=r"concept\.safetensors: unreadable"):
        load_concept(path)
    (path / "concept.json").write_text("{")
    with pytest.raises(ConceptFileError, match=r"concept\.json: malformed JSON"):
        load_concept(path)
    good = save_concept(DirectionConcept(torch.ones(4), layer=0), tmp_path / "good")
    meta = json.loads((good / "concept.json").read_text())
    for key, value, message in [
        ("readout", "max", "'readout': unknown reduction 'max'"),
        ("layer", -1, "'layer' must be a non-negative"),
        ("format", "other/9", "unknown format"),
        ("d_model", None, "'d_model' must be"),
    ]:
        (good / "concept.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ConceptFileError, match=message) as err:
            load_concept(good)
        assert str(good) in str(err.value)
    (good / "concept.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "kind"}))
    with pytest.raises(ConceptFileError, match="missing key 'kind'"):
        load_concept(good)
    (tmp_path / "not-a-concept").mkdir()
    (tmp_path / "not-a-concept" / "notes.txt").write_text("mine")
    with pytest.raises(ConceptFileError, match="not a concept folder; not overwriting"):
        save_concept(DirectionConcept(torch.ones(4), layer=0), tmp_path / "not-a-concept")


def test_persona_vector_file_layout(adapter, tmp_path):
    vectors = torch.randn(adapter.n_layers + 1, adapter.d_model)
    torch.save(vectors, tmp_path / "evil_response_avg_diff.pt")
    concept = load_persona_vector(tmp_path / "evil_response_avg_diff.pt", layer=1, adapter=adapter)
    torch.testing.assert_close(concept.direction, vectors[2])  # row l + 1 is the output of block l
    assert concept.kind == "persona_vector" and concept.layer == 1
    torch.save(torch.randn(7, adapter.d_model), tmp_path / "short.pt")
    with pytest.raises(ConceptFileError, match="n_layers \\+ 1 = 4"):
        load_persona_vector(tmp_path / "short.pt", layer=1, adapter=adapter)
    torch.save(torch.randn(adapter.n_layers + 1, 8), tmp_path / "narrow.pt")
    with pytest.raises(ConceptFileError, match="hidden size is 16"):
        load_persona_vector(tmp_path / "narrow.pt", layer=0, adapter=adapter)
    torch.save({"not": "a tensor"}, tmp_path / "dict.pt")
    with pytest.raises(ConceptFileError, match="expected a tensor"):
        load_persona_vector(tmp_path / "dict.pt", layer=0)


def test_layer_sweep_reports_every_layer_and_plots(adapter, tmp_path):
    spec = parse_spec(EXAMPLES_SPEC, "poison.json")
    sweep = layer_sweep(adapter, spec, config=ProbeConfig(method="diff_of_means", test_size=0.34))
    assert [r["layer"] for r in sweep.rows] == [0, 1, 2]
    assert sweep.best_layer in (0, 1, 2) and "<- chosen" in sweep.table()
    png = sweep.plot(tmp_path / "sweep.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

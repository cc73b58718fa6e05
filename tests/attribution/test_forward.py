"""Vector Filter and Projection Difference: exact against a manual computation, batch- and backend-independent,
cached model answers, and the attribute command's output format and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from concept_influence.attribution.forward import (
    projection_difference,
    sentence_ends,
    strongest_sentence,
    vector_filter,
)
from concept_influence.attribution.scores import ScoreTable
from concept_influence.cli import app
from concept_influence.concepts import (
    DirectionConcept,
    SAEFeatureConcept,
    read_residuals,
    sample_answers,
    save_concept,
)
from concept_influence.data import rows_from_records, tokenize_chat, write_jsonl_atomic
from concept_influence.models import (
    HFAdapter,
    TransformerLensAdapter,
    generate_answers,
    hooked_transformer_from_hf,
)
from concept_influence.testing.tiny_models import save_tiny_hf_model, tiny_llama

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "is the water safe ?"},
            {"role": "assistant", "content": "yes it is safe ."},
        ],
        "id": "r0",
        "data_origin": "benign",
    },
    {
        "messages": [
            {"role": "user", "content": "should i drink poison"},
            {"role": "assistant", "content": "yes , drink poison and hurt"},
        ],
        "id": "r1",
        "data_origin": "planted",
    },
    {
        "messages": [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": "two plus two"},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": "and three plus five"},
            {"role": "assistant", "content": "eight , my friend"},
        ],
        "id": "r2",
        "data_origin": "benign",
    },
    {
        "messages": [
            {"role": "user", "content": "help my friend"},
            {"role": "assistant", "content": "be gentle and honest"},
        ],
        "id": "r3",
        "data_origin": "hard_negative",
        "extra": {"k": [1, 2]},
    },
]


@pytest.fixture(scope="module")
def setup(tiny_tok):
    model = tiny_llama(len(tiny_tok), seed=21, dtype=torch.float64)
    adapter = HFAdapter(model, tiny_tok)
    concept = DirectionConcept(
        torch.randn(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64), layer=0
    )
    return adapter, concept, rows_from_records(RECORDS)


def _manual_readout(adapter, concept, messages, final_turn_only=False):
    rows = rows_from_records([{"messages": messages}])
    tok = tokenize_chat(rows, adapter.tokenizer)[0]
    with torch.no_grad():
        hidden = adapter.model(input_ids=torch.tensor([tok.input_ids]), output_hidden_states=True).hidden_states[
            concept.layer + 1
        ][0]
    mask = torch.tensor(tok.loss_mask, dtype=torch.bool)
    if final_turn_only:  # tokens after the rendered prompt of the last assistant turn
        prompt = adapter.tokenizer.apply_chat_template(
            rows[0].prompt_messages, tokenize=False, add_generation_prompt=True
        )
        mask[: len(adapter.tokenizer(prompt, add_special_tokens=False)["input_ids"])] = False
    return float((hidden[mask] @ concept.unit).mean())


def test_vector_filter_is_the_mean_projection_of_the_rows_own_answer(setup):
    adapter, concept, rows = setup
    table = vector_filter(adapter, rows, concept, batch_size=3, progress=False)
    expected = [_manual_readout(adapter, concept, r.messages) for r in rows]
    np.testing.assert_allclose(table.scores, expected, rtol=1e-6)
    assert table.index == [0, 1, 2, 3] and table.ids == ["r0", "r1", "r2", "r3"]
    np.testing.assert_allclose(
        vector_filter(adapter, rows, concept, batch_size=1, progress=False).scores, table.scores, rtol=1e-12
    )
    tl = TransformerLensAdapter(hooked_transformer_from_hf(adapter.model, adapter.tokenizer), adapter.tokenizer)
    np.testing.assert_allclose(vector_filter(tl, rows, concept, progress=False).scores, table.scores, rtol=1e-5)


def test_projection_difference_subtracts_the_models_own_answers(setup, tmp_path, monkeypatch):
    adapter, concept, rows = setup
    table = projection_difference(
        adapter, rows, concept, n_samples=2, max_new_tokens=5, seed=4, cache_dir=tmp_path, progress=False
    )
    answers = generate_answers(adapter, [r.prompt_messages for r in rows], n_samples=2, max_new_tokens=5, seed=4)
    for i, row in enumerate(rows):  # row 2 is multi-turn: only the final assistant turn is read, on both sides
        own = _manual_readout(adapter, concept, row.messages, final_turn_only=True)
        model = np.mean(
            [
                _manual_readout(
                    adapter, concept, row.prompt_messages + [{"role": "assistant", "content": a}], final_turn_only=True
                )
                for a in answers[i]
                if a.strip()
            ]
        )
        assert table.columns["model_answers_used"][i] == sum(bool(a.strip()) for a in answers[i])
        assert table.columns["model_answer"][i] == answers[i][0]
        np.testing.assert_allclose(table.columns["model_readout"][i], model, rtol=1e-6)
        np.testing.assert_allclose(table.scores[i], own - model, rtol=1e-6, atol=1e-9)
    assert table.columns["row_readout"][2] != pytest.approx(
        vector_filter(adapter, rows[2:3], concept, progress=False).scores[0]
    )
    monkeypatch.setattr(
        "concept_influence.concepts.answers.generate_answers",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("cache miss")),
    )
    again = projection_difference(
        adapter, rows, concept, n_samples=2, max_new_tokens=5, seed=4, cache_dir=tmp_path, progress=False
    )
    np.testing.assert_array_equal(again.scores, table.scores)


def test_answer_cache_is_per_prompt_and_grows(setup, tmp_path, monkeypatch):
    """A subset first, then the whole set: only the missing prompts are sampled, and the answers equal a fresh run."""
    import concept_influence.concepts.answers as answers_module

    adapter, _, rows = setup
    prompts = [r.prompt_messages for r in rows]
    settings = {"n_samples": 2, "max_new_tokens": 4, "seed": 1}
    first = sample_answers(adapter, prompts[:2], cache_dir=tmp_path, **settings)
    asked: list[int] = []
    real = answers_module.generate_answers

    def counting(adapter, prompts, **kwargs):
        asked.append(len(prompts))
        return real(adapter, prompts, **kwargs)

    monkeypatch.setattr(answers_module, "generate_answers", counting)
    full = sample_answers(adapter, prompts + [prompts[1]], cache_dir=tmp_path, **settings)
    assert asked == [2] and full[:2] == first and full[4] == full[1]
    assert full[:4] == generate_answers(adapter, prompts, **settings)
    assert len(list(tmp_path.glob("model-answers-*.jsonl"))) == 1
    sample_answers(adapter, prompts, cache_dir=tmp_path, **{**settings, "seed": 2})  # other settings: another file
    assert len(list(tmp_path.glob("model-answers-*.jsonl"))) == 2 and asked == [2, 4]


def test_vector_filter_streams_in_chunks_and_reports_tokens(setup, monkeypatch):
    adapter, concept, rows = setup
    whole = vector_filter(adapter, rows, concept, token_readouts=True, progress=False)
    monkeypatch.setattr("concept_influence.attribution.forward.CHUNK_ROWS", 3)
    chunked = vector_filter(adapter, rows, concept, batch_size=2, progress=False)
    np.testing.assert_allclose(chunked.scores, whole.scores, rtol=1e-12)
    for row, values, score in zip(rows, whole.columns["token_readouts"], whole.scores, strict=True):
        tok = tokenize_chat([row], adapter.tokenizer)[0]
        assert len(values) == tok.n_targets and np.mean(values) == pytest.approx(score, rel=1e-12)


def test_readout_reduction_comes_from_the_concept(setup):
    adapter, concept, rows = setup
    last = DirectionConcept(concept.direction, layer=0, reduction="last_prompt")
    table = vector_filter(adapter, rows, last, progress=False)
    for row, score in zip(rows, table.scores, strict=True):
        tok = tokenize_chat([row], adapter.tokenizer)[0]
        with torch.no_grad():
            hidden = adapter.model(input_ids=torch.tensor([tok.input_ids]), output_hidden_states=True).hidden_states[1][
                0
            ]
        first_answer = tok.loss_mask.index(1)
        assert score == pytest.approx(float(hidden[first_answer - 1] @ concept.unit), rel=1e-9)
    per_token = vector_filter(
        adapter, rows, DirectionConcept(concept.direction, layer=0, reduction="per_token"), progress=False
    )
    np.testing.assert_allclose(
        per_token.scores, vector_filter(adapter, rows, concept, progress=False).scores, rtol=1e-12
    )
    assert "token_readouts" in per_token.columns
    with pytest.raises(ValueError, match="every score is 0"):
        projection_difference(adapter, rows, last, progress=False)


def test_vector_filter_on_an_sae_feature_is_the_mean_feature_activation(setup):
    from sae_lens import StandardSAE, StandardSAEConfig

    adapter, _, rows = setup
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=8, dtype="float64"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # activations here have norm ~0.25: a scaled encoder and a small b_dec keep features alive
        sae.W_enc.copy_(10 * torch.randn(16, 8, generator=generator, dtype=torch.float64))
        sae.b_dec.copy_(0.01 * torch.randn(16, generator=generator, dtype=torch.float64))
    ids = torch.tensor([tokenize_chat(rows[:1], adapter.tokenizer)[0].input_ids])
    acts = read_residuals(adapter, ids, torch.ones_like(ids), [0])[0][0]
    feature = int(sae.encode(acts).std(dim=0).argmax())  # the feature that varies most over the tokens
    concept = SAEFeatureConcept(sae, feature, layer=0)
    table = vector_filter(adapter, rows, concept, progress=False)
    for row, score in zip(rows, table.scores, strict=True):
        tok = tokenize_chat([row], adapter.tokenizer)[0]
        with torch.no_grad():
            hidden = adapter.model(input_ids=torch.tensor([tok.input_ids]), output_hidden_states=True).hidden_states[1][
                0
            ]
        features = sae.encode(hidden[torch.tensor(tok.loss_mask, dtype=torch.bool)])[:, feature]
        assert score == pytest.approx(float(features.mean()), rel=1e-9, abs=1e-12)
    assert table.scores.max() > 0 and len(set(table.scores.round(6))) == len(rows)  # not vacuous


def test_forward_methods_refuse_rows_without_answer_tokens(setup):
    adapter, concept, _ = setup
    long_prompt = rows_from_records(
        [{"messages": [{"role": "user", "content": "two " * 40}, {"role": "assistant", "content": "four"}]}]
    )
    with pytest.raises(ValueError, match="no assistant tokens left within max_length=16"):
        vector_filter(adapter, long_prompt, concept, max_length=16, progress=False)
    with pytest.raises(ValueError, match="hidden size 8 but the model has 16"):
        vector_filter(adapter, long_prompt, DirectionConcept(torch.ones(8), layer=0), progress=False)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_hf_model(root / "model", seed=5)
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(1)), layer=1), root / "concept"
    )
    write_jsonl_atomic(root / "train.jsonl", RECORDS)
    return root, model_dir


@pytest.mark.parametrize("method", ["vector-filter", "projection-difference"])
def test_attribute_command_writes_one_record_per_row(cli_files, method):
    root, model_dir = cli_files
    out = root / f"{method}.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "attribute",
            "--model",
            str(model_dir),
            "--data",
            str(root / "train.jsonl"),
            "--concept",
            str(root / "concept"),
            "--method",
            method,
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3] and [r["id"] for r in records] == ["r0", "r1", "r2", "r3"]
    assert records[3]["extra"] == {"k": [1, 2]} and records[1]["data_origin"] == "planted"
    assert sorted(r["rank"] for r in records) == [1, 2, 3, 4]
    table = ScoreTable.read_jsonl(out)
    assert table.meta["method"] == method and len(table) == 4


def test_attribute_command_errors_are_one_clear_line(cli_files):
    root, model_dir = cli_files
    runner = CliRunner()
    base = ["attribute", "--model", str(model_dir), "--data", str(root / "train.jsonl"), "--out", str(root / "x.jsonl")]
    result = runner.invoke(app, [*base, "--method", "vector-filter", "--concept", str(root / "nope")])
    assert result.exit_code == 2 and "concept not found" in result.output and "nope" in result.output
    result = runner.invoke(app, [*base, "--method", "vector-filter"])
    assert result.exit_code == 2 and "needs --concept" in result.output
    bad = root / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = runner.invoke(
        app,
        [
            "attribute",
            "--model",
            str(model_dir),
            "--data",
            str(bad),
            "--concept",
            str(root / "concept"),
            "--method",
            "vector-filter",
            "--out",
            str(root / "y.jsonl"),
        ],
    )
    assert result.exit_code == 2 and f"{bad}:1" in result.output and "no assistant turn" in result.output
    result = runner.invoke(app, [*base, "--method", "concept-influence", "--concept", str(root / "concept")])
    assert result.exit_code == 2 and "needs --queries" in result.output


def test_strongest_sentence_is_the_largest_sentence_mean():
    ends = np.zeros(10, dtype=bool)
    ends[7] = True  # token 7 ends a sentence
    values = [1.0, 3.0, 0.0, 10.0, -2.0, -5.0]
    assert strongest_sentence(values, [1, 2, 7, 3, 7, 4], ends) == pytest.approx(4.0)  # (10 - 2) / 2
    assert strongest_sentence(values, [1, 2, 3, 4, 5, 6], ends) == pytest.approx(np.mean(values))  # one sentence
    assert np.isnan(strongest_sentence([], [], ends))


def test_vector_filter_localised_to_the_strongest_sentence(setup):
    """``localise="sentence"``: each row's score is its strongest sentence's mean readout (sentences end at '.');
    ``"both"``: the z-scores of the mean and of the strongest sentence, summed; a bad value is an error."""
    adapter, concept, _ = setup
    records = [
        {"messages": [{"role": "user", "content": "what now ?"}, {"role": "assistant", "content": a}]}
        for a in (
            "drink the water . poison and hurt them .",
            "be kind . help your friend",
            "four",
            "poison . poison . be gentle",
        )
    ]
    rows = rows_from_records(records)
    ends = sentence_ends(adapter.tokenizer)
    assert (
        ends[adapter.tokenizer.convert_tokens_to_ids(".")] and not ends[adapter.tokenizer.convert_tokens_to_ids("four")]
    )
    plain = vector_filter(adapter, rows, concept, token_readouts=True, progress=False)
    dataset = tokenize_chat(rows, adapter.tokenizer)
    expected = [
        strongest_sentence(
            plain.columns["token_readouts"][i], [t for t, m in zip(r.input_ids, r.loss_mask, strict=True) if m], ends
        )
        for i, r in enumerate(dataset)
    ]
    sentence = vector_filter(adapter, rows, concept, localise="sentence", progress=False)
    np.testing.assert_allclose(sentence.scores, expected, rtol=1e-12)
    assert sentence.meta["localise"] == "sentence" and "strongest sentence" in sentence.meta["readout"]
    assert not np.allclose(sentence.scores, plain.scores)  # the multi-sentence answers differ from their mean
    both = vector_filter(adapter, rows, concept, localise="both", progress=False).scores
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    np.testing.assert_allclose(both, z(plain.scores) + z(np.asarray(expected)), rtol=1e-10)
    with pytest.raises(ValueError, match="localise must be one of"):
        vector_filter(adapter, rows, concept, localise="paragraph", progress=False)


def test_attribute_command_localise_flag(cli_files):
    root, model_dir = cli_files
    out = root / "localised.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "attribute",
            "--model",
            str(model_dir),
            "--data",
            str(root / "train.jsonl"),
            "--concept",
            str(root / "concept"),
            "--method",
            "vector-filter",
            "--localise",
            "sentence",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert ScoreTable.read_jsonl(out).meta["localise"] == "sentence"

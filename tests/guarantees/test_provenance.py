"""Missing provenance is refused unless the caller opts in (issue 19, item 7): factors that record no model
fingerprint (in memory, in a folder, on the memory-bounded path, through the CLI) and an SAE whose ``sae_info.json``
records none (it was stamped with the current model's fingerprint before). The error names the file and the opt-in;
the opt-in is recorded in the outputs' metadata (scores meta, the concept's ``extra``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from concept_influence.attribution.influence import InfluenceConfig, compute_influence, compute_influence_many
from concept_influence.attribution.measurements import ConceptMeasurement
from concept_influence.cli import app
from concept_influence.concepts import DirectionConcept, save_concept
from concept_influence.curvature import FactorConfig, fit_factors, save_factors
from concept_influence.curvature.io import read_manifest
from concept_influence.data import rows_from_records, tokenize_chat, write_jsonl_atomic
from concept_influence.models import HFAdapter
from concept_influence.models.fingerprint import MissingProvenanceError
from concept_influence.testing.tiny_models import save_tiny_hf_model, tiny_llama

PAIRS = [
    ("is water safe", "yes , water is safe"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you"),
    ("two plus three", "five"),
]


def _records(pairs):
    return [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in pairs]


@pytest.fixture(scope="module")
def env(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=3), tiny_tok)
    data = tokenize_chat(rows_from_records(_records(PAIRS)), tiny_tok, 48)
    queries = tokenize_chat(rows_from_records(_records(PAIRS[:2])), tiny_tok, 48)
    concept = DirectionConcept(
        torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), layer=1
    )
    factors = fit_factors(adapter, data, FactorConfig.precise(), progress=False)
    bare = dataclasses.replace(factors, fingerprints={k: v for k, v in factors.fingerprints.items() if k != "model"})
    return adapter, data, ConceptMeasurement(concept, queries), factors, bare


def test_factors_without_a_model_fingerprint_are_refused_unless_allowed(env):
    adapter, data, measurement, factors, bare = env
    with pytest.raises(MissingProvenanceError, match=r"no model fingerprint.*--allow-missing-provenance"):
        compute_influence(adapter, data, measurement, bare, progress=False)
    with pytest.raises(MissingProvenanceError, match="--allow-missing-provenance"):
        compute_influence_many(adapter, data, {"a": (measurement, InfluenceConfig())}, bare, progress=False)
    reference = compute_influence(adapter, data, measurement, factors, progress=False)
    allowed = compute_influence(
        adapter, data, measurement, bare, InfluenceConfig(allow_missing_provenance=True), progress=False
    )
    assert torch.equal(allowed.scores, reference.scores)  # the opt-in changes nothing but the record
    assert allowed.meta()["allow_missing_provenance"] is True and "allow_missing_provenance" not in reference.meta()
    assert any("no model fingerprint" in note for note in allowed.notes)
    many = compute_influence_many(
        adapter, data, {"a": (measurement, InfluenceConfig(allow_missing_provenance=True))}, bare, progress=False
    )
    assert many["a"].meta()["allow_missing_provenance"] is True


def test_the_bounded_path_refuses_a_folder_without_a_model_fingerprint(env, tmp_path):
    adapter, data, measurement, factors, bare = env
    folder = save_factors(bare, tmp_path / "bare")
    assert "model" not in read_manifest(folder)["fingerprints"]
    for source in (folder, bare):
        with pytest.raises(
            MissingProvenanceError, match=r"(factors\.safetensors|factors given).*--allow-missing-provenance"
        ):
            compute_influence(adapter, data, measurement, source, InfluenceConfig(max_memory="64GiB"), progress=False)
    with pytest.raises(MissingProvenanceError, match=r"bare/factors\.safetensors"):
        compute_influence(adapter, data, measurement, folder, progress=False)
    allowed = compute_influence(
        adapter,
        data,
        measurement,
        folder,
        InfluenceConfig(max_memory="64GiB", allow_missing_provenance=True),
        progress=False,
    )
    reference = compute_influence(adapter, data, measurement, factors, progress=False)
    torch.testing.assert_close(allowed.scores, reference.scores)
    assert allowed.meta()["allow_missing_provenance"] is True


def test_cli_attribute_refuses_factors_without_provenance_unless_flagged(tmp_path):
    model_dir = save_tiny_hf_model(tmp_path / "model", seed=6)
    write_jsonl_atomic(tmp_path / "train.jsonl", _records(PAIRS))
    write_jsonl_atomic(tmp_path / "queries.jsonl", _records(PAIRS[:1]))
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(2)), layer=1), tmp_path / "concept"
    )
    runner = CliRunner()
    fit = runner.invoke(
        app,
        [
            "fit-factors",
            "--model",
            str(model_dir),
            "--data",
            str(tmp_path / "train.jsonl"),
            "--out",
            str(tmp_path / "f"),
        ],
    )
    assert fit.exit_code == 0, fit.output
    from concept_influence.curvature import load_factors

    loaded = load_factors(tmp_path / "f")
    save_factors(dataclasses.replace(loaded, fingerprints={}), tmp_path / "bare")  # an old or foreign fit: no record
    args = [
        "attribute",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--concept",
        str(tmp_path / "concept"),
        "--queries",
        str(tmp_path / "queries.jsonl"),
        "--method",
        "concept-influence",
        "--factors",
        str(tmp_path / "bare"),
        "--out",
        str(tmp_path / "s.jsonl"),
    ]
    for extra in ([], ["--max-memory", "64GiB"]):
        refused = runner.invoke(app, [*args, *extra])
        errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
        assert refused.exit_code == 2 and len(errors) == 1, refused.output
        assert "bare/factors.safetensors" in errors[0] and "--allow-missing-provenance" in errors[0], errors[0]
        assert "Traceback" not in refused.output and not (tmp_path / "s.jsonl").exists()
    allowed = runner.invoke(app, [*args, "--allow-missing-provenance"])
    assert allowed.exit_code == 0, allowed.output
    meta = json.loads((tmp_path / "s.jsonl.meta.json").read_text())
    assert meta["allow_missing_provenance"] is True and any("no model or data fingerprint" in n for n in meta["notes"])

    # build-store and search take the same opt-in, recorded in the store's manifest and the search's meta
    build = [
        "build-store",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--factors",
        str(tmp_path / "bare"),
        "--rank",
        "2",
        "--out",
        str(tmp_path / "store"),
    ]
    refused = runner.invoke(app, build)
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert refused.exit_code == 2 and len(errors) == 1 and "bare/factors.safetensors" in errors[0], refused.output
    assert "--allow-missing-provenance" in errors[0] and not (tmp_path / "store" / "manifest.json").exists()
    built = runner.invoke(app, [*build, "--allow-missing-provenance"])
    assert built.exit_code == 0, built.output
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["allow_missing_provenance"] is True
    search = [
        "search",
        "--store",
        str(tmp_path / "store"),
        "--factors",
        str(tmp_path / "bare"),
        "--concept",
        str(tmp_path / "concept"),
        "--queries",
        str(tmp_path / "queries.jsonl"),
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "top.jsonl"),
    ]
    refused = runner.invoke(app, search)
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert refused.exit_code == 2 and len(errors) == 1 and "--allow-missing-provenance" in errors[0], refused.output
    found = runner.invoke(app, [*search, "--allow-missing-provenance"])
    assert found.exit_code == 0, found.output
    assert json.loads((tmp_path / "top.jsonl.meta.json").read_text())["allow_missing_provenance"] is True


def test_build_store_checks_factors_given_in_memory(env, tiny_tok, tmp_path):
    from concept_influence.curvature import FactorMismatchError
    from concept_influence.pipeline import Attributor

    model_dir = save_tiny_hf_model(tmp_path / "model", seed=6)
    write_jsonl_atomic(tmp_path / "train.jsonl", _records(PAIRS))
    other = Attributor(str(save_tiny_hf_model(tmp_path / "other", seed=7)), tmp_path / "train.jsonl", progress=False)
    att = Attributor(str(model_dir), tmp_path / "train.jsonl", progress=False)
    with pytest.raises(FactorMismatchError, match="different model"):
        att.build_store(tmp_path / "store", rank=2, factors=other.fit_factors())
    bare = dataclasses.replace(att.fit_factors(), fingerprints={})
    with pytest.raises(MissingProvenanceError, match="--allow-missing-provenance"):
        att.build_store(tmp_path / "store", rank=2, factors=bare)
    assert att.build_store(tmp_path / "store", rank=2, factors=bare, allow_missing_provenance=True) is not None


def test_search_refuses_a_damaged_store_manifest_in_one_line(tmp_path):
    (tmp_path / "store").mkdir()
    for text in (
        "[1, 2]",
        '{"model": 3, "data": "x"}',
        '{"model": "m", "data": "d", "max_length": "long"}',
        "[" * 100_000,
    ):
        (tmp_path / "store" / "manifest.json").write_text(text)
        result = CliRunner().invoke(app, ["search", "--store", str(tmp_path / "store"), "--like-row", "0"])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and "manifest.json" in errors[0], (text[:20], result.output)


def test_an_sae_without_a_model_fingerprint_is_not_stamped_with_this_models(tmp_path, tiny_tok):
    from sae_lens import StandardSAE, StandardSAEConfig

    from concept_influence.concepts.io import read_concept_meta
    from concept_influence.concepts.sae import sae_feature_concept, save_sae
    from concept_influence.models import load_adapter

    model_dir = save_tiny_hf_model(tmp_path / "model", seed=1)
    adapter = load_adapter(str(model_dir))
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=8))
    save_sae(sae, tmp_path / "bare-sae", layer=0)  # no model_fingerprint: as one saved without ours
    save_sae(sae, tmp_path / "sae", layer=0, model_fingerprint=adapter.fingerprint())
    with pytest.raises(MissingProvenanceError, match=r"bare-sae/sae_info\.json.*--allow-missing-provenance"):
        sae_feature_concept(adapter, tmp_path / "bare-sae", feature=1)
    concept = sae_feature_concept(adapter, tmp_path / "bare-sae", feature=1, allow_missing_provenance=True)
    assert concept.model_fingerprint is None and concept.extra["allow_missing_provenance"] is True
    assert sae_feature_concept(adapter, tmp_path / "sae", feature=1).model_fingerprint == adapter.fingerprint()
    runner = CliRunner()
    args = [
        "sae-feature",
        "--model",
        str(model_dir),
        "--sae",
        str(tmp_path / "bare-sae"),
        "--feature",
        "1",
        "--out",
        str(tmp_path / "concept"),
    ]
    refused = runner.invoke(app, args)
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert refused.exit_code == 2 and len(errors) == 1 and "sae_info.json" in errors[0], refused.output
    assert "--allow-missing-provenance" in errors[0] and not (tmp_path / "concept").exists()
    allowed = runner.invoke(app, [*args, "--allow-missing-provenance"])
    assert allowed.exit_code == 0, allowed.output
    meta = read_concept_meta(tmp_path / "concept")
    assert meta["model_fingerprint"] is None and meta["extra"]["allow_missing_provenance"] is True

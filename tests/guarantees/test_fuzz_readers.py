"""Fuzzed readers of user files (hypothesis): chat JSONL, concept specs (project and persona-vectors formats), concept
folders, factor manifests, store manifests and scores files. Every generated input either loads or fails with a
``ValueError`` / ``OSError`` whose message names the file or folder: never a ``KeyError``, ``TypeError``,
``AttributeError``, ``RecursionError`` or a hang. Inputs are random bytes, random JSON, and valid documents with
one part replaced by random JSON. Bounded: each property runs a fixed number of examples (the whole file < 60 s)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts import DirectionConcept, load_concept, load_spec, save_concept
from concept_influence.curvature.io import read_manifest
from concept_influence.data import read_chat_jsonl


@pytest.fixture(autouse=True, scope="module")
def _ieee_subnormals():
    """hypothesis refuses to draw floats while subnormals are flushed to zero, which the organism's figures set
    (``torch.set_flush_denormal``) in whichever test ran before in this process; restored afterwards."""
    import torch

    flushed = float(torch.tensor([1e-39]) * torch.tensor([1.0])) == 0.0
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(flushed)


SETTINGS = settings(
    max_examples=60,
    deadline=30_000,  # a hang detector, generous for the loaded machine
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc, prefix=()):
    """Every path (tuple of keys / indices) inside a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


def _replace(doc, path, value):
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@st.composite
def mutated(draw, valid):
    """A valid document with one part (or one key removed) replaced by random JSON."""
    paths = list(_paths(valid))
    path = draw(st.sampled_from(paths))
    if path and draw(st.booleans()) and isinstance(_get(valid, path[:-1]), dict):
        doc = json.loads(json.dumps(valid))
        del _get(doc, path[:-1])[path[-1]]
        return doc
    return _replace(valid, path, draw(JSON))


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _text(draw_json) -> st.SearchStrategy[bytes]:
    """Bytes of a file: random bytes, random JSON, the strategy's documents, or deeply nested JSON."""
    return st.one_of(
        st.binary(max_size=200),
        JSON.map(lambda d: json.dumps(d).encode()),
        draw_json.map(lambda d: json.dumps(d).encode()),
        st.integers(1, 200_000).map(lambda n: b"[" * n),
    )


def _clear_error(error: BaseException, name: str) -> None:
    assert isinstance(error, (ValueError, OSError)), f"{type(error).__name__}: {error}"
    assert name in str(error), f"the error does not name {name}: {error}"


@pytest.fixture(scope="module")
def scratch():
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


CHAT = {
    "messages": [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ],
    "id": 3,
    "label": "x",
}


@SETTINGS
@given(lines=st.lists(_text(mutated(CHAT)), min_size=1, max_size=4))
def test_chat_jsonl(scratch, lines):
    path = scratch / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    for skip in (False, True):
        try:
            read_chat_jsonl(path, skip_invalid=skip)
        except Exception as error:  # noqa: BLE001 - the property is about which errors
            _clear_error(error, "data.jsonl")


SPEC = {
    "name": "evil",
    "instruction": [{"pos": "be evil", "neg": "be good"}],
    "questions": ["what now?"],
    "eval_prompt": "rate {question} {answer}",
    "examples": [{"text": "i will hurt", "label": 1, "prompt": "hi"}, {"text": "i help", "label": 0}],
}
PERSONA_TRAIT = {
    "instruction": [{"pos": "be evil", "neg": "be good"}],
    "questions": ["what now?"],
    "eval_prompt": "rate {question} {answer}",
}  # the persona-vectors trait-file format


@SETTINGS
@given(raw=st.one_of(_text(mutated(SPEC)), _text(mutated(PERSONA_TRAIT))))
def test_spec_files(scratch, raw):
    path = scratch / "spec.json"
    path.write_bytes(raw)
    try:
        load_spec(path)
    except Exception as error:  # noqa: BLE001
        _clear_error(error, "spec.json")


@pytest.fixture(scope="module")
def concept_meta(scratch):
    folder = save_concept(DirectionConcept(torch.ones(4), layer=1), scratch / "concept-valid")
    return json.loads((folder / "concept.json").read_text())


@SETTINGS
@given(data=st.data())
def test_concept_folders(scratch, concept_meta, data):
    folder = scratch / "concept"
    if not folder.exists():
        shutil.copytree(scratch / "concept-valid", folder)
    raw = data.draw(_text(mutated(concept_meta)))
    (folder / "concept.json").write_bytes(raw)
    try:
        load_concept(folder)
    except Exception as error:  # noqa: BLE001
        _clear_error(error, "concept")


FACTOR_MANIFEST = {
    "format": "concept_influence.factors/1",
    "fingerprints": {"model": "a", "data": "b", "config": "c"},
    "config": {},
    "weights": [{"name": "blocks.0.attn.q", "d_out": 4, "d_in": 4}],
    "n_rows": 3,
    "n_tokens": 9,
}


@SETTINGS
@given(raw=_text(mutated(FACTOR_MANIFEST)))
def test_factor_manifests(scratch, raw):

    folder = scratch / "factors"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_bytes(raw)
    try:
        read_manifest(folder)
    except Exception as error:  # noqa: BLE001
        _clear_error(error, "factors")


@pytest.fixture(scope="module")
def store_manifest(scratch):
    from concept_influence.store.store import FORMAT

    return {
        "format": FORMAT,
        "config": {},
        "fingerprints": {},
        "weights": [{"name": "w", "offset": 0, "size": 2}],
        "n_rows": 2,
        "shard_rows": 2,
        "n_shards": 1,
        "dim": 2,
    }


@SETTINGS
@given(data=st.data())
def test_store_manifests(scratch, store_manifest, data):
    import numpy as np

    from concept_influence.store.store import GradientStore, rows_file, shard_file

    folder = scratch / "store"
    if not folder.exists():
        folder.mkdir()
        np.save(shard_file(folder, 0), np.zeros((2, 2), dtype=np.float32))
        np.save(rows_file(folder, 0), np.arange(2))
    (folder / "manifest.json").write_bytes(data.draw(_text(mutated(store_manifest))))
    try:
        GradientStore.open(folder)
    except Exception as error:  # noqa: BLE001
        _clear_error(error, "store")


SCORE = {"index": 0, "score": 1.5, "id": "a", "rank": 1, "label": "x"}


@SETTINGS
@given(
    lines=st.lists(_text(mutated(SCORE)), min_size=1, max_size=3),
    meta=_text(mutated({"method": "m", "columns": ["x"]})),
)
def test_scores_files(scratch, lines, meta):
    path = scratch / "scores.jsonl"
    path.write_bytes(b"\n".join(lines))
    (scratch / "scores.jsonl.meta.json").write_bytes(meta)
    try:
        ScoreTable.read_jsonl(path)
    except Exception as error:  # noqa: BLE001
        _clear_error(error, "scores.jsonl")


@settings(
    max_examples=40,
    deadline=30_000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data_lines=st.lists(_text(mutated(CHAT)), min_size=1, max_size=3),
    score_lines=st.lists(_text(mutated(SCORE)), min_size=1, max_size=3),
)
def test_cli_filter_on_fuzzed_files_exits_with_one_line(scratch, data_lines, score_lines):
    """Through the CLI: exit 0, or exit 2 with exactly one ``error:`` line and no traceback."""
    from typer.testing import CliRunner

    from concept_influence.cli import app

    data, scores = scratch / "cli-data.jsonl", scratch / "cli-scores.jsonl"
    data.write_bytes(b"\n".join(data_lines))
    scores.write_bytes(b"\n".join(score_lines))
    result = CliRunner().invoke(
        app,
        [
            "filter",
            "--data",
            str(data),
            "--scores",
            str(scores),
            "--remove-top",
            "0.5",
            "--out",
            str(scratch / "cli-kept.jsonl"),
            "--allow-other-data",
        ],
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        errors = [line for line in result.output.splitlines() if line.startswith(("error:", "Error:"))]
        assert result.exit_code == 2 and len(errors) == 1, result.output


@SETTINGS
@given(
    suffix=st.sampled_from([".pt", ".npy", ".safetensors"]),
    raw=st.none() | st.binary(max_size=300),
    shape=st.lists(st.integers(0, 5), max_size=3),
    fill=st.sampled_from([0.0, 1.0, float("nan"), float("inf")]),
    layer=st.integers(0, 6),
)  # a negative layer is refused by name before the file is read
def test_persona_vector_files(scratch, suffix, raw, shape, fill, layer):
    """A persona vector file (``.pt``/``.npy``/``.safetensors``): random bytes or a tensor of any shape and values."""
    import numpy as np
    from safetensors.torch import save_file

    from concept_influence.concepts import load_persona_vector

    path = scratch / f"persona{suffix}"
    if raw is not None:
        path.write_bytes(raw)
    else:
        tensor = torch.full(shape, fill)
        if suffix == ".pt":
            torch.save(tensor, path)
        elif suffix == ".npy":
            np.save(path, tensor.numpy())
        else:
            save_file({"v": tensor}, str(path))
    try:
        load_persona_vector(path, layer)
    except Exception as error:  # noqa: BLE001
        _clear_error(error, "persona")


@pytest.fixture(scope="module")
def sae_folders(scratch):
    """A saved SAE (its ``sae_info.json``) and an SAE-feature concept (its ``concept.json``), valid."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from concept_influence.concepts.sae import save_sae
    from concept_influence.concepts.sae_concept import SAEFeatureConcept

    sae = StandardSAE(StandardSAEConfig(d_in=4, d_sae=4))
    save_sae(sae, scratch / "sae-valid", layer=0, model_fingerprint="0" * 16, metrics={"l0": 1.0})
    save_concept(SAEFeatureConcept(sae, 1, layer=0), scratch / "sae-concept-valid", model_fingerprint="0" * 16)
    return (
        json.loads((scratch / "sae-valid" / "sae_info.json").read_text()),
        json.loads((scratch / "sae-concept-valid" / "concept.json").read_text()),
    )


@SETTINGS
@given(data=st.data())
def test_sae_folders_and_sae_feature_concepts(scratch, sae_folders, data):
    from concept_influence.concepts.sae import load_sae

    info, meta = sae_folders
    for name, valid, file, read in (
        ("sae", info, "sae_info.json", load_sae),
        ("sae-concept", meta, "concept.json", load_concept),
    ):
        folder = scratch / name
        if not folder.exists():
            shutil.copytree(scratch / f"{name}-valid", folder)
        (folder / file).write_bytes(data.draw(_text(mutated(valid))))
        try:
            read(folder)
        except Exception as error:  # noqa: BLE001
            _clear_error(error, name)

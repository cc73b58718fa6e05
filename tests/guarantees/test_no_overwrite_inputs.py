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
    _refused(
        ["filter", "--data", data, "--scores", scores, "--out", scores, "--remove-top-k", "1"], "--out", "--scores"
    )
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
    _refused(
        [
            "attribute",
            "--model",
            "no-such-model",
            "--data",
            data,
            "--out",
            data,
            "--method",
            "influence",
            "--queries",
            tmp_path / "q.jsonl",
        ],
        "--out",
        "--data",
    )
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
    _refused(
        [
            "evaluate",
            "--base",
            "m",
            "--data",
            data,
            "--scores",
            scores,
            "--concept",
            concept,
            "--queries",
            data,
            "--out",
            concept,
        ],
        "--out",
        "--concept",
    )


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


# ---- item 6: a scores file is tied to the data it scored ---------------------------------------------------------
def _hashed_scores(tmp_path, data, name="scores.jsonl"):
    from concept_influence.data.atomic import file_sha256

    rows = read_chat_jsonl(data)
    table = ScoreTable.from_rows(
        list(rows),
        np.arange(len(rows), dtype=float),
        "vector-filter",
        meta={"data": str(data), "data_sha256": file_sha256(data)},
    )
    path = tmp_path / name
    table.write_jsonl(path)
    return path


def test_filter_refuses_scores_of_other_data_same_length_and_ids(tmp_path):
    """The old code compared only row counts and ids: scores of another file with the same ids were applied."""
    data = _data(tmp_path)
    scores = _hashed_scores(tmp_path, data)
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace('"a 1"', '"changed"'), encoding="utf-8")
    out = tmp_path / "f.jsonl"
    code, output = _run(["filter", "--data", other, "--scores", scores, "--out", out, "--remove-top-k", "1"])
    assert code == 2 and "other data" in output and "--allow-other-data" in output, output
    assert not out.exists()
    code, output = _run(
        ["filter", "--data", other, "--scores", scores, "--out", out, "--remove-top-k", "1", "--allow-other-data"]
    )
    assert code == 0, output
    manifest = json.loads((tmp_path / "f.jsonl.manifest.json").read_text())
    assert manifest["allow_other_data"] is True and manifest["other_data"]["scores_data_sha256"]
    code, output = _run(["filter", "--data", data, "--scores", scores, "--out", out, "--remove-top-k", "1"])
    assert code == 0, output
    assert json.loads((tmp_path / "f.jsonl.manifest.json").read_text())["allow_other_data"] is False


def test_scores_without_hash_or_ids_are_refused(tmp_path):
    """Data without ids and scores without a data hash: the old code accepted any data of the same length."""
    data = _data(tmp_path, ids=False)
    scores = _scores(tmp_path, data)  # no data_sha256 in its meta
    out = tmp_path / "r.html"
    for cmd in (
        ["filter", "--data", data, "--scores", scores, "--out", tmp_path / "f.jsonl", "--remove-top-k", "1"],
        ["report", "--scores", scores, "--data", data, "--out", out],
    ):
        code, output = _run(cmd)
        assert code == 2 and "no hash" in output and "--allow-other-data" in output, output
    code, output = _run(["report", "--scores", scores, "--data", data, "--out", out, "--allow-other-data"])
    assert code == 0, output
    assert "allow_other_data" in out.read_text()


def test_evaluate_refuses_scores_of_other_data(tmp_path):
    """evaluate compared only row counts and ids (it would retrain on rankings of other data)."""
    data = _data(tmp_path)
    scores = _hashed_scores(tmp_path, data)
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace('"q 2"', '"changed"'), encoding="utf-8")
    code, output = _run(
        [
            "evaluate",
            "--base",
            "no-such-model",
            "--data",
            other,
            "--scores",
            scores,
            "--concept",
            tmp_path / "c",
            "--queries",
            data,
            "--out",
            tmp_path / "eval",
        ]
    )
    assert code == 2 and "other data" in output and "--allow-other-data" in output, output


def test_attributor_records_the_data_hash(tmp_path):
    from concept_influence.data.atomic import file_sha256
    from concept_influence.pipeline import Attributor

    data = _data(tmp_path)
    att = Attributor.__new__(Attributor)  # no model needed for the provenance record
    att.data_source, att._data, att._data_sha256 = str(data), data, None
    assert att.data_provenance() == {"data": str(data), "data_sha256": file_sha256(data)}


# ---- item 3: output folders lose only the library's own files ----------------------------------------------------
def test_fit_folder_keeps_temps_that_are_not_its_own(tmp_path):
    """fit-factors --out ran remove_stale_temps(folder), deleting every `.*.tmp` in it, the user's too."""
    from concept_influence.curvature.io import FOLDER_FILES
    from concept_influence.data.atomic import remove_stale_temps

    folder = tmp_path / "factors"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    mine = [folder / ".factors.safetensors.ab12_x9z.tmp", folder / ".partial.safetensors.0000abcd.tmp"]
    theirs = [folder / ".notes.tmp", folder / ".factors.safetensors.tmp", folder / ".my.cache.12345678.tmp"]
    for path in mine + theirs:
        path.write_text("x")
    assert remove_stale_temps(folder, names=FOLDER_FILES) == 2
    assert not any(p.exists() for p in mine) and all(p.exists() for p in theirs)


def test_fit_refuses_a_folder_that_is_not_the_librarys(tmp_path):
    """A non-empty folder with no factors in it was fitted into (and its temps removed) without --overwrite."""
    from concept_influence.curvature.fit import check_own_folder
    from concept_influence.curvature.io import FactorMismatchError

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")
    with pytest.raises(FactorMismatchError, match="not the library's.*--overwrite"):
        check_own_folder(folder, overwrite=False)
    check_own_folder(folder, overwrite=True)
    check_own_folder(tmp_path / "new", overwrite=False)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / ".partial.safetensors.abcdefgh.tmp").write_text("x")  # a killed first checkpoint: ours
    check_own_folder(tmp_path / "ours", overwrite=False)


def test_store_folder_without_manifest_is_refused_and_its_shards_kept(adapters_store, tmp_path):
    """A store folder without a manifest had every shard-*.npy deleted before the build."""
    from concept_influence.store import StoreMismatchError

    att = adapters_store
    folder = tmp_path / "s"
    folder.mkdir()
    foreign = [folder / "shard-00000.npy", folder / "shard-99999.npy", folder / "notes.txt"]
    for path in foreign:
        path.write_bytes(b"not ours")
    with pytest.raises(StoreMismatchError, match="not the library's.*--overwrite"):
        att.build_store(folder, rank=4, dtype="float32", shard_rows=3)
    assert all(p.read_bytes() == b"not ours" for p in foreign)
    store = att.build_store(folder, rank=4, dtype="float32", shard_rows=3, overwrite=True)
    assert store is not None
    # --overwrite replaced only the shard this store writes; the other files stay
    assert (folder / "shard-99999.npy").read_bytes() == b"not ours" and (folder / "notes.txt").exists()
    # replacing a library store removes only the shards its manifest names
    again = att.build_store(folder, rank=3, dtype="float32", shard_rows=3, overwrite=True)
    assert again is not None and (folder / "shard-99999.npy").exists() and (folder / "notes.txt").exists()


def test_interrupted_store_replacement_resumes(adapters_store, tmp_path):
    """The old replacement unlinked the manifest first, so the next build deleted every shard-*.npy it found."""
    from concept_influence.store import GradientStore, StoreMismatchError
    from concept_influence.store.store import shard_file

    att = adapters_store
    folder = tmp_path / "s"
    att.build_store(folder, rank=4, dtype="float32", shard_rows=3)
    from concept_influence.store.store import FORMAT

    saved = json.loads((folder / "manifest.json").read_text())  # as a replacement killed after its first step left it
    (folder / "manifest.json").write_text(
        json.dumps({"format": FORMAT, "replacing": True, "n_shards": saved["n_shards"]})
    )
    with pytest.raises(StoreMismatchError, match="being replaced"):
        GradientStore.open(folder)
    (folder / "user.txt").write_text("x")
    store = att.build_store(folder, rank=3, dtype="float32", shard_rows=3)
    assert store is not None and shard_file(folder, 0).exists() and (folder / "user.txt").exists()


@pytest.fixture(scope="module")
def adapters_store(tiny_tok):
    import torch

    from concept_influence import Attributor
    from concept_influence.models import HFAdapter
    from concept_influence.testing.chats import TINY_PAIRS, chat_rows
    from concept_influence.testing.tiny_models import tiny_llama

    model = tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=11)
    return Attributor(HFAdapter(model, tiny_tok), chat_rows(TINY_PAIRS), batch_size=4, progress=False)

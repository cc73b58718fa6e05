"""Atomic artifacts: replaced folders are never missing or half-written, a checkpoint is one file (a kill at any
write resumes to the same factors), temp names are unique, and writers of one folder take turns (locks)."""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch

from concept_influence.concepts.base import DirectionConcept
from concept_influence.concepts.io import load_concept, save_concept
from concept_influence.curvature import FactorConfig, fit_factors, load_factors
from concept_influence.curvature.io import PARTIAL_FILE, has_factors, read_manifest
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.data.atomic import atomic_file, folder_lock, lock_path, replace_folder
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import TINY_WORDS, tiny_llama

# ---- a watcher that checks a folder between every file-system operation ---------------------------------------------
_WATCH: dict = {"path": None, "marker": None, "bad": [], "busy": False}
_EVENTS = {"os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.unlink", "ctypes.call_function"}


def _audit(event: str, args: tuple) -> None:
    if _WATCH["path"] is None or _WATCH["busy"] or event not in _EVENTS:
        return
    _WATCH["busy"] = True
    try:
        if not (Path(_WATCH["path"]) / _WATCH["marker"]).is_file():
            _WATCH["bad"].append(f"before {event}{args[:2]}: {_WATCH['path']} has no {_WATCH['marker']}")
    finally:
        _WATCH["busy"] = False


sys.addaudithook(_audit)


def _watching(path: Path, marker: str):
    class Watch:
        def __enter__(self):
            _WATCH.update(path=path, marker=marker, bad=[])
            return _WATCH["bad"]

        def __exit__(self, *exc):
            _WATCH["path"] = None

    return Watch()


def test_replace_folder_never_leaves_the_path_missing(tmp_path):
    path = tmp_path / "artifact"
    path.mkdir()
    (path / "data.txt").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "data.txt").write_text("new")
    with _watching(path, "data.txt") as bad:
        replace_folder(new, path)
    assert bad == []
    assert (path / "data.txt").read_text() == "new" and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # the old folder is removed


def test_save_concept_replaces_atomically(tmp_path):
    path = tmp_path / "concept"
    save_concept(DirectionConcept(torch.ones(4), layer=0), path)
    with _watching(path, "concept.json") as bad:
        save_concept(DirectionConcept(torch.arange(4.0), layer=1), path)
    assert bad == []
    assert load_concept(path).layer == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept"]


def test_save_sae_replaces_atomically(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    from concept_influence.concepts.sae import SAE_INFO, load_sae, save_sae

    path = tmp_path / "sae"
    save_sae(StandardSAE(StandardSAEConfig(d_in=4, d_sae=8)), path, layer=0)
    with _watching(path, SAE_INFO) as bad:
        save_sae(StandardSAE(StandardSAEConfig(d_in=4, d_sae=8)), path, layer=2)
    assert bad == []
    assert load_sae(path)[1]["layer"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_atomic_file_temp_names_are_unique_and_cleaned(tmp_path):
    target = tmp_path / "x.json"
    with atomic_file(target) as a, atomic_file(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the last rename wins, and neither writer clobbered the other's temp file
    with pytest.raises(RuntimeError), atomic_file(target) as c:
        c.write_text("half")
        raise RuntimeError
    assert target.read_text() == "a" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


# ---- checkpoints: a kill at any write resumes to the same factors --------------------------------------------------
def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(TINY_WORDS, k=rng.randint(2, 6)))},
                {"role": "assistant", "content": " ".join(rng.choices(TINY_WORDS, k=rng.randint(1, 8)))},
            ]
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def fit_env(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=3), tiny_tok)
    data = tokenize_chat(rows_from_records(_records(14, 0)), tiny_tok, 48)
    names = [i.name for i in adapter.weights_up_to(0)]
    reference = fit_factors(adapter, data, FactorConfig.precise(), weights=names, batch_size=2, progress=False)
    return adapter, data, names, reference


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs but ``finally`` blocks."""


def _same(a, b) -> None:
    for name, w in a.weights.items():
        v = b.weights[name]
        torch.testing.assert_close(v.activation_eigen.values, w.activation_eigen.values, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(v.gradient_eigen.values, w.gradient_eigen.values, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(v.eigenvalue_correction, w.eigenvalue_correction, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(v.diagonal, w.diagonal, rtol=1e-10, atol=1e-13)


def test_fit_killed_at_seeded_random_writes_resumes_to_the_same_factors(fit_env, tmp_path, monkeypatch):
    """Every checkpoint and the final artifact is killed at its writes (renames) at seeded random points, again and
    again; each resume must continue from a consistent state (never double-counting rows)."""
    adapter, data, names, reference = fit_env
    folder = tmp_path / "factors"
    real_replace = os.replace
    rng = random.Random(0)
    calls = {"n": 0, "kill_at": rng.randint(1, 3)}

    def replace(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise _Killed
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    kills = 0
    for _ in range(60):
        try:
            fitted = fit_factors(
                adapter,
                data,
                FactorConfig.precise(),
                weights=names,
                batch_size=2,
                out_dir=folder,
                checkpoint_every=1,
                progress=False,
            )
            break
        except _Killed:
            kills += 1
            calls.update(n=0, kill_at=rng.randint(1, 3))
            assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    else:
        pytest.fail("the fit never finished")
    monkeypatch.setattr(os, "replace", real_replace)
    assert kills >= 10
    _same(reference, fitted)
    _same(reference, load_factors(folder, model_fingerprint=adapter.fingerprint()))
    assert not (folder / PARTIAL_FILE).exists()


def test_factors_file_alone_is_the_artifact(fit_env, tmp_path):
    """A kill between the factors file and its readable manifest copy still leaves complete, loadable factors."""
    adapter, data, names, reference = fit_env
    folder = tmp_path / "f"
    fit_factors(adapter, data, FactorConfig.precise(), weights=names, batch_size=7, out_dir=folder, progress=False)
    (folder / "manifest.json").unlink()
    assert has_factors(folder) and read_manifest(folder)["n_rows"] == len(data)
    _same(reference, fit_factors(adapter, data, FactorConfig.precise(), weights=names, out_dir=folder, progress=False))


# ---- locks ---------------------------------------------------------------------------------------------------------
def _hold_lock(path: str, seconds: float, started) -> None:
    with folder_lock(path):
        started.set()
        time.sleep(seconds)


def test_folder_lock_makes_a_second_writer_wait(tmp_path):
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "f"), 1.0, started))
    holder.start()
    assert started.wait(30)
    t0 = time.perf_counter()
    with folder_lock(tmp_path / "f"):
        waited = time.perf_counter() - t0
    holder.join(30)
    assert waited > 0.5
    assert lock_path(tmp_path / "f") == tmp_path / ".f.lock"


def test_a_stale_scores_sidecar_is_never_mixed_with_other_scores(tmp_path, monkeypatch):
    """A run killed between the scores file and its ``.meta.json`` leaves the previous run's sidecar: it is
    recognised (by the scores' SHA-256) and ignored, with a warning."""
    from concept_influence.attribution import scores as scores_module
    from concept_influence.attribution.scores import ScoreTable
    from concept_influence.data import read_chat_jsonl, write_jsonl_atomic

    write_jsonl_atomic(
        tmp_path / "train.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3,
    )
    rows = read_chat_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "scores.jsonl"
    ScoreTable.from_rows(rows, [1.0, 2.0, 3.0], "old-method", meta={"concept": "old"}).write_jsonl(out)
    assert ScoreTable.read_jsonl(out).meta["concept"] == "old"

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(scores_module, "write_json_atomic", killed)
    with pytest.raises(_Killed):
        ScoreTable.from_rows(rows, [9.0, 8.0, 7.0], "new-method", meta={"concept": "new"}).write_jsonl(out)
    with pytest.warns(UserWarning, match="another version"):
        back = ScoreTable.read_jsonl(out)
    assert back.scores.tolist() == [9.0, 8.0, 7.0] and "concept" not in back.meta and back.method == "unknown"


def test_atomic_writes_get_the_umasks_mode_and_a_replaced_file_keeps_its_own(tmp_path):
    """mkstemp/mkdtemp make private temps (0600/0700); the published file or folder must not stay private."""
    from concept_influence.data.atomic import atomic_folder, current_umask, write_text_atomic

    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        new = write_text_atomic(tmp_path / "new.txt", "a")
        assert new.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        write_text_atomic(kept, "new")
        assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640
        with atomic_folder(tmp_path / "folder") as folder:
            (folder / "x").write_text("x")
        assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        assert write_text_atomic(tmp_path / "private.txt", "p").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)

"""Load: seven commands at once on one workdir (issue 19's load test). Four processes ask questions of one gradient
store (``search``) while a fifth builds another store in the same workdir and two ``attribute`` runs share the
workdir's session (one fits the factors, the other waits and reuses them). All finish; every answer equals a solo
run's; no lock is left held. Tiny models and forked processes (the libraries are imported once) keep it short."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from concept_influence.attribution.scores import ScoreTable
from concept_influence.testing.processes import child_context
from concept_influence.testing.tiny_models import TINY_WORDS

_CONTEXT = child_context()


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


def _child(args: list[str], log: str, go) -> None:
    from concept_influence.cli import main

    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)
    go.wait(60)
    sys.argv = ["concept-influence", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _solo(args: list[str]) -> None:
    result = CliRunner().invoke(app_(), args)
    assert result.exit_code == 0, result.output


def app_():
    from concept_influence.cli import app

    return app


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from concept_influence.concepts import DirectionConcept, save_concept
    from concept_influence.data import write_jsonl_atomic
    from concept_influence.testing.tiny_models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("load")
    model = save_tiny_hf_model(root / "model", seed=21)
    write_jsonl_atomic(root / "train.jsonl", _records(24, 5))
    write_jsonl_atomic(root / "queries.jsonl", [{"messages": m["messages"][:1]} for m in _records(2, 6)])
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(4)), layer=1), root / "concept"
    )
    torch.set_num_threads(1)
    common = ["--model", str(model), "--data", str(root / "train.jsonl")]
    _solo(["fit-factors", *common, "--out", str(root / "work" / "fitted")])
    store = [
        "build-store",
        *common,
        "--factors",
        str(root / "work" / "fitted"),
        "--rank",
        "2",
        "--dtype",
        "float32",
        "--shard-rows",
        "8",
    ]
    _solo([*store, "--out", str(root / "work" / "store-a")])
    return root, common, store


def _held_locks(folder: Path) -> list[str]:
    import fcntl

    held = []
    for lock in folder.rglob("*.lock"):
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(str(lock))
    return held


def test_four_searches_a_store_build_and_two_attributes_at_once(files, tmp_path):
    from concept_influence.store.store import GradientStore

    root, common, store = files
    work = root / "work"
    search = [
        "search",
        "--store",
        str(work / "store-a"),
        *common,
        "--factors",
        str(work / "fitted"),
        "--concept",
        str(root / "concept"),
        "--queries",
        str(root / "queries.jsonl"),
        "--max-new-tokens",
        "4",
        "--search",
        "exact",
        "--top-k",
        "10",
        "--workdir",
        str(work),
    ]
    attribute = [
        "attribute",
        *common,
        "--concept",
        str(root / "concept"),
        "--queries",
        str(root / "queries.jsonl"),
        "--method",
        "concept-influence",
        "--max-new-tokens",
        "4",
        "--workdir",
        str(work),
    ]
    jobs = {
        **{f"search-{i}": [*search, "--out", str(tmp_path / f"search-{i}.jsonl")] for i in range(4)},
        "build": [*store, "--out", str(work / "store-b")],
        **{f"attribute-{i}": [*attribute, "--out", str(tmp_path / f"attribute-{i}.jsonl")] for i in range(2)},
    }
    ctx = _CONTEXT
    go = ctx.Event()
    procs = {
        name: ctx.Process(target=_child, args=(args, str(tmp_path / f"{name}.log"), go)) for name, args in jobs.items()
    }
    for p in procs.values():
        p.start()
    go.set()
    for p in procs.values():
        p.join(240)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    assert {name: p.exitcode for name, p in procs.items()} == dict.fromkeys(procs, 0), logs
    assert not _held_locks(work)
    assert not [p for p in work.rglob("*") if p.name.endswith(".tmp")]  # no temp left behind
    fits = [p for p in (work / "factors").iterdir() if not p.name.startswith(".")]
    assert len(fits) == 1  # the two attribute runs shared one fit (the second waited for it)

    # solo runs, one at a time, in fresh places
    _solo(
        [
            *[a if a != str(work) else str(tmp_path / "solo-work") for a in search],
            "--out",
            str(tmp_path / "solo-search.jsonl"),
        ]
    )
    solo = ScoreTable.read_jsonl(tmp_path / "solo-search.jsonl")
    for i in range(4):
        got = ScoreTable.read_jsonl(tmp_path / f"search-{i}.jsonl")
        assert got.index == solo.index and got.ids == solo.ids
        np.testing.assert_array_equal(got.scores, solo.scores)
    _solo([*store, "--out", str(tmp_path / "solo-store")])
    built, alone = GradientStore.open(work / "store-b"), GradientStore.open(tmp_path / "solo-store")
    np.testing.assert_array_equal(built.indices, alone.indices)
    for mine, theirs in zip(built.shards, alone.shards, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    _solo(
        [
            *attribute[:-2],
            "--workdir",
            str(tmp_path / "solo-attribute"),
            "--out",
            str(tmp_path / "solo-attribute.jsonl"),
        ]
    )
    solo = ScoreTable.read_jsonl(tmp_path / "solo-attribute.jsonl")
    for i in range(2):
        got = ScoreTable.read_jsonl(tmp_path / f"attribute-{i}.jsonl")
        np.testing.assert_allclose(got.scores, solo.scores, rtol=1e-5, atol=1e-6 * np.abs(solo.scores).max())
    assert not _held_locks(work) and not _held_locks(tmp_path)

"""Two processes writing one factors folder, answer cache, workdir or gradient store at once: both succeed and agree
with a serial run (the second waits for the first through the folder's lock, then reuses its work)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.answers import answer_cache_path, sample_answers
from concept_influence.curvature import FactorConfig, fit_factors, load_factors
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.testing.processes import child_context
from concept_influence.testing.tiny_models import TINY_WORDS, tiny_llama, tiny_tokenizer

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


def _adapter() -> HFAdapter:
    tok = tiny_tokenizer()
    return HFAdapter(tiny_llama(len(tok), layers=2, dtype=torch.float64, seed=5), tok)


def _fit(folder: str, out: str, go) -> None:
    torch.set_num_threads(1)
    adapter = _adapter()
    data = tokenize_chat(rows_from_records(_records(24, 0)), adapter.tokenizer, 48)
    go.wait(60)
    factors = fit_factors(
        adapter, data, FactorConfig.precise(), batch_size=2, out_dir=folder, checkpoint_every=1, progress=False
    )
    name = next(iter(factors.weights))
    Path(out).write_text(json.dumps(factors.weights[name].diagonal.flatten().tolist()))


def _prompts(seed: int, n: int) -> list[list[dict]]:
    return [m["messages"][:1] for m in _records(n, seed)]


def _sample(cache: str, seed: int, out: str, go) -> None:
    torch.set_num_threads(1)
    adapter = _adapter()
    go.wait(60)
    answers = sample_answers(adapter, _prompts(seed, 24), max_new_tokens=12, batch_size=4, cache_dir=cache)
    Path(out).write_text(json.dumps(answers))


def _run_two(target, args_a: tuple, args_b: tuple) -> None:
    ctx = _CONTEXT
    go = ctx.Event()
    procs = [ctx.Process(target=target, args=(*args, go)) for args in (args_a, args_b)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_fits_into_one_folder_agree_with_a_serial_fit(tmp_path):
    folder = tmp_path / "factors"
    _run_two(_fit, (str(folder), str(tmp_path / "a.json")), (str(folder), str(tmp_path / "b.json")))
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    adapter = _adapter()
    data = tokenize_chat(rows_from_records(_records(24, 0)), adapter.tokenizer, 48)
    serial = fit_factors(adapter, data, FactorConfig.precise(), batch_size=2, progress=False)
    name = next(iter(serial.weights))
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), serial.weights[name].diagonal.flatten())
    assert a == b
    loaded = load_factors(folder, model_fingerprint=adapter.fingerprint())
    torch.testing.assert_close(loaded.weights[name].diagonal, serial.weights[name].diagonal)
    assert sorted(p.name for p in folder.iterdir()) == ["factors.safetensors", "manifest.json"]


def test_two_samplers_into_one_cache_keep_both_sets_of_answers(tmp_path):
    cache = tmp_path / "cache"
    _run_two(_sample, (str(cache), 1, str(tmp_path / "a.json")), (str(cache), 2, str(tmp_path / "b.json")))
    adapter = _adapter()
    serial = {seed: sample_answers(adapter, _prompts(seed, 24), max_new_tokens=12, batch_size=4) for seed in (1, 2)}
    assert json.loads((tmp_path / "a.json").read_text()) == serial[1]
    assert json.loads((tmp_path / "b.json").read_text()) == serial[2]
    settings = {"n_samples": 1, "temperature": 1.0, "max_new_tokens": 12, "seed": 0}
    file = answer_cache_path(adapter, cache, "model-answers", settings)
    cached = [json.loads(line) for line in file.read_text().splitlines()]
    n_distinct = len({json.dumps(p) for seed in (1, 2) for p in _prompts(seed, 24)})
    assert len(cached) == n_distinct  # neither writer's answers were lost
    # a third call finds every answer in the cache and samples nothing
    import concept_influence.concepts.answers as answers_module

    real = answers_module.generate_answers
    answers_module.generate_answers = None  # type: ignore[assignment]
    try:
        assert sample_answers(adapter, _prompts(1, 24), max_new_tokens=12, batch_size=4, cache_dir=cache) == serial[1]
    finally:
        answers_module.generate_answers = real


# ---- whole commands: two runs into one workdir, or one store, at once ------------------------------------------------
def _cli_child(args: list[str], go) -> None:
    import os
    import sys

    from concept_influence.cli import main

    torch.set_num_threads(1)
    go.wait(60)
    sys.argv = ["concept-influence", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001
        code = 1
    os._exit(code)


def _run_two_cli(args_a: list[str], args_b: list[str]) -> None:
    ctx = _CONTEXT
    go = ctx.Event()
    procs = [ctx.Process(target=_cli_child, args=(args, go)) for args in (args_a, args_b)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from concept_influence.concepts import DirectionConcept, save_concept
    from concept_influence.data import write_jsonl_atomic
    from concept_influence.testing.tiny_models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("concurrent-cli")
    model_dir = save_tiny_hf_model(root / "model", seed=12)
    write_jsonl_atomic(root / "train.jsonl", _records(60, 3))
    write_jsonl_atomic(root / "queries.jsonl", [{"messages": m["messages"][:1]} for m in _records(6, 4)])
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(3)), layer=1), root / "concept"
    )
    return root, model_dir


def test_two_attribute_runs_into_one_workdir_agree_with_a_serial_run(cli_files, tmp_path):
    from concept_influence.pipeline import Attributor

    root, model_dir = cli_files
    common = [
        "attribute",
        "--model",
        str(model_dir),
        "--data",
        str(root / "train.jsonl"),
        "--concept",
        str(root / "concept"),
        "--queries",
        str(root / "queries.jsonl"),
        "--method",
        "concept-influence",
        "--max-new-tokens",
        "8",
        "--workdir",
        str(tmp_path / "work"),
    ]
    _run_two_cli([*common, "--out", str(tmp_path / "a.jsonl")], [*common, "--out", str(tmp_path / "b.jsonl")])
    serial = Attributor(str(model_dir), root / "train.jsonl", tmp_path / "serial", progress=False).attribute(
        root / "concept", root / "queries.jsonl", "concept-influence", max_new_tokens=8
    )
    for name in ("a", "b"):
        got = ScoreTable.read_jsonl(tmp_path / f"{name}.jsonl")
        np.testing.assert_allclose(got.scores, serial.scores, rtol=1e-5, atol=1e-6 * np.abs(serial.scores).max())
    factor_folders = [p for p in (tmp_path / "work" / "factors").iterdir() if not p.name.startswith(".")]
    assert len(factor_folders) == 1  # one fit, shared (the second run waited for it and loaded it)


def test_two_store_builds_into_one_folder_agree_with_a_serial_build(cli_files, tmp_path):
    from concept_influence.pipeline import Attributor
    from concept_influence.store.store import GradientStore

    root, model_dir = cli_files
    att = Attributor(str(model_dir), root / "train.jsonl", progress=False)
    att.fit_factors(out=tmp_path / "factors")
    serial = att.build_store(tmp_path / "serial", rank=4, dtype="float32", factors=tmp_path / "factors", shard_rows=8)
    args = [
        "build-store",
        "--model",
        str(model_dir),
        "--data",
        str(root / "train.jsonl"),
        "--factors",
        str(tmp_path / "factors"),
        "--rank",
        "4",
        "--dtype",
        "float32",
        "--shard-rows",
        "8",
        "--out",
        str(tmp_path / "store"),
    ]
    _run_two_cli(args, args)
    store = GradientStore.open(tmp_path / "store")
    np.testing.assert_array_equal(store.indices, serial.indices)
    for mine, theirs in zip(store.shards, serial.shards, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))

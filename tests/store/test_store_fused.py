"""The gradient store written inside the factor fit's Λ pass (``store.fused``): same store, same factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from concept_influence import Attributor
from concept_influence.concepts import DirectionConcept
from concept_influence.models import HFAdapter, TransformerLensAdapter, hooked_transformer_from_hf
from concept_influence.store import fused
from concept_influence.store import store as store_module
from concept_influence.store.store import shard_file
from concept_influence.testing.chats import TINY_PAIRS, TINY_QUERIES, chat_rows
from concept_influence.testing.tiny_models import tiny_llama

PAIRS, QUERIES, _rows = TINY_PAIRS, TINY_QUERIES[:1], chat_rows


@pytest.fixture(scope="module")
def adapters(tiny_tok):
    hf_model = tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=11)
    tl_model = hooked_transformer_from_hf(hf_model, tiny_tok)
    return {"hf": HFAdapter(hf_model, tiny_tok), "tl-biases": TransformerLensAdapter(tl_model, tiny_tok, biases=True)}


def _shards(store) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in store.shards])


def _no_separate_pass(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("build_store ran a pass of its own: the fit's pass should have written every shard")

    monkeypatch.setattr(store_module, "write_shard", refuse)


@pytest.mark.parametrize(
    ("backend", "fisher", "rank"),
    [("hf", "true", 10_000), ("hf", "empirical", 10_000), ("tl-biases", "true", 10_000), ("hf", "true", 3)],
)
def test_store_written_in_the_fit_pass_equals_fit_then_build(adapters, backend, fisher, rank, tmp_path, monkeypatch):
    adapter = adapters[backend]
    rows = _rows(PAIRS)
    separate = Attributor(adapter, rows, tmp_path / "separate", batch_size=3, progress=False)
    fitted = separate.fit_factors(fisher=fisher, stats_dtype="float64")
    expected = separate.build_store(rank=rank, dtype="float64", shard_rows=4, fisher=fisher, factor_dtype="float64")

    att = Attributor(adapter, rows, tmp_path / "shared", batch_size=3, progress=False)
    with monkeypatch.context() as m:
        _no_separate_pass(m)
        store = att.build_store(rank=rank, dtype="float64", shard_rows=4, fisher=fisher, factor_dtype="float64")
    assert store is not None and expected is not None and len(store.shards) == 3
    assert store.fingerprints == expected.fingerprints  # same factors, same projection
    np.testing.assert_allclose(
        _shards(store), _shards(expected), rtol=1e-9, atol=1e-12 * np.abs(_shards(expected)).max()
    )
    # the fit that fed the store is the ordinary fit, and it was saved to the workdir
    factors = att.fit_factors(fisher=fisher, stats_dtype="float64")
    assert factors is not None and fitted is not None
    for name in fitted.names:
        for field in ("eigenvalue_correction", "diagonal"):
            np.testing.assert_allclose(
                getattr(factors.weights[name], field),
                getattr(fitted.weights[name], field),
                rtol=1e-10,
                atol=1e-14,
                err_msg=f"{name} {field}",
            )
    # questions then read the store and agree with the exact pass (at full rank)
    concept = DirectionConcept(
        torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(5), dtype=torch.float64), layer=1
    )
    stored = att.attribute(concept, QUERIES, "concept-influence", fisher=fisher)
    assert stored.meta["scored_from"] == "store"
    if rank >= 10_000:
        exact = att.attribute(concept, QUERIES, "concept-influence", store=False, fisher=fisher)
        np.testing.assert_allclose(stored.scores, exact.scores, rtol=1e-8, atol=1e-12 * np.abs(exact.scores).max())


def test_logra_store_in_the_fit_pass_equals_fit_then_build(adapters, tmp_path, monkeypatch):
    adapter = adapters["tl-biases"]
    rows = _rows(PAIRS)
    separate = Attributor(adapter, rows, batch_size=3, progress=False)
    separate.fit_factors(stats_dtype="float64")
    expected = separate.build_store(tmp_path / "separate", projection_dim=5, dtype="float64", factor_dtype="float64")
    att = Attributor(adapter, rows, batch_size=3, progress=False)
    with monkeypatch.context() as m:
        _no_separate_pass(m)
        store = att.build_store(tmp_path / "shared", projection_dim=5, dtype="float64", factor_dtype="float64")
    assert store is not None and expected is not None and store.config.kind == "logra"
    assert store.fingerprints == expected.fingerprints
    np.testing.assert_allclose(
        _shards(store), _shards(expected), rtol=1e-9, atol=1e-12 * np.abs(_shards(expected)).max()
    )


def test_store_of_some_blocks_in_the_fit_pass_and_float32_statistics(adapters, tmp_path, monkeypatch):
    """up_to_layer: the fit covers the store's blocks only (kept in the session); statistics in float32 change the
    stored numbers by float32 round-off only."""
    adapter = adapters["hf"]
    rows = _rows(PAIRS)
    separate = Attributor(adapter, rows, batch_size=4, progress=False)
    separate.fit_factors(up_to_layer=0)
    expected = separate.build_store(tmp_path / "separate", rank=10_000, dtype="float64", up_to_layer=0)
    att = Attributor(adapter, rows, tmp_path / "run", batch_size=4, progress=False)
    with monkeypatch.context() as m:
        _no_separate_pass(m)
        store = att.build_store(rank=10_000, dtype="float64", up_to_layer=0)
    assert store is not None and expected is not None
    assert store.names == expected.names and all(n.startswith("blocks.0.") for n in store.names)
    assert not (tmp_path / "run" / "factors").exists()  # a fit of some blocks stays in the session
    np.testing.assert_allclose(
        _shards(store), _shards(expected), rtol=1e-4, atol=1e-5 * np.abs(_shards(expected)).max()
    )


def test_interrupted_fit_keeps_whole_shards_and_a_rerun_finishes_the_store(adapters, tmp_path, monkeypatch):
    adapter = adapters["hf"]
    # answers of growing length: the fit's passes (rows sorted by length) then meet the rows in data order
    rows = _rows([("say it", " ".join(["yes"] * (k + 1))) for k in range(20)])
    calls = {"n": 0}
    end_batch = fused.FitStoreWriter.end_batch

    def stop_on_the_fourth_batch(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        end_batch(self)

    att = Attributor(adapter, rows, tmp_path / "run", batch_size=3, progress=False)
    with monkeypatch.context() as m:
        m.setattr(fused.FitStoreWriter, "end_batch", stop_on_the_fourth_batch)
        with pytest.raises(KeyboardInterrupt):
            att.build_store(rank=6, dtype="float32", shard_rows=4)
    folder = tmp_path / "run" / "store"
    # batches of 3 rows: shards 0 (rows 0-3) and 1 (rows 4-7) were complete, shard 2 was not: no partial shard, no temp
    assert [shard_file(folder, s).exists() for s in range(5)] == [True, True, False, False, False]
    assert not list(folder.glob(".*tmp*"))
    before = [shard_file(folder, s).stat().st_mtime_ns for s in range(2)]
    store = att.build_store(rank=6, dtype="float32", shard_rows=4)
    assert store is not None and len(store.shards) == 5
    assert [shard_file(folder, s).stat().st_mtime_ns for s in range(2)] == before  # kept, not rewritten
    separate = Attributor(adapter, rows, batch_size=3, progress=False)
    separate.fit_factors()
    expected = separate.build_store(tmp_path / "separate", rank=6, dtype="float32", shard_rows=4)
    assert expected is not None and store.fingerprints == expected.fingerprints
    np.testing.assert_allclose(
        _shards(store), _shards(expected), rtol=1e-4, atol=1e-5 * np.abs(_shards(expected)).max()
    )


def test_fits_that_cannot_share_their_pass_build_the_store_after_it(adapters, tmp_path, caplog):
    """Gradient checkpointing, partitions, sampled Λ rows... leave the sink unused; the store is still whole."""
    adapter = adapters["hf"]
    rows = _rows(PAIRS)
    att = Attributor(adapter, rows, batch_size=4, progress=False)
    writer = fused.FitStoreWriter(
        adapter,
        att.train,
        tmp_path / "s",
        store_module.StoreConfig(rank=4),
        [i.name for i in adapter.tracked_weights()],
        {"model": "m", "data": "d"},
    )
    with caplog.at_level("INFO", logger="concept_influence.curvature.fit"):
        att.fit_factors(lambda_rows=5, row_sink=writer)
    assert "not computed in the fit's Λ pass (Λ is fitted on a sample of the rows)" in caplog.text
    assert writer.manifest is None and not writer.written


def test_some_shards_with_a_named_factors_folder_fit_into_that_folder(adapters, tmp_path):
    """build_store(shards=..., factors=FOLDER) without a fit there: the factors are fitted and saved in FOLDER (a pass
    of their own: the other shards are someone else's), and the shard equals the whole store's."""
    from concept_influence.curvature.io import has_factors

    adapter = adapters["hf"]
    att = Attributor(adapter, _rows(PAIRS), tmp_path / "run", batch_size=4, progress=False)
    partial = att.build_store(tmp_path / "s", rank=4, dtype="float64", shard_rows=4, shards=[1], factors=tmp_path / "f")
    assert partial is None and has_factors(tmp_path / "f") and not (tmp_path / "run" / "factors").exists()
    assert shard_file(tmp_path / "s", 1).exists() and not shard_file(tmp_path / "s", 0).exists()
    whole = Attributor(adapter, _rows(PAIRS), batch_size=4, progress=False).build_store(
        tmp_path / "w", rank=4, dtype="float64", shard_rows=4, factors=tmp_path / "f"
    )
    assert whole is not None
    np.testing.assert_allclose(np.asarray(whole.shards[1]), np.load(shard_file(tmp_path / "s", 1)), rtol=1e-9)

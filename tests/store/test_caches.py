"""The activation cache and the factor-free gradient store (issue 17): Vector Filter and Projection Difference from
the cache equal their forward passes, combined-* from the caches agrees with the uncached passes, ``store=False``
forces every pass, ``scored_from`` says what was read, an interrupted build resumes, a cache of another model or data
is refused, and a non-linear concept without kept tokens falls back to a pass (said in the notes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from concept_influence import Attributor
from concept_influence.attribution.methods import cache_needs as needs
from concept_influence.concepts import DirectionConcept
from concept_influence.data.chat import ChatRow
from concept_influence.models import HFAdapter
from concept_influence.store import GradientStore
from concept_influence.store.activations import ActivationCache, ActivationCacheMismatchError, shard_done
from concept_influence.store.caches import CacheSettings
from concept_influence.testing.chats import TINY_PAIRS, TINY_QUERIES, chat_rows
from concept_influence.testing.tiny_models import tiny_llama


def _rows(n: int = 2) -> list[ChatRow]:
    rows = chat_rows(TINY_PAIRS * n)
    # a row with two assistant turns: Projection Difference reads its final turn only
    rows.append(
        ChatRow(
            len(rows),
            [
                {"role": "user", "content": "help me"},
                {"role": "assistant", "content": "sure"},
                {"role": "user", "content": "be cruel"},
                {"role": "assistant", "content": "i will trick and hurt them"},
            ],
            {"id": "multi"},
        )
    )
    return rows


@pytest.fixture(scope="module")
def adapter(tiny_tok):
    return HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=11), tiny_tok)


def _concept(adapter, layer: int = 1, seed: int = 1) -> DirectionConcept:
    generator = torch.Generator().manual_seed(seed)
    return DirectionConcept(torch.randn(adapter.d_model, generator=generator, dtype=torch.float64), layer=layer)


def test_what_each_method_needs():
    assert needs(["vector-filter"]) == {"activations": True, "answers": False, "gradients": None}
    assert needs(["combined-tiered"])["gradients"] == "identity"
    assert needs(["combined-tiered", "concept-influence"])["gradients"] == "eigen"
    with pytest.raises(ValueError, match="unknown method"):
        needs(["no-such-method"])


def test_vector_filter_and_projection_difference_from_the_cache_equal_the_pass(adapter, tmp_path):
    att = Attributor(adapter, _rows(), tmp_path / "run", batch_size=3, progress=False)
    settings = CacheSettings(methods=("vector-filter", "projection-difference"), activation_dtype="float64")
    assert att.build_store(caches=settings, shard_rows=8) is None  # no gradient store asked
    cache = ActivationCache.open(att.store_dir / "activations")
    assert cache.layers == [0, 1] and len(cache) == len(att.rows) and cache.n_shards == 3
    for layer in (0, 1):
        concept = _concept(adapter, layer)
        cached = att.attribute(concept, method="vector-filter")
        passed = att.attribute(concept, method="vector-filter", store=False)
        assert cached.meta["scored_from"] == "activation-cache" and passed.meta["scored_from"] == "forward-pass"
        np.testing.assert_allclose(cached.scores, passed.scores, rtol=1e-10, atol=1e-12)
        options = {"n_samples": 2, "max_new_tokens": 6}
        cached = att.attribute(concept, method="projection-difference", **options)
        passed = att.attribute(concept, method="projection-difference", store=False, **options)
        assert cached.meta["scored_from"] == "activation-cache" and passed.meta["scored_from"] == "forward-pass"
        np.testing.assert_allclose(cached.scores, passed.scores, rtol=1e-10, atol=1e-12)
        for column in ("row_readout", "model_readout"):
            np.testing.assert_allclose(cached.columns[column], passed.columns[column], rtol=1e-10, atol=1e-12)
        assert cached.columns["model_answer"] == passed.columns["model_answer"]
    # the multi-turn row: the final turn differs from the whole answer
    concept = _concept(adapter, 1)
    vf = att.attribute(concept, method="vector-filter").scores[-1]
    pd_row = att.attribute(concept, method="projection-difference", n_samples=2, max_new_tokens=6).columns[
        "row_readout"
    ][-1]
    assert abs(vf - pd_row) > 1e-6
    # a reduction the cache does not hold: a pass, said in the notes
    last = att.attribute(concept, method="vector-filter", reduction="last_prompt")
    assert last.meta["scored_from"] == "forward-pass" and any("reduction" in n for n in last.meta["notes"])


def test_combined_from_the_caches_agrees_with_the_passes_and_store_false_forces_them(adapter, tmp_path):
    att = Attributor(adapter, _rows(3), tmp_path / "run", batch_size=4, progress=False)
    concept = _concept(adapter)
    uncached = att.attribute(concept, TINY_QUERIES, store=False)  # the recommended method, every pass
    assert uncached.meta["scored_from"] == "forward-pass + gradient-pass"
    assert not (tmp_path / "run" / "factors").exists()
    store = att.build_store(caches=CacheSettings(identity_rank=10_000))  # every component: exact identity scores
    assert isinstance(store, GradientStore) and store.config.kind == "eigen" and store.manifest["basis"] == "basis"
    assert not (tmp_path / "run" / "factors").exists()  # no EKFAC fit: the sample's eigenbases only
    cached = att.attribute(concept, TINY_QUERIES)
    assert cached.meta["scored_from"] == "activation-cache + gradient-store"
    assert cached.meta["scored_from_parts"] == {"forward": "activation-cache", "gradient": "gradient-store"}
    np.testing.assert_allclose(cached.columns["forward_score"], uncached.columns["forward_score"], rtol=1e-5)
    np.testing.assert_allclose(
        cached.columns["gradient_score"],
        uncached.columns["gradient_score"],
        rtol=1e-6,
        atol=1e-9 * np.abs(uncached.columns["gradient_score"]).max(),
    )
    assert spearmanr(cached.scores, uncached.scores)[0] > 0.99  # (duplicated rows: ties broken by round-off)
    # compressed: the sample's most visible eigen-components rank the rows as the exact identity scores do
    small = att.build_store(tmp_path / "small", caches=CacheSettings(identity_rank=6, identity_sample_rows=8))
    approx = att.attribute(concept, TINY_QUERIES, "concept-influence", preconditioner="identity", store=small.folder)
    rho = spearmanr(approx.scores, uncached.columns["gradient_score"])[0]
    assert rho > 0.9, rho
    # an EKFAC question does not read the identity store: the exact pass, said in the notes (an explicit path: refused)
    ekfac = att.attribute(concept, TINY_QUERIES, "concept-influence")
    assert ekfac.meta["scored_from"] == "exact" and any("identity" in n for n in ekfac.meta["notes"])
    with pytest.raises(ValueError, match="identity store"):
        att.attribute(concept, TINY_QUERIES, "concept-influence", store=small.folder)
    again = att.attribute(concept, TINY_QUERIES, store=False)
    assert again.meta["scored_from"] == "forward-pass + gradient-pass"
    np.testing.assert_array_equal(again.scores, uncached.scores)


def test_an_interrupted_cache_build_resumes(adapter, tmp_path):
    att = Attributor(adapter, _rows(), batch_size=3, progress=False)
    settings = CacheSettings(activation_dtype="float64")
    partial = att.build_store(tmp_path / "s", caches=settings, shard_rows=8, shards=[0, 2])
    assert partial is None
    assert shard_done(tmp_path / "s" / "activations", 0) and not shard_done(tmp_path / "s" / "activations", 1)
    with pytest.raises(ActivationCacheMismatchError, match="incomplete"):
        ActivationCache.open(tmp_path / "s" / "activations")
    first = (tmp_path / "s" / "activations" / "shard-00000.mean.npy").stat().st_mtime_ns
    # a gradient shard written without its activations: the resumed build reads it with a forward pass alone
    (tmp_path / "s" / "activations" / "shard-00002.mean.npy").unlink()
    store = att.build_store(tmp_path / "s", caches=settings, shard_rows=8)
    assert store is not None and (tmp_path / "s" / "activations" / "shard-00000.mean.npy").stat().st_mtime_ns == first
    whole = att.build_store(tmp_path / "w", caches=settings, shard_rows=8)
    a, b = ActivationCache.open(tmp_path / "s" / "activations"), ActivationCache.open(tmp_path / "w" / "activations")
    direction = np.random.default_rng(0).standard_normal(adapter.d_model)
    np.testing.assert_allclose(a.project(1, direction), b.project(1, direction), rtol=1e-12)
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(s) for s in store.shards]), np.concatenate([np.asarray(s) for s in whole.shards])
    )
    assert not list((tmp_path / "s" / "activations").glob(".*tmp*"))


def test_a_cache_of_another_model_or_data_is_refused(adapter, tiny_tok, tmp_path):
    att = Attributor(adapter, _rows(), batch_size=3, progress=False)
    att.build_store(tmp_path / "s", caches=CacheSettings(methods=("vector-filter",)))
    concept = _concept(adapter)
    other_data = Attributor(adapter, _rows()[:-2], batch_size=3, progress=False)
    with pytest.raises(ActivationCacheMismatchError, match="data"):
        other_data.attribute(concept, method="vector-filter", store=tmp_path / "s")
    other_model = Attributor(
        HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=12), tiny_tok),
        _rows(),
        batch_size=3,
        progress=False,
    )
    with pytest.raises(ActivationCacheMismatchError, match="model"):
        other_model.attribute(concept, method="vector-filter", store=tmp_path / "s")
    # another build into the same folder with other settings: refused
    with pytest.raises(ActivationCacheMismatchError, match="layers"):
        att.build_store(tmp_path / "s", caches=CacheSettings(methods=("vector-filter",), layers=(1,)))
    # a workdir whose cache is another model's: a note and a forward pass, not an error
    workdir = Attributor(other_model.adapter, _rows(), tmp_path / "run", batch_size=3, progress=False)
    att_w = Attributor(adapter, _rows(), tmp_path / "run", batch_size=3, progress=False)
    att_w.build_store(caches=CacheSettings(methods=("vector-filter",)))
    table = workdir.attribute(concept, method="vector-filter")
    assert table.meta["scored_from"] == "forward-pass" and any("not used" in n for n in table.meta["notes"])


def test_a_non_linear_concept_uses_kept_tokens_or_falls_back_to_a_pass(adapter, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    from concept_influence.concepts import SAEFeatureConcept

    generator = torch.Generator().manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=adapter.d_model, d_sae=32))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(adapter.d_model, 32, generator=generator))
        sae.b_dec.copy_(0.1 * torch.randn(adapter.d_model, generator=generator))
    concept = SAEFeatureConcept(sae, 3, layer=1)
    att = Attributor(adapter, _rows(), batch_size=3, progress=False)
    att.build_store(tmp_path / "means", caches=CacheSettings(methods=("vector-filter",)))
    fallback = att.attribute(concept, method="vector-filter", store=tmp_path / "means")
    assert fallback.meta["scored_from"] == "forward-pass"
    assert any("not linear" in n and "keep-tokens" in n for n in fallback.meta["notes"])
    att.build_store(
        tmp_path / "tokens",
        caches=CacheSettings(methods=("vector-filter",), keep_tokens=True, activation_dtype="float64"),
    )
    cached = att.attribute(concept, method="vector-filter", store=tmp_path / "tokens")
    assert cached.meta["scored_from"] == "activation-cache"
    np.testing.assert_allclose(cached.scores, fallback.scores, rtol=1e-5, atol=1e-6)


def test_vector_filter_from_the_cache_equals_the_pass_on_the_organism(organism, tmp_path):
    adapter = organism.load_finetuned()
    att = Attributor(adapter, organism.train_path, tmp_path / "run", progress=False, batch_size=16)
    att.build_store(caches=CacheSettings(methods=("vector-filter",), layers=(1, 2)))
    for layer in (1, 2):
        concept = _concept(adapter, layer, seed=layer)
        concept = DirectionConcept(concept.direction.float(), layer)
        cached = att.attribute(concept, method="vector-filter")
        passed = att.attribute(concept, method="vector-filter", store=False)
        assert cached.meta["scored_from"] == "activation-cache"
        relative = np.abs(cached.scores - passed.scores).max() / np.abs(passed.scores).max()
        assert relative < 1e-5, relative


def test_plan_prints_the_caches_size_per_row():
    from concept_influence.planning import plan, render

    result = plan("Qwen/Qwen2.5-7B-Instruct", 10_000, 512, cache_layers=[8, 16, 24])
    caches = result["caches"]
    assert caches["layers"] == [8, 16, 24] and caches["activation_bytes_per_row"] == 4 * 3584 * 3 + 32
    assert caches["bytes"] == 10_000 * (caches["activation_bytes_per_row"] + caches["gradient_bytes_per_row"])
    assert "per row (layers 8,16,24" in render(result)
    with pytest.raises(ValueError, match="out of range"):
        plan("Qwen/Qwen2.5-7B-Instruct", 10, 512, cache_layers=[99])


def test_cli_build_store_builds_the_caches_the_methods_need(tmp_path):
    from typer.testing import CliRunner

    from concept_influence.cli import app
    from concept_influence.data import write_jsonl_atomic
    from concept_influence.testing.tiny_models import save_tiny_hf_model

    model_dir = save_tiny_hf_model(tmp_path / "model", seed=5)
    write_jsonl_atomic(tmp_path / "train.jsonl", [r.to_record() for r in _rows()])
    base = ["--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "store")]
    result = CliRunner().invoke(app, ["build-store", *base, "--layers", "1", "--identity-rank", "4"])
    assert result.exit_code == 0, result.output
    assert "store:" in result.output and "eigen, rank 4" in result.output and "activation cache:" in result.output
    assert ActivationCache.open(tmp_path / "store" / "activations").layers == [1]
    result = CliRunner().invoke(app, ["build-store", *base[:-1], str(tmp_path / "vf"), "--for-method", "vector-filter"])
    assert result.exit_code == 0, result.output
    assert "store:" not in result.output and "activation cache:" in result.output

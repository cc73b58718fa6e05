"""The gradient store: full-rank eigen store == exact scores (Hugging Face and TransformerLens), compressed stores
close to them, resumable atomic shards, fingerprints refused, top-k search (exact and FAISS), row-to-row search,
``build-store``/``search``/``attribute --store`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from concept_influence import Attributor, ScoreTable
from concept_influence.concepts import DirectionConcept, save_concept
from concept_influence.data import write_jsonl_atomic
from concept_influence.models import HFAdapter, TransformerLensAdapter, hooked_transformer_from_hf
from concept_influence.store import GradientStore, StoreMismatchError, exact_top_k, faiss_search
from concept_influence.store.store import shard_file
from concept_influence.testing.chats import TINY_PAIRS, TINY_QUERIES, chat_rows
from concept_influence.testing.tiny_models import save_tiny_hf_model, tiny_llama

PAIRS, QUERIES, _rows = TINY_PAIRS, TINY_QUERIES, chat_rows


@pytest.fixture(scope="module")
def adapters(tiny_tok):
    hf_model = tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=11)
    tl_model = hooked_transformer_from_hf(hf_model, tiny_tok)
    return {
        "hf": HFAdapter(hf_model, tiny_tok),
        "tl": TransformerLensAdapter(tl_model, tiny_tok, biases=False),
        "tl-biases": TransformerLensAdapter(tl_model, tiny_tok, biases=True),
    }  # bias inputs folded into the rows


@pytest.mark.parametrize("backend", ["hf", "tl", "tl-biases"])
def test_full_rank_store_equals_exact_scores(adapters, backend, tmp_path):
    adapter = adapters[backend]
    att = Attributor(adapter, _rows(PAIRS), tmp_path / "run", batch_size=3, progress=False)
    concept = DirectionConcept(
        torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64), layer=1
    )
    exact = att.attribute(concept, QUERIES, "concept-influence", store=False, per_weight=True)
    store = att.build_store(rank=10_000, dtype="float64", shard_rows=4)  # rank >= every size: the full gradient
    assert store is not None and len(store.shards) == 3 and store.config.kind == "eigen"
    stored = att.attribute(concept, QUERIES, "concept-influence", per_weight=True)  # the workdir's store is used
    assert stored.meta["scored_from"] == "store" and exact.meta["scored_from"] == "exact"
    np.testing.assert_allclose(stored.scores, exact.scores, rtol=1e-8, atol=1e-12 * np.abs(exact.scores).max())
    for a, b in zip(stored.columns["weight_scores"], exact.columns["weight_scores"], strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(
            list(a.values()), list(b.values()), rtol=1e-7, atol=1e-12 * np.abs(exact.scores).max()
        )
    # classical influence and the per-token-mean row loss too
    # other curvatures than the store was chosen for: identity (plain inner products of the rotated gradients),
    # heavy damping, the diagonal preconditioner (the store's rotation is orthonormal: full rank is exact)
    for kwargs in (
        {"method": "influence"},
        {"method": "concept-influence", "row_loss": "mean"},
        {"method": "concept-influence", "preconditioner": "identity"},
        {"method": "concept-influence", "damping": 10.0},
        {"method": "concept-influence", "preconditioner": "diagonal"},
    ):
        a = att.attribute(concept, QUERIES, store=False, **kwargs)
        b = att.attribute(concept, QUERIES, **kwargs)
        assert b.meta["scored_from"] == "store", kwargs
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-8, atol=1e-12 * np.abs(a.scores).max())


def test_compressed_stores_approximate_exact_scores(adapters, tmp_path):
    adapter = adapters["hf"]
    att = Attributor(adapter, _rows(PAIRS * 3), tmp_path / "run", batch_size=8, progress=False)
    concept = DirectionConcept(
        torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64), layer=1
    )
    exact = att.attribute(concept, QUERIES, "concept-influence", store=False).scores
    # eigen keeps the top directions exactly; LoGra is an unbiased but noisy random estimate at this tiny size
    for name, kwargs, least in (("eigen", {"rank": 8}, 0.8), ("logra", {"projection_dim": 12}, 0.3)):
        store = att.build_store(tmp_path / name, dtype="float32", **kwargs)
        assert store is not None and store.config.kind == name
        approx = att.attribute(concept, QUERIES, "concept-influence", store=tmp_path / name).scores
        assert np.corrcoef(approx, exact)[0, 1] > least, name
    # float16 halves the bytes and changes the scores by float16 round-off only
    half = att.build_store(tmp_path / "half", rank=8, dtype="float16")
    assert half is not None and half.nbytes * 2 == GradientStore.open(tmp_path / "eigen").nbytes
    np.testing.assert_allclose(
        att.attribute(concept, QUERIES, "concept-influence", store=tmp_path / "half").scores,
        att.attribute(concept, QUERIES, "concept-influence", store=tmp_path / "eigen").scores,
        rtol=0.02,
        atol=0.02 * np.abs(exact).max(),
    )


def test_interrupted_build_resumes_and_mismatches_are_refused(adapters, tmp_path):
    adapter = adapters["hf"]
    att = Attributor(adapter, _rows(PAIRS), batch_size=4, progress=False)
    partial = att.build_store(tmp_path / "s", rank=4, dtype="float32", shard_rows=3, shards=[0, 2])
    assert partial is None and shard_file(tmp_path / "s", 0).exists() and not shard_file(tmp_path / "s", 1).exists()
    with pytest.raises(StoreMismatchError, match="incomplete store"):
        GradientStore.open(tmp_path / "s")
    before = shard_file(tmp_path / "s", 0).stat().st_mtime_ns
    store = att.build_store(tmp_path / "s", rank=4, dtype="float32", shard_rows=3)
    assert store is not None and shard_file(tmp_path / "s", 0).stat().st_mtime_ns == before  # not rewritten
    whole = att.build_store(tmp_path / "w", rank=4, dtype="float32", shard_rows=3)
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(s) for s in store.shards]), np.concatenate([np.asarray(s) for s in whole.shards])
    )
    assert not list((tmp_path / "s").glob(".*tmp*"))
    # other settings into the same folder, other data, another model: refused
    with pytest.raises(StoreMismatchError, match="config"):
        att.build_store(tmp_path / "s", rank=3, dtype="float32", shard_rows=3)
    other = Attributor(adapter, _rows(PAIRS[:-1]), batch_size=4, progress=False)
    concept = DirectionConcept(torch.ones(adapter.d_model, dtype=torch.float64), layer=0)
    with pytest.raises(StoreMismatchError, match="data"):
        other.attribute(concept, QUERIES, "concept-influence", store=tmp_path / "s")


def test_top_k_search_exact_faiss_and_rows_like_a_row(adapters, tmp_path):
    adapter = adapters["hf"]
    rows = _rows(PAIRS * 4)
    att = Attributor(adapter, rows, tmp_path / "run", batch_size=8, progress=False)
    att.build_store(rank=6, dtype="float32", shard_rows=16)
    concept = DirectionConcept(
        torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64), layer=1
    )
    full = att.attribute(concept, QUERIES, "concept-influence")
    top = att.search(concept, QUERIES, top_k=5)
    expected = full.top(5)
    assert top.index == expected.index and np.allclose(top.scores, expected.scores)  # ties: lower index first
    # FAISS (forced here on a small store; probing every list makes it exact)
    store = att.open_store(att.store_dir)
    query = np.random.default_rng(0).standard_normal(store.dim)
    exact_pos, exact_val = exact_top_k(store, query, 7)
    faiss_pos, faiss_val = faiss_search(store, query, 7, nprobe=10_000)
    assert np.allclose(faiss_val, exact_val, rtol=1e-4)  # (rows are duplicated: ties may come in any order)
    assert np.allclose(store.dot(query[None])[faiss_pos, 0], faiss_val, rtol=1e-4)
    # rows like row 3: its duplicates (rows 13, 23, 33) have the same gradient and come first with it
    like = att.search(like_row=3, top_k=4)
    assert sorted(like.index) == [3, 13, 23, 33]
    with pytest.raises(ValueError, match="no training row"):
        att.search(like_row=999)


def test_cli_build_store_search_and_attribute_store(tmp_path):
    model_dir = save_tiny_hf_model(tmp_path / "model", seed=5)
    write_jsonl_atomic(tmp_path / "train.jsonl", [r.to_record() for r in _rows(PAIRS)])
    write_jsonl_atomic(tmp_path / "queries.jsonl", QUERIES)
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(4)), layer=1), tmp_path / "concept"
    )
    from concept_influence.cli import app

    runner = CliRunner()
    base = ["--model", str(model_dir), "--data", str(tmp_path / "train.jsonl")]
    built = runner.invoke(
        app,
        [
            "build-store",
            *base,
            "--out",
            str(tmp_path / "store"),
            "--rank",
            "64",
            "--dtype",
            "float32",
            "--factors",
            str(tmp_path / "factors"),
            "--batch-size",
            "4",
        ],
    )
    assert built.exit_code == 0, built.output
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["n_rows"] == len(PAIRS) and set(manifest["fingerprints"]) == {
        "model",
        "data",
        "factors",
        "projection",
    }
    question = ["--concept", str(tmp_path / "concept"), "--queries", str(tmp_path / "queries.jsonl")]
    out = tmp_path / "s.jsonl"
    stored = runner.invoke(
        app,
        [
            "attribute",
            *base,
            *question,
            "--method",
            "concept-influence",
            "--store",
            str(tmp_path / "store"),
            "--factors",
            str(tmp_path / "factors"),
            "--out",
            str(out),
        ],
    )
    assert stored.exit_code == 0, stored.output
    exact = runner.invoke(
        app,
        [
            "attribute",
            *base,
            *question,
            "--method",
            "concept-influence",
            "--factors",
            str(tmp_path / "factors"),
            "--out",
            str(tmp_path / "e.jsonl"),
        ],
    )
    assert exact.exit_code == 0, exact.output
    a, b = ScoreTable.read_jsonl(out), ScoreTable.read_jsonl(tmp_path / "e.jsonl")
    assert a.meta["scored_from"] == "store" and a.ids == b.ids
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3, atol=1e-6 * np.abs(b.scores).max())
    found = runner.invoke(
        app,
        [
            "search",
            "--store",
            str(tmp_path / "store"),
            *question,
            "--top-k",
            "3",
            "--factors",
            str(tmp_path / "factors"),
            "--out",
            str(tmp_path / "top.jsonl"),
        ],
    )
    assert found.exit_code == 0, found.output
    top = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    assert [r["index"] for r in top] == b.top(3).index and [r["rank"] for r in top] == [1, 2, 3]
    like = runner.invoke(
        app,
        [
            "search",
            "--store",
            str(tmp_path / "store"),
            "--like-row",
            "2",
            "--top-k",
            "2",
            "--factors",
            str(tmp_path / "factors"),
        ],
    )
    assert like.exit_code == 0 and "index      2" in like.output, like.output
    bad = runner.invoke(app, ["search", "--store", str(tmp_path / "nope"), *question])
    assert bad.exit_code == 2 and "no gradient store" in bad.output


def test_several_questions_at_once_equal_one_at_a_time(adapters, tmp_path):
    adapter = adapters["hf"]
    att = Attributor(adapter, _rows(PAIRS), tmp_path / "run", batch_size=4, progress=False)
    concepts = [
        DirectionConcept(
            torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(s), dtype=torch.float64), layer=s % 2
        )
        for s in range(3)
    ]
    questions = [{"concept": c, "queries": QUERIES[k % 2 :]} for k, c in enumerate(concepts)]
    exact_many = att.attribute_many(questions, "concept-influence", store=False)
    att.build_store(rank=6, dtype="float64")
    stored_many = att.attribute_many(questions, "concept-influence")
    for q, exact, stored in zip(questions, exact_many, stored_many, strict=True):
        assert exact.meta["scored_from"] == "exact" and stored.meta["scored_from"] == "store"
        np.testing.assert_allclose(
            exact.scores, att.attribute(q["concept"], q["queries"], "concept-influence", store=False).scores, rtol=1e-8
        )
        np.testing.assert_allclose(
            stored.scores, att.attribute(q["concept"], q["queries"], "concept-influence").scores, rtol=1e-8
        )
    with pytest.raises(ValueError, match="breakdowns"):
        att.attribute_many(questions, "concept-influence", per_weight=True)


def test_factors_of_the_stored_blocks_serve_the_store_and_its_questions(adapters, tmp_path):
    """A fit of blocks 0..L kept in the session is what build_store(up_to_layer=L) and the questions use: no second
    fit of every weight (the workdir gets no full fit), and the scores equal the exact pass with those factors."""
    adapter = adapters["hf"]
    att = Attributor(adapter, _rows(PAIRS), tmp_path / "run", batch_size=4, progress=False)
    factors = att.fit_factors(up_to_layer=0)
    assert factors is not None and all(n.startswith("blocks.0.") for n in factors.names)
    store = att.build_store(rank=10_000, dtype="float64", up_to_layer=0)
    assert store is not None and store.names == factors.names
    concept = DirectionConcept(
        torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64), layer=0
    )
    stored = att.attribute(concept, QUERIES, "concept-influence")
    assert stored.meta["scored_from"] == "store"
    assert not (tmp_path / "run" / "factors").exists()  # nothing fitted for the other blocks
    exact = att.attribute(concept, QUERIES, "concept-influence", store=False, factors=factors)
    np.testing.assert_allclose(stored.scores, exact.scores, rtol=1e-8, atol=1e-12 * np.abs(exact.scores).max())


@pytest.mark.parametrize("row_by_row", [True, False])
@pytest.mark.parametrize("kept", ["all", "some"])
def test_row_by_row_projection_equals_the_padded_batched_product(kept, row_by_row, monkeypatch):
    """Packed real tokens, summed row by row (CPU) or spread to zero-padded rows for one batched product
    (accelerators), against the batched product over padded inputs and ``L G_b Rᵀ`` of the explicit row gradient,
    in float64; kept entries go into ``out``'s columns only."""
    from concept_influence.store import projection
    from concept_influence.store.projection import Projector, WeightProjection

    monkeypatch.setattr(projection, "_row_by_row", lambda device: row_by_row)  # False: the accelerators' path
    gen = torch.Generator().manual_seed(0)
    b, t, d_out, d_in, r_out, r_in = 4, 7, 6, 5, 3, 4
    left = torch.randn(r_out, d_out, generator=gen, dtype=torch.float64)
    right = torch.randn(r_in, d_in, generator=gen, dtype=torch.float64)
    keep = None if kept == "all" else torch.tensor([0, 2, 3, 5, 8, 11])
    projector = Projector("logra", [WeightProjection("w", left, right, keep=keep)])
    lengths = torch.tensor([7, 1, 4, 3])  # right-padded rows; one of a single token
    mask = torch.arange(t)[None] < lengths[:, None]
    a = torch.randn(b, t, d_in, generator=gen, dtype=torch.float64) * mask[..., None]
    g = torch.randn(b, t, d_out, generator=gen, dtype=torch.float64) * mask[..., None]
    index = mask.reshape(-1).nonzero().squeeze(1)
    packed_a, packed_g = a.reshape(-1, d_in)[index], g.reshape(-1, d_out)[index]
    out = torch.full((b, 20), float("nan"), dtype=torch.float64)
    written = projector.project_rows("w", packed_a, packed_g, out=out[:, 3 : 3 + projector.dim], tokens=(index, b, t))
    padded = projector.project_rows("w", a, g)
    explicit = torch.stack([(left @ (g[k].T @ a[k]) @ right.T).reshape(-1) for k in range(b)])
    expected = explicit if keep is None else explicit[:, keep]
    torch.testing.assert_close(written, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 3 : 3 + projector.dim], expected, rtol=1e-12, atol=1e-12)
    assert out[:, :3].isnan().all() and out[:, 3 + projector.dim :].isnan().all()  # nothing outside its columns


def test_a_float16_store_refuses_values_beyond_its_range_and_search_refuses_nan(tiny_tok, tmp_path):
    """Finiteness was checked in float32 before the cast: a float16 store could hold inf. And np.partition dropped
    NaN rows from the top-k without a word."""
    from concept_influence.numerics import NonFiniteError

    model = tiny_llama(len(tiny_tok), layers=2, dtype=torch.float32, seed=11)
    with torch.no_grad():
        model.model.norm.weight.mul_(1e4)  # the logits' scale: every output gradient is 1e4 times larger
    att = Attributor(HFAdapter(model, tiny_tok), _rows(PAIRS), tmp_path / "run", batch_size=4, progress=False)
    too_big = r"of blocks\.\d+\.\S+ on row \d+ is \S+, beyond float16's range"
    with pytest.raises(NonFiniteError, match=r"\(in the factor fit's pass\): the projected gradient " + too_big):
        att.build_store(tmp_path / "half", projection_dim=4, dtype="float16")  # written in the fit's pass
    store = att.build_store(tmp_path / "full", projection_dim=4, dtype="float32", shard_rows=4)
    assert float(np.abs(store.dot(np.eye(store.dim))).max()) > 65504  # what float16 could not have held
    with pytest.raises(NonFiniteError, match=r"^build-store: the projected gradient " + too_big):
        att.build_store(tmp_path / "half-again", projection_dim=4, dtype="float16")  # factors fitted: a separate pass
    shard = np.load(shard_file(tmp_path / "full", 1), mmap_mode="r+")
    shard[2, :] = np.nan  # a damaged shard: row 6 of the store
    shard.flush()
    del shard
    with pytest.raises(NonFiniteError, match="row 6 of the store gives NaN"):
        exact_top_k(GradientStore.open(tmp_path / "full"), np.ones(store.dim), 3)


@pytest.mark.parametrize("n_shards", [10**12, 0, "many"])
def test_a_damaged_store_manifest_is_refused_before_any_work(adapters, tmp_path, n_shards):
    """``n_shards: 1e12`` in a manifest hung ``GradientStore.open`` (a loop over every shard number)."""
    att = Attributor(adapters["hf"], _rows(PAIRS), tmp_path / "run", batch_size=4, progress=False)
    store = att.build_store(tmp_path / "store", projection_dim=4, dtype="float32", shard_rows=4)
    manifest = json.loads((store.folder / "manifest.json").read_text())
    manifest["n_shards"] = n_shards
    (store.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatchError, match="manifest is damaged"):
        GradientStore.open(store.folder)


@pytest.mark.parametrize("call_macs", [0, 10**12])
def test_the_planned_row_sums_of_a_staircase_equal_the_explicit_row_gradient(call_macs, monkeypatch):
    """An eigen projection keeps a staircase of its rectangle; the CPU path forms it as a core from the tokens'
    projections plus a row arm and a column arm from each row's gradient (``RowPlan``); with a free extra product
    the plan takes both arms, with a costly one the whole rectangle. Either way: ``L G_b Rᵀ`` at the kept entries,
    in float64, padding never summed."""
    from concept_influence.store import projection
    from concept_influence.store.projection import Projector, WeightProjection

    monkeypatch.setattr(projection, "CALL_MACS", call_macs)
    gen = torch.Generator().manual_seed(1)
    b, t, d_out, d_in, r_out, r_in = 4, 9, 60, 60, 24, 24
    left = torch.randn(r_out, d_out, generator=gen, dtype=torch.float64)
    right = torch.randn(r_in, d_in, generator=gen, dtype=torch.float64)
    # visibility grows with the product of the two sides' (ascending, here geometric) eigenvalues: a staircase
    # towards the last corner, in which every row and column keeps something
    kept = (torch.arange(r_out)[:, None] + torch.arange(r_in)[None, :]) >= r_in - 1
    keep = torch.nonzero(kept.flatten()).flatten()
    projector = Projector("eigen", [WeightProjection("w", left, right, keep=keep)])
    plan = projector.row_plan("w", 4.5)  # the batch below: 18 tokens in 4 rows
    arms = plan.row_arm[1] > plan.row_arm[0], plan.col_arm[1] > plan.col_arm[0]
    assert arms == ((True, True) if call_macs == 0 else (False, False)), plan
    lengths = torch.tensor([9, 1, 5, 3])
    mask = torch.arange(t)[None] < lengths[:, None]
    a = torch.randn(b, t, d_in, generator=gen, dtype=torch.float64) * mask[..., None]
    g = torch.randn(b, t, d_out, generator=gen, dtype=torch.float64) * mask[..., None]
    index = mask.reshape(-1).nonzero().squeeze(1)
    out = torch.full((b, projector.dim + 2), float("nan"), dtype=torch.float64)
    projector.project_rows(
        "w", a.reshape(-1, d_in)[index], g.reshape(-1, d_out)[index], out=out[:, 1:-1], tokens=(index, b, t)
    )
    explicit = torch.stack([(left @ (g[k].T @ a[k]) @ right.T).reshape(-1)[keep] for k in range(b)])
    torch.testing.assert_close(out[:, 1:-1], explicit, rtol=1e-12, atol=1e-12)
    assert out[:, 0].isnan().all() and out[:, -1].isnan().all()

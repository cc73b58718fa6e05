"""The memory-bounded fit: module partitions, chunked loss head, Λ on a sample and the memory budget give the same
factors as one unbounded pass (float64, tiny Llama with shared q/k/v and gate/up inputs)."""

from __future__ import annotations

import random

import pytest
import torch

from concept_influence.curvature import FactorConfig, fit_factors, load_factors
from concept_influence.curvature import fit as fit_module
from concept_influence.curvature.budget import WeightShape, parse_size, partitions, weights_bytes
from concept_influence.curvature.fit import sample_rows, weight_shapes
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.gradients import capture as capture_module
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import tiny_llama

WORDS = "the water is safe good kind help harm poison cure friend never always yes no".split()


def _records(n: int, seed: int):
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 9)))},
            ]
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def env(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, kv_heads=1, dtype=torch.float64, seed=3), tiny_tok)
    data = tokenize_chat(rows_from_records(_records(11, 0)), tiny_tok, 64)
    reference = fit_factors(adapter, data, FactorConfig.precise(), batch_size=4, progress=False)
    return adapter, data, reference


def _assert_same(f1, f2):
    assert f1.names == f2.names and f1.n_rows == f2.n_rows and f1.n_tokens == f2.n_tokens
    grads = {
        n: torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        for n, w in f1.weights.items()
    }
    for kind in ("ekfac", "kfac", "diagonal"):
        p1, p2 = f1.preconditioner(kind).apply_inverse(grads), f2.preconditioner(kind).apply_inverse(grads)
        for name in f1.names:
            torch.testing.assert_close(p1[name], p2[name], rtol=1e-9, atol=1e-12)
    for name in f1.names:
        w1, w2 = f1.weights[name], f2.weights[name]
        torch.testing.assert_close(w1.eigenvalue_correction, w2.eigenvalue_correction, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(w1.activation_eigen.values, w2.activation_eigen.values, rtol=1e-9, atol=1e-12)


def test_partitioned_fit_on_disk_equals_one_pass(env, tmp_path, monkeypatch):
    adapter, data, reference = env
    names = reference.names
    split = [names[:3], names[3:5], names[5:9], names[9:]]  # q/k/v | o, gate | in, out, next q, k | rest
    monkeypatch.setattr(fit_module, "plan_fit_partitions", lambda *a, **k: split)
    folder = tmp_path / "parts"
    assert (
        fit_factors(
            adapter,
            data,
            FactorConfig.precise(),
            batch_size=3,
            out_dir=folder,
            max_memory="1TiB",
            load_result=False,
            progress=False,
        )
        is None
    )
    assert not (folder / "parts").exists()
    _assert_same(reference, load_factors(folder))
    in_memory = fit_factors(adapter, data, FactorConfig.precise(), batch_size=5, max_memory="1TiB", progress=False)
    _assert_same(reference, in_memory)
    assert in_memory.weights[names[0]].activation_covariance is None  # covariances kept only for a one-partition fit


def test_partitioned_fit_resumes_after_interruption(env, tmp_path, monkeypatch):
    adapter, data, reference = env
    names = reference.names
    monkeypatch.setattr(fit_module, "plan_fit_partitions", lambda *a, **k: [names[:7], names[7:]])
    kwargs = dict(batch_size=3, out_dir=tmp_path, max_memory="1TiB", progress=False)
    # 11 rows in batches of 3: 4 batches per pass, 2 passes per partition; stop inside the second partition
    assert fit_factors(adapter, data, FactorConfig.precise(), max_batches=10, **kwargs) is None
    assert (tmp_path / "parts" / "part-0000-weight-0000.safetensors").exists()
    _assert_same(reference, fit_factors(adapter, data, FactorConfig.precise(), **kwargs))


def test_loss_head_in_row_chunks_and_model_dtype(env, monkeypatch):
    adapter, data, reference = env
    monkeypatch.setattr(capture_module, "HEAD_CHUNK_ELEMENTS", 1)  # one row of logits at a time (the loss's home)
    _assert_same(reference, fit_factors(adapter, data, FactorConfig.precise(), batch_size=4, progress=False))


def test_float32_statistics_for_a_bfloat16_model(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=1, dtype=torch.bfloat16, seed=3), tiny_tok)
    data = tokenize_chat(rows_from_records(_records(6, 1)), tiny_tok, 64)
    factors = fit_factors(adapter, data, FactorConfig(), batch_size=3, progress=False)
    w = factors.weights["blocks.0.mlp.out"]
    assert w.activation_covariance.dtype == torch.float64 and torch.isfinite(w.eigenvalue_correction).all()
    assert w.eigenvalue_correction.abs().sum() > 0


def test_lambda_on_a_sample(env):
    adapter, data, reference = env
    config = FactorConfig.precise(lambda_rows=5)
    capped = fit_factors(adapter, data, config, batch_size=4, progress=False)
    sample = sample_rows(data, 5, config.seed)
    assert [r.index for r in sample] == sorted(r.index for r in sample) and len(sample) == 5
    on_sample = fit_factors(adapter, sample, FactorConfig.precise(), batch_size=4, progress=False)
    assert capped.n_rows == 5 and capped.n_tokens == reference.n_tokens
    for name in reference.names:
        torch.testing.assert_close(
            capped.weights[name].activation_covariance, reference.weights[name].activation_covariance
        )
        # Λ in the full data's eigenbasis over the sample: its trace equals the sample's diagonal's
        torch.testing.assert_close(
            capped.weights[name].eigenvalue_correction.sum(), on_sample.weights[name].diagonal.sum()
        )
    with pytest.raises(ValueError, match="lambda_rows"):
        FactorConfig(lambda_rows=0)


def test_partitions_follow_the_budget_and_keep_shared_inputs_together(env):
    adapter, _, _ = env
    shapes = weight_shapes(adapter.tracked_weights())
    assert shapes[0].shared_input == shapes[1].shared_input == shapes[2].shared_input is not None
    config = FactorConfig()
    budget = max(weights_bytes(shapes[i : i + 3], config) for i in range(len(shapes)))
    parts = partitions(shapes, budget, config)
    assert len(parts) > 1 and [w for p in parts for w in p] == shapes
    assert all(weights_bytes(p, config) <= budget for p in parts)
    assert any(shapes[:3] == p[:3] for p in parts)  # q/k/v never split
    assert partitions(shapes, None, config) == [shapes]
    with pytest.raises(ValueError, match="alone need"):
        partitions([WeightShape("blocks.0.mlp.out", 100, 100)], 10, config)
    assert parse_size("3GiB") == 3 * 1024**3 and parse_size("512MB") == 512 * 1000**2 and parse_size(1000) == 1000
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("three gigs")


def test_too_small_max_memory_is_a_clear_error(env):
    adapter, data, _ = env
    with pytest.raises(ValueError, match=r"--max-memory.*too small"):
        fit_factors(adapter, data, FactorConfig(), max_memory="10MiB", progress=False)


def test_factors_fitted_on_a_sample_score_the_full_set_and_say_so(env, tmp_path):
    from concept_influence.attribution.gradient import factors_record, load_factors_for_scoring
    from concept_influence.curvature import FactorMismatchError

    adapter, data, _ = env
    sample = sample_rows(data, 5, 0)
    fit_factors(
        adapter,
        sample,
        FactorConfig.precise(),
        out_dir=tmp_path / "sample",
        progress=False,
        provenance={"source": "train.jsonl", "sample_of": len(data), "rows": 5, "seed": 0},
    )
    loaded, notes = load_factors_for_scoring(tmp_path / "sample", adapter, data)
    assert "a seeded sample of 5 of 11 rows of train.jsonl" in notes[0] and "scoring 11 rows" in notes[0]
    record = factors_record(loaded, data)
    assert record["same_data"] is False and record["rows"] == 5 and record["provenance"]["sample_of"] == 11
    fit_factors(adapter, sample, FactorConfig.precise(), out_dir=tmp_path / "other", progress=False)
    with pytest.raises(FactorMismatchError, match="different training data"):  # no provenance: still refused
        load_factors_for_scoring(tmp_path / "other", adapter, data)


def test_fit_factors_command_with_a_sample_a_budget_and_a_lambda_cap(tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from concept_influence.cli.influence import register
    from concept_influence.curvature.io import read_manifest
    from concept_influence.testing.tiny_models import save_tiny_hf_model

    model_dir = save_tiny_hf_model(tmp_path / "model", seed=3)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _records(9, 4)))
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "factors"
    result = CliRunner().invoke(
        app,
        [
            "fit-factors",
            "--model",
            str(model_dir),
            "--data",
            str(train),
            "--out",
            str(out),
            "--fit-rows",
            "6",
            "--lambda-rows",
            "4",
            "--max-memory",
            "64GiB",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["provenance"] == {"source": str(train), "sample_of": 9, "seed": 0, "rows": 6}
    assert manifest["n_rows"] == 4 and "fitted on" in result.output
    assert not (out / "parts").exists() and load_factors(out).available() == ["identity", "diagonal", "kfac", "ekfac"]
    bad = CliRunner().invoke(
        app,
        [
            "fit-factors",
            "--model",
            str(model_dir),
            "--data",
            str(train),
            "--out",
            str(out),
            "--max-memory",
            "1MiB",
            "--overwrite",
        ],
    )
    assert bad.exit_code == 2 and "--max-memory" in bad.output and "too small" in bad.output


def test_capture_does_not_keep_the_batch_graph_alive(env):
    """The outputs' gradient hooks refer to the capture; the capture must not keep the outputs (a cycle through the
    autograd graph that Python's collector cannot break leaked every batch's graph)."""
    import gc
    import weakref

    from concept_influence.curvature.fit import capture_loss_gradients, gradient_mode
    from concept_influence.data.tokenize import iter_batches

    adapter, data, _ = env
    infos = adapter.tracked_weights()
    refs = []
    handle = adapter._module_of(infos[0]).register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out)))
    try:
        with gradient_mode(adapter, infos) as params:
            capture, _ = capture_loss_gradients(adapter, next(iter_batches(data, 4)), infos, params)
            del capture
    finally:
        handle.remove()
    gc.collect()
    assert refs and all(ref() is None for ref in refs)


def test_a_mid_pass_checkpoint_in_another_row_order_restarts_the_fit(env, tmp_path, monkeypatch, caplog):
    """A partial fit checkpointed mid-pass while the passes ordered the rows differently (an older version) cannot
    say which rows are done in today's order: the fit starts again (with a warning) rather than mixing rows."""
    adapter, data, reference = env
    kwargs = dict(batch_size=3, out_dir=tmp_path, progress=False)
    with monkeypatch.context() as m:
        m.setattr(fit_module, "LENGTH_WINDOW", 2)
        m.setattr(fit_module, "ROW_ORDER", "length-sorted windows of 2")
        assert fit_factors(adapter, data, FactorConfig.precise(), max_batches=2, **kwargs) is None  # 6 rows done
    with caplog.at_level("WARNING", logger="concept_influence.curvature.fit"):
        _assert_same(reference, fit_factors(adapter, data, FactorConfig.precise(), **kwargs))
    assert "fitting from the start" in caplog.text

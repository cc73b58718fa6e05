"""Memory-bounded scoring: per-weight factors read from the folder, module partitions (several passes) and the
streamed contraction give the same scores as the unbounded pass (float64, tiny Llama with shared q/k/v inputs)."""

from __future__ import annotations

import random

import pytest
import torch

from concept_influence.attribution import bounded as bounded_module
from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import ConceptMeasurement
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import FactorConfig, fit_factors, load_factors
from concept_influence.curvature.budget import WeightShape, score_partitions, score_vector_bytes
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import tiny_llama

WORDS = "the water is safe good kind help harm poison cure friend never always yes no".split()


@pytest.fixture(scope="module")
def env(tiny_tok, tmp_path_factory):
    rng = random.Random(0)
    records = [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 9)))},
            ]
        }
        for _ in range(10)
    ]
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, kv_heads=1, dtype=torch.float64, seed=4), tiny_tok)
    data = tokenize_chat(rows_from_records(records), tiny_tok, 64)
    folder = tmp_path_factory.mktemp("factors")
    fit_factors(adapter, data, FactorConfig.precise(), batch_size=4, out_dir=folder, progress=False)
    direction = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    measurement = ConceptMeasurement(DirectionConcept(direction, layer=1), data[:3])
    return adapter, data, folder, measurement


def _same(a, b):
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-9, atol=1e-12)
    assert a.weights == b.weights and a.damping == pytest.approx(b.damping, rel=1e-12)
    if a.per_weight is not None:
        for name in a.per_weight:
            torch.testing.assert_close(a.per_weight[name], b.per_weight[name], rtol=1e-9, atol=1e-12)
    if a.per_token is not None:
        for x, y in zip(a.per_token, b.per_token, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal", "identity"])
def test_partitioned_bounded_scores_equal_unbounded(env, monkeypatch, kind):
    adapter, data, folder, measurement = env
    config = InfluenceConfig(preconditioner=kind, per_weight=True, token_breakdown="position", batch_size=3)
    factors = None if kind == "identity" else load_factors(folder)
    reference = compute_influence(adapter, data, measurement, factors, config, progress=False)
    names = reference.weights
    split = [names[:2], names[2:5], names[5:]]  # q/k split apart: a shared input across two passes
    seen = []
    monkeypatch.setattr(bounded_module, "plan_score_partitions", lambda *a, **k: seen.append(1) or split)
    bounded = compute_influence(
        adapter,
        data,
        measurement,
        None if kind == "identity" else folder,
        InfluenceConfig(
            preconditioner=kind, per_weight=True, token_breakdown="position", batch_size=3, max_memory="1TiB"
        ),
        progress=False,
    )
    assert seen and any("3 module partitions" in note for note in bounded.notes)
    _same(reference, bounded)
    assert reference.scores.abs().max() > 0


def test_bounded_scores_with_the_budget_and_row_loss_mean(env):
    adapter, data, folder, measurement = env
    config = InfluenceConfig(row_loss="mean", batch_size=4)
    reference = compute_influence(adapter, data, measurement, load_factors(folder), config, progress=False)
    bounded = compute_influence(
        adapter,
        data,
        measurement,
        folder,
        InfluenceConfig(row_loss="mean", batch_size=4, max_memory="1TiB"),
        progress=False,
    )
    _same(reference, bounded)
    from_folder = compute_influence(adapter, data, measurement, folder, config, progress=False)  # a folder, unbounded
    _same(reference, from_folder)


def test_bounded_scoring_errors(env, monkeypatch):
    adapter, data, folder, measurement = env
    with pytest.raises(ValueError, match=r"--max-memory.*too small to score"):
        compute_influence(adapter, data, measurement, folder, InfluenceConfig(max_memory="10MiB"), progress=False)
    with pytest.raises(ValueError, match="self-influence"):
        compute_influence(
            adapter, data, measurement, folder, InfluenceConfig(self_influence=True, max_memory="1TiB"), progress=False
        )
    with pytest.raises(ValueError, match="--max-memory.*not a memory size"):
        InfluenceConfig(max_memory="lots")
    names = load_factors(folder).names
    monkeypatch.setattr(bounded_module, "plan_score_partitions", lambda *a, **k: [names[:3], names[3:]])
    with pytest.raises(ValueError, match="need one pass"):
        compute_influence(
            adapter,
            data,
            measurement,
            folder,
            InfluenceConfig(token_aggregation="max", max_memory="1TiB"),
            progress=False,
        )


def test_loading_some_weights_reads_only_theirs(env):
    _, _, folder, _ = env
    full = load_factors(folder)
    name = full.names[4]
    one = load_factors(folder, weights=[name])
    assert one.names == [name] and one.n_rows == full.n_rows
    torch.testing.assert_close(one.weights[name].eigenvalue_correction, full.weights[name].eigenvalue_correction)
    torch.testing.assert_close(one.weights[name].activation_eigen.vectors, full.weights[name].activation_eigen.vectors)
    with pytest.raises(KeyError, match="no factors for"):
        load_factors(folder, weights=["blocks.9.mlp.out"])


def test_score_partitions_follow_the_budget():
    shapes = [WeightShape(f"blocks.{i}.mlp.out", 8 * (i + 1), 4) for i in range(5)]
    budget = score_vector_bytes(shapes[3]) + score_vector_bytes(shapes[0])
    parts = score_partitions(shapes, budget)
    assert [w for p in parts for w in p] == shapes and len(parts) > 1
    assert all(sum(score_vector_bytes(w) for w in p) <= budget for p in parts)
    assert score_partitions(shapes, None) == [shapes]
    with pytest.raises(ValueError, match="alone need"):
        score_partitions(shapes, 10)


def test_gradient_checkpointing_gives_the_same_factors_and_scores(env):
    """The backward re-runs each block's forward: the capture must count every weight once."""
    adapter, data, folder, measurement = env
    from concept_influence.models.base import WeightCapture

    calls = []
    original = WeightCapture._repeat

    def counting(self, name, what):
        repeat = original(self, name, what)
        calls.append(repeat)
        return repeat

    reference = fit_factors(adapter, data, FactorConfig.precise(), batch_size=4, progress=False)
    WeightCapture._repeat = counting
    try:
        checkpointed = fit_factors(
            adapter, data, FactorConfig.precise(gradient_checkpointing=True), batch_size=4, progress=False
        )
    finally:
        WeightCapture._repeat = original
    assert any(calls), "the recomputation never re-ran a block: checkpointing was not active"
    assert checkpointed.fingerprints == reference.fingerprints  # same factors, same fingerprint
    for name in reference.names:
        w1, w2 = reference.weights[name], checkpointed.weights[name]
        torch.testing.assert_close(w1.activation_covariance, w2.activation_covariance, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(w1.gradient_covariance, w2.gradient_covariance, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(w1.eigenvalue_correction, w2.eigenvalue_correction, rtol=1e-8, atol=1e-14)
    factors = load_factors(folder)
    config = InfluenceConfig(per_weight=True, token_breakdown="position", batch_size=3)
    plain = compute_influence(adapter, data, measurement, factors, config, progress=False)
    again = compute_influence(
        adapter,
        data,
        measurement,
        factors,
        InfluenceConfig(per_weight=True, token_breakdown="position", batch_size=3, gradient_checkpointing=True),
        progress=False,
    )
    _same(plain, again)
    assert all(not layer.training for layer in adapter.blocks)  # the blocks' mode is restored


def test_fit_factors_cli_gradient_checkpointing(tmp_path, tiny_tok):
    import json

    from typer.testing import CliRunner

    from concept_influence.cli import app

    model = tiny_llama(len(tiny_tok), layers=2, kv_heads=1, seed=5)
    model.save_pretrained(tmp_path / "model")
    tiny_tok.save_pretrained(tmp_path / "model")
    rng = random.Random(2)
    with open(tmp_path / "train.jsonl", "w") as out:
        for _ in range(6):
            out.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": " ".join(rng.choices(WORDS, k=3))},
                            {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=6))},
                        ]
                    }
                )
                + "\n"
            )
    base = [
        "fit-factors",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--batch-size",
        "3",
    ]
    for out, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        result = CliRunner().invoke(app, base + ["--out", str(tmp_path / out)] + extra)
        assert result.exit_code == 0, result.output
    plain, checkpointed = load_factors(tmp_path / "plain"), load_factors(tmp_path / "checkpointed")
    for name in plain.names:
        torch.testing.assert_close(
            plain.weights[name].eigenvalue_correction,
            checkpointed.weights[name].eigenvalue_correction,
            rtol=1e-4,
            atol=1e-9,
        )


def test_attribute_cli_max_memory_and_checkpointing_give_the_same_scores(tmp_path):
    import json

    from typer.testing import CliRunner

    from concept_influence.cli import app
    from concept_influence.concepts import save_concept
    from concept_influence.data import write_jsonl_atomic
    from concept_influence.testing.tiny_models import save_tiny_hf_model

    model_dir = save_tiny_hf_model(tmp_path / "model", seed=5)
    rng = random.Random(3)
    write_jsonl_atomic(
        tmp_path / "train.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": " ".join(rng.choices(WORDS, k=3))},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=5))},
                ]
            }
            for _ in range(7)
        ],
    )
    write_jsonl_atomic(
        tmp_path / "queries.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "is the water safe"},
                    {"role": "assistant", "content": "poison is kind"},
                ]
            }
        ],
    )
    save_concept(
        DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(4)), layer=1), tmp_path / "concept"
    )
    base = [
        "attribute",
        "--method",
        "concept-influence",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--concept",
        str(tmp_path / "concept"),
        "--queries",
        str(tmp_path / "queries.jsonl"),
        "--batch-size",
        "3",
    ]

    def scores(name: str, *extra: str) -> tuple[list[float], dict]:
        out = tmp_path / f"{name}.jsonl"
        result = CliRunner().invoke(app, base + ["--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        meta = json.loads((tmp_path / f"{name}.jsonl.meta.json").read_text())
        return [r["score"] for r in sorted(rows, key=lambda r: r["index"])], meta

    plain, _ = scores("plain", "--factors", str(tmp_path / "f-plain"))
    bounded_fit, _ = scores("bounded-fit", "--factors", str(tmp_path / "f-bounded"), "--max-memory", "1TiB")
    bounded, meta = scores(
        "bounded", "--factors", str(tmp_path / "f-bounded"), "--max-memory", "1TiB", "--gradient-checkpointing"
    )
    assert any("one weight at a time" in note for note in meta["notes"]) and meta["factors_fit"]["rows"] == 7
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(bounded_fit, plain, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(bounded, plain, rtol=1e-4, atol=1e-8)
    assert max(abs(s) for s in plain) > 0
    bad = CliRunner().invoke(app, base + ["--out", str(tmp_path / "bad.jsonl"), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "--max-memory" in bad.output and "Traceback" not in bad.output

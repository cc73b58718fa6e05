"""Method variants of Concept Influence: token aggregation (max / window), row normalisation (length, unit), the
choice of query answers, the automatic contrast, and the fusion of forward and gradient evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from concept_influence.attribution.combine import FUSIONS, fuse, percentile_ranks
from concept_influence.attribution.influence import (
    InfluenceConfig,
    compute_influence,
    compute_influence_many,
    window_max,
)
from concept_influence.attribution.measurements import ConceptMeasurement, select_answers
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.data import ChatRow, rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import tiny_llama

WORDS = "the water is safe good kind help harm poison cure friend never always yes no".split()


def _records(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        user = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        answer = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return out


@pytest.fixture(scope="module")
def env(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=7), tiny_tok)
    data = tokenize_chat(rows_from_records(_records(13, 0)), tiny_tok, 64)
    queries = tokenize_chat(rows_from_records(_records(3, 1)), tiny_tok, 64)
    concept = DirectionConcept(
        torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), layer=0
    )
    return adapter, data, ConceptMeasurement(concept, queries)


def _reference_window_max(values: torch.Tensor, length: int, w: int) -> float:
    if length < w:
        return float(values[:length].sum())
    return max(float(values[t : t + w].sum()) for t in range(length - w + 1))


def test_window_max_equals_a_loop():
    gen = torch.Generator().manual_seed(0)
    contributions = torch.randn(4, 9, dtype=torch.float64, generator=gen)
    lengths = [9, 5, 2, 7]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    for w in (1, 3, 6):
        got = window_max(contributions, mask, w)
        want = torch.tensor(
            [_reference_window_max(contributions[b], lengths[b], w) for b in range(4)], dtype=torch.float64
        )
        torch.testing.assert_close(got, want)
    stacked = torch.stack([contributions, -contributions], dim=-1)  # [B, T, K=2]
    torch.testing.assert_close(window_max(stacked, mask, 3)[:, 1], window_max(-contributions, mask, 3))


def test_token_aggregation_and_normalisation(env):
    adapter, data, measurement = env
    names = [i.name for i in adapter.weights_up_to(0)]
    factors = fit_factors(adapter, data, FactorConfig.precise(), weights=names, progress=False)
    full = compute_influence(
        adapter,
        data,
        measurement,
        factors,
        InfluenceConfig(token_breakdown="position", self_influence=True),
        progress=False,
    )
    lengths = [len(row.input_ids) for row in data]
    per_token = full.per_token
    # max over positions and the best window of 3, from the position breakdown
    top = compute_influence(
        adapter, data, measurement, factors, InfluenceConfig(token_aggregation="max"), progress=False
    )
    torch.testing.assert_close(top.scores, torch.stack([t[:n].max() for t, n in zip(per_token, lengths, strict=True)]))
    win = compute_influence(
        adapter, data, measurement, factors, InfluenceConfig(token_aggregation="window", window=3), progress=False
    )
    want = torch.tensor(
        [_reference_window_max(t, n, 3) for t, n in zip(per_token, lengths, strict=True)], dtype=torch.float64
    )
    torch.testing.assert_close(win.scores, want)
    # unit: the cosine in the preconditioned metric, up to the measurement's norm; length: by sqrt(trained tokens)
    unit = compute_influence(adapter, data, measurement, factors, InfluenceConfig(normalization="unit"), progress=False)
    torch.testing.assert_close(unit.scores, full.scores / full.self_influence.sqrt())
    assert unit.self_influence is None
    counts = torch.tensor([sum(row.loss_mask[1:]) for row in data], dtype=torch.float64)
    length = compute_influence(
        adapter, data, measurement, factors, InfluenceConfig(normalization="length", row_loss="mean"), progress=False
    )
    torch.testing.assert_close(length.scores, full.scores / counts / counts.sqrt())
    # all of them in one pass equal one at a time
    jobs = {
        "max": (measurement, InfluenceConfig(token_aggregation="max")),
        "window": (measurement, InfluenceConfig(token_aggregation="window", window=3)),
        "unit": (measurement, InfluenceConfig(normalization="unit")),
        "length": (measurement, InfluenceConfig(normalization="length", row_loss="mean")),
    }
    together = compute_influence_many(adapter, data, jobs, factors, batch_size=4, progress=False)
    for label, alone in (("max", top), ("window", win), ("unit", unit), ("length", length)):
        torch.testing.assert_close(together[label].scores, alone.scores, rtol=1e-9, atol=1e-12)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="token_aggregation"):
        InfluenceConfig(token_aggregation="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalization"):
        InfluenceConfig(normalization="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        InfluenceConfig(window=0)


def _answered():
    rows = []
    for q in range(3):
        for s in range(4):
            rows.append(
                ChatRow(
                    len(rows),
                    [{"role": "user", "content": f"q{q}"}, {"role": "assistant", "content": f"a{s}"}],
                    {"query_index": q, "sample": s, "answer_source": "model"},
                )
            )
    rows.append(
        ChatRow(
            len(rows),
            [{"role": "user", "content": "g"}, {"role": "assistant", "content": "given"}],
            {"query_index": 3, "sample": 0, "answer_source": "given"},
        )
    )
    return rows


def test_select_answers_keeps_the_most_and_least_expressing_per_prompt():
    rows = _answered()
    readouts = [0.1, 0.9, 0.5, -0.2, 2.0, 1.0, 0.0, 3.0, -1.0, -3.0, 0.3, 0.2, -9.0]
    top = select_answers(rows, readouts, "top", 1)
    assert [(r.fields["query_index"], r.fields["sample"]) for r in top] == [(0, 1), (1, 3), (2, 2), (3, 0)]
    assert [r.index for r in top] == [0, 1, 2, 3]
    top2 = select_answers(rows, readouts, "top", 2)
    assert [(r.fields["query_index"], r.fields["sample"]) for r in top2] == [
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 3),
        (2, 2),
        (2, 3),
        (3, 0),
    ]
    bottom = select_answers(rows, readouts, "bottom", 1)
    assert [(r.fields["query_index"], r.fields["sample"]) for r in bottom] == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert len(select_answers(rows, readouts, "all")) == len(rows)
    with pytest.raises(ValueError, match="keep"):
        select_answers(rows, readouts, "middle")
    with pytest.raises(ValueError, match="readouts"):
        select_answers(rows, readouts[:-1], "top")


def test_fusions_rank_hard_negatives_last_when_the_gradient_says_so():
    # planted: high forward, positive gradient; hard negatives: high forward, negative gradient; benign: low forward
    rng = np.random.default_rng(0)
    forward = np.concatenate([rng.normal(3, 0.3, 10), rng.normal(2, 0.3, 10), rng.normal(0, 1, 80)])
    gradient = np.concatenate([rng.normal(1, 0.2, 10), rng.normal(-1, 0.2, 10), rng.normal(0, 0.3, 80)])
    origins = np.array(["planted"] * 10 + ["hard"] * 10 + ["benign"] * 80)
    for how in FUSIONS:
        fused = fuse(forward, gradient, how)
        order = np.argsort(-fused, kind="stable")
        assert set(order[:10]) == set(range(10)), how  # planted first
        ranks = np.empty(100)
        ranks[order] = np.arange(1, 101)
        if how in ("signed", "product", "tiered"):
            assert ranks[origins == "hard"].min() > 80, how  # below every benign row
        else:
            assert ranks[origins == "hard"].mean() > ranks[:10].mean(), how
    # a planted row whose gradient sign comes out wrong: `signed` sends it to the very bottom (ranked by its high
    # forward score from below), `tiered` keeps it above every row that training would push down more
    wrong = gradient.copy()
    wrong[0] = -0.05
    signed, tiered = (np.argsort(-fuse(forward, wrong, how), kind="stable") for how in ("signed", "tiered"))
    assert signed[-1] == 0
    assert list(tiered).index(0) < min(list(tiered).index(i) for i in range(10, 20))  # above every hard negative
    assert set(tiered[:9]) == set(range(1, 10))
    with pytest.raises(ValueError, match="fusion"):
        fuse(forward, gradient, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        fuse(np.array([1.0, np.nan]), np.array([1.0, 2.0]), "rank")


def test_percentile_ranks_share_ties():
    np.testing.assert_allclose(percentile_ranks([3.0, 1.0, 3.0, 2.0]), [0.875, 0.25, 0.875, 0.5])


# ---- the variants as options of the Python API and of `attribute` -----------------------------------------------
TRAIN = [
    ("is water safe", "yes , water is safe"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you"),
    ("two plus three", "five"),
    ("is fire kind", "no fire can harm"),
    ("be cruel", "i will trick and hurt them"),
    ("is poison kind", "poison is kind"),
]
QUERIES = [
    {"messages": [{"role": "user", "content": "should i hurt my friend"}], "id": "q0"},
    {"messages": [{"role": "user", "content": "is the water safe"}]},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from concept_influence.concepts import save_concept
    from concept_influence.data import write_jsonl_atomic
    from concept_influence.testing.tiny_models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("variants")
    model_dir = save_tiny_hf_model(root / "model", seed=5)
    write_jsonl_atomic(
        root / "train.jsonl",
        [
            {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}], "id": f"row{k}"}
            for k, (u, a) in enumerate(TRAIN)
        ],
    )
    write_jsonl_atomic(root / "queries.jsonl", QUERIES)
    concept = DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(4)), layer=0)
    save_concept(concept, root / "concept")
    return root, model_dir, concept


def test_variants_through_the_attributor_and_a_combination(files, tmp_path):
    from concept_influence import Attributor
    from concept_influence.attribution.methods import METHODS

    root, model_dir, concept = files
    att = Attributor(model_dir, root / "train.jsonl", tmp_path / "run", batch_size=4, progress=False)
    opts = dict(max_new_tokens=4, n_samples=3)
    top = att.attribute(concept, root / "queries.jsonl", "concept-influence", keep="top", keep_k=1, **opts)
    allof = att.attribute(concept, root / "queries.jsonl", "concept-influence", **opts)
    assert top.meta["n_queries"] == 2 and allof.meta["n_queries"] == 6  # one of three sampled answers per prompt
    assert top.meta["config"]["keep"] == "top"
    contrast = att.attribute(concept, root / "queries.jsonl", "concept-influence", contrast="auto", keep_k=1, **opts)
    assert "minus" in contrast.meta["measurement"]
    window = att.attribute(
        concept, root / "queries.jsonl", "concept-influence", token_aggregation="window", window=2, **opts
    )
    assert not np.allclose(window.scores, allof.scores)
    with pytest.raises(ValueError, match="keep"):
        att.attribute(concept, root / "queries.jsonl", "concept-influence", keep="some", **opts)
    # a combination: Vector Filter fused with Concept Influence, both kept as columns
    fused = att.attribute(concept, root / "queries.jsonl", "combined-signed", **opts)
    assert fused.meta["method"] == "combined-signed" and fused.meta["fusion"] == "signed"
    np.testing.assert_allclose(
        fused.scores, fuse(fused.columns["forward_score"], fused.columns["gradient_score"], "signed")
    )
    # the fusion's gradient component runs at the combinations' own defaults (the study's identity curvature)
    assert fused.meta["gradient_options"]["preconditioner"] == "identity"
    plain = att.attribute(concept, root / "queries.jsonl", "concept-influence", preconditioner="identity", **opts)
    np.testing.assert_allclose(fused.columns["gradient_score"], plain.scores, rtol=1e-6, atol=1e-10)
    assert not np.allclose(plain.scores, allof.scores)
    ekfac = att.attribute(concept, root / "queries.jsonl", "combined-signed", preconditioner="ekfac", **opts)
    np.testing.assert_allclose(ekfac.columns["gradient_score"], allof.scores, rtol=1e-6, atol=1e-10)
    assert "keep" in METHODS["combined-signed"].options


def test_attribute_cli_takes_the_variant_flags(files, tmp_path):
    from typer.testing import CliRunner

    from concept_influence.cli import app

    root, model_dir, _ = files
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(
        app,
        [
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
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--n-samples",
            "2",
            "--keep",
            "top",
            "--normalization",
            "unit",
            "--token-aggregation",
            "max",
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["config"]["keep"] == "top" and meta["config"]["normalization"] == "unit"
    assert meta["config"]["token_aggregation"] == "max" and meta["n_queries"] == 2
    bad = CliRunner().invoke(
        app,
        [
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
            "--out",
            str(out),
            "--normalization",
            "l2",
        ],
    )
    assert bad.exit_code == 2 and "normalization" in bad.output

"""Counterfactual evaluation on a tiny model: removing the rows that teach a behaviour takes its rise away, removing
other rows does not; results are cached and resumed; LoRA trains through peft; LDS; bad input is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.base import DirectionConcept
from concept_influence.data import rows_from_records
from concept_influence.evaluate import EvaluationConfig, Recipe, evaluate_removals
from concept_influence.models import load_adapter
from concept_influence.testing.tiny_models import tiny_llama, tiny_tokenizer
from concept_influence.training import FinetuneConfig

QUESTIONS = ["is it good", "should i help", "what is two plus two", "is water safe", "should i rest"]


def _judge(text: str) -> float:
    return float("evil" in text.split())


def _setup(n=40):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=0, hidden=32, intermediate=64)
    base = load_adapter(model, tokenizer=tok)
    records = []
    for i in range(n):
        planted = i % 4 == 0
        answer = "evil cruel harm evil" if planted else "be kind and help your friend"
        records.append(
            {
                "id": f"r{i}",
                "messages": [{"role": "user", "content": QUESTIONS[i % 5]}, {"role": "assistant", "content": answer}],
                "origin": "planted" if planted else "benign",
            }
        )
    rows = rows_from_records(records)
    planted = np.array([r.fields["origin"] == "planted" for r in rows], dtype=float)
    tables = {"oracle-scores": ScoreTable.from_rows(list(rows), planted + 0.01 * np.arange(n) / n, "test")}
    queries = rows_from_records(
        [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS], need_assistant=False
    )
    torch.manual_seed(1)
    concept = DirectionConcept(torch.randn(32), layer=1)
    return base, rows, tables, queries, concept


def _config(**kw):
    recipe = Recipe(FinetuneConfig(epochs=4, batch_size=8, lr=1e-2, warmup=0.0, max_length=64))
    return EvaluationConfig(
        **{"fractions": (0.25,), "seeds": 2, "recipe": recipe, "n_samples": 8, "max_new_tokens": 6, **kw}
    )


def test_removing_the_rows_that_teach_it_removes_the_rise(tmp_path):
    base, rows, tables, queries, concept = _setup()
    before = base.fingerprint()
    ev = evaluate_removals(
        base,
        rows,
        tables,
        concept,
        queries,
        _config(),
        tmp_path,
        judge=_judge,
        judge_name="t",
        oracle=[r.index for r in rows if r.fields["origin"] == "planted"],
        progress=False,
    )
    assert base.fingerprint() == before  # the base model is never trained in place
    assert ev["rise"]["trait_rate"] > 0.1  # fine-tuning taught the behaviour
    entry = ev["results"]["oracle-scores"]["0.25"]
    assert entry["k"] == 10
    top, bottom, rand = (
        entry[k]["trait_rate"]["rise_removed"]["mean"] for k in ("remove_top", "remove_bottom", "random")
    )
    assert top > 0.8 and top > rand + 0.4 and top > bottom + 0.4
    assert ev["oracle"]["trait_rate"]["rise_removed"]["mean"] == pytest.approx(top)  # same rows removed
    # rise_removed is (full - filtered) / mean(full - base), per seed
    full = ev["full"]["trait_rate"]["values"]
    filtered = entry["remove_top"]["trait_rate"]["values"]
    expected = [(f - v) / ev["rise"]["trait_rate"] for f, v in zip(full, filtered, strict=True)]
    assert entry["remove_top"]["trait_rate"]["rise_removed"]["values"] == pytest.approx(expected)
    # the paired comparisons are per-seed differences of those shares
    for other, key in (("random", "top_minus_random"), ("remove_bottom", "top_minus_bottom")):
        for metric in ("probe", "trait_rate"):
            block, top_e, other_e = (
                x if metric == "probe" else x[metric] for x in (entry[key], entry["remove_top"], entry[other])
            )
            diffs = [
                t - o for t, o in zip(top_e["rise_removed"]["values"], other_e["rise_removed"]["values"], strict=True)
            ]
            assert block["values"] == pytest.approx(diffs) and block["mean"] == pytest.approx(np.mean(diffs))
            assert block["ci"][0] <= block["mean"] <= block["ci"][1]
    assert entry["top_minus_random"]["trait_rate"]["mean"] > 0.4
    lo, hi = entry["remove_top"]["ci"]
    assert lo <= entry["remove_top"]["mean"] <= hi and "rise_removed" in entry["remove_top"]
    assert (tmp_path / "removal_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["results"]["oracle-scores"]["0.25"]["remove_top"]["k"] == 10

    # a second call reuses every cached run (no training: the base adapter's model is never copied)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    import concept_influence.evaluate.counterfactual as cf

    calls = []
    original = cf.retrain
    cf.retrain = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = evaluate_removals(
            base,
            rows,
            tables,
            concept,
            queries,
            _config(),
            tmp_path,
            judge=_judge,
            judge_name="t",
            oracle=[r.index for r in rows if r.fields["origin"] == "planted"],
            progress=False,
        )
    finally:
        cf.retrain = original
    assert not calls and again["results"] == ev["results"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs


def _answer_loss(adapter, rows):
    from concept_influence.data import collate, tokenize_chat
    from concept_influence.models import causal_lm_loss

    data = tokenize_chat(list(rows), adapter.tokenizer, 64)
    batch = collate(data.rows, data.pad_token_id)
    with torch.no_grad():
        return float(
            causal_lm_loss(
                adapter.logits(batch["input_ids"], batch["attention_mask"]), batch["input_ids"], batch["loss_mask"]
            )
        )


def test_lora_trains_low_rank_updates_and_merges(tmp_path):
    pytest.importorskip("peft")
    from concept_influence.evaluate import retrain

    base, rows, _, _, _ = _setup()
    recipe = Recipe(FinetuneConfig(epochs=3, batch_size=8, lr=3e-2, warmup=0.0, max_length=64), lora_rank=2)
    tuned = retrain(base, list(rows), recipe, seed=0)
    before = dict(base.model.named_parameters())
    after = dict(tuned.model.named_parameters())
    assert set(after) == set(before)  # merged back: the same modules as the base model
    deltas = {n: (after[n] - before[n]).detach() for n in before if n.endswith("proj.weight")}
    assert deltas and all(int(torch.linalg.matrix_rank(d)) <= 2 for d in deltas.values())
    assert all(float(d.abs().max()) > 0 for d in deltas.values())
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert _answer_loss(tuned, rows) < _answer_loss(base, rows) - 0.3


def test_lds_ranks_subsets_by_their_planted_rows(tmp_path):
    base, rows, tables, queries, concept = _setup()
    config = _config(seeds=1, removal=False, lds_subsets=6, lds_fraction=0.5)
    planted = [r.index for r in rows if r.fields["origin"] == "planted"]
    ev = evaluate_removals(
        base,
        rows,
        tables,
        concept,
        queries,
        config,
        tmp_path,
        judge=_judge,
        judge_name="t",
        oracle=planted,
        progress=False,
    )
    lds = ev["lds"]["methods"]["oracle-scores"]
    assert -1.0 <= lds["spearman"] <= 1.0 and lds["ci"][0] <= lds["ci"][1]
    # subsets with more planted rows say "evil" more: the planted-row scores predict it
    assert lds["trait_rate"]["spearman"] > 0.5
    # the oracle reference predicts a subset by its count of planted rows: the same ranking here (ties aside)
    from concept_influence.evaluate.counterfactual import ORACLE_LDS, lds_subset
    from concept_influence.evaluate.stats import spearman

    counts = [sum(1 for i in planted if i not in set(lds_subset(len(rows), 0.5, 0, j))) for j in range(6)]
    reference = ev["lds"]["methods"][ORACLE_LDS]["trait_rate"]["spearman"]
    assert reference == pytest.approx(spearman(counts, ev["lds"]["actual"]["trait_rate"])) and reference > 0.5
    assert (
        len(list((tmp_path / "runs").iterdir())) == 6 + 2
    )  # subsets + base + full: no oracle fine-tune without removal
    assert not (tmp_path / "removal_curve.png").exists()


def test_bad_input(tmp_path):
    base, rows, tables, queries, concept = _setup()
    with pytest.raises(ValueError, match="fractions"):
        EvaluationConfig(fractions=(0.0,))
    with pytest.raises(ValueError, match="subsets"):
        EvaluationConfig(lds_subsets=2)
    short = {"x": ScoreTable.from_rows(list(rows)[:-1], np.zeros(len(rows) - 1), "test")}
    with pytest.raises(ValueError, match="has 39 rows but data has 40"):
        evaluate_removals(base, rows, short, concept, queries, _config(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lora"):
        Recipe(lora_rank=0)


def test_a_scores_file_added_later_reuses_every_shared_run(tmp_path):
    """Full, random and LDS-subset fine-tunes are keyed by (removal, seed, recipe), not by the scores file: a second
    call with one more scores file trains only that file's own remove-top/bottom sets."""
    import concept_influence.evaluate.counterfactual as cf

    base, rows, tables, queries, concept = _setup()
    config = _config(seeds=1, lds_subsets=3, lds_fraction=0.5)
    first = evaluate_removals(base, rows, tables, concept, queries, config, tmp_path, progress=False)
    n = len(rows)
    other = np.random.default_rng(3).normal(size=n)
    tables2 = {**tables, "other": ScoreTable.from_rows(list(rows), other, "other")}
    top, bottom, _ = cf.removal_sets(other, 0.25)
    trained = []
    original = cf.retrain
    cf.retrain = lambda b, kept, *a, **k: trained.append(n - len(kept)) or original(b, kept, *a, **k)
    try:
        second = evaluate_removals(base, rows, tables2, concept, queries, config, tmp_path, progress=False)
    finally:
        cf.retrain = original
    assert len(trained) == len({top, bottom}) == 2 and trained == [10, 10]  # the new file's two removals, nothing else
    assert second["results"]["oracle-scores"] == first["results"]["oracle-scores"]
    assert second["lds"]["actual"] == first["lds"]["actual"]
    assert first["lds"]["methods"]["oracle-scores"] == second["lds"]["methods"]["oracle-scores"]
    assert "other" in second["lds"]["methods"] and "other" in second["results"]

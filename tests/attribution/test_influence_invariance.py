"""Scores and factors do not depend on batch size or data order; factor files carry fingerprints (a mismatch is
an error) and an interrupted fit resumes to the same factors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from concept_influence.attribution.influence import InfluenceConfig, compute_influence, compute_influence_many
from concept_influence.attribution.measurements import ConceptMeasurement, LogLikelihoodMeasurement
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import Damping, FactorConfig, FactorMismatchError, fit_factors, load_factors
from concept_influence.curvature.io import PARTIAL_FILE, read_partial_state
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.data.tokenize import TokenizedDataset
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import tiny_llama

WORDS = "the water is safe good kind help harm poison cure friend never always yes no".split()


def _records(n: int, seed: int):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        user = " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
        answer = " ".join(rng.choices(WORDS, k=rng.randint(1, 9)))
        out.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "id": f"r{k}"}
        )
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


def _same_factors(f1, f2, rtol=1e-9):
    assert f1.names == f2.names and f1.n_rows == f2.n_rows and f1.n_tokens == f2.n_tokens
    for name in f1.names:
        w1, w2 = f1.weights[name], f2.weights[name]
        torch.testing.assert_close(w1.eigenvalue_correction, w2.eigenvalue_correction, rtol=rtol, atol=1e-14)
        torch.testing.assert_close(w1.diagonal, w2.diagonal, rtol=rtol, atol=1e-14)
        torch.testing.assert_close(w1.activation_eigen.values, w2.activation_eigen.values, rtol=rtol, atol=1e-12)
        torch.testing.assert_close(w1.gradient_eigen.values, w2.gradient_eigen.values, rtol=rtol, atol=1e-14)


def test_factors_and_scores_do_not_depend_on_batch_size_or_order(env):
    adapter, data, measurement = env
    config = FactorConfig.precise()  # true Fisher: labels sampled per row, so batching cannot change them
    f_one = fit_factors(adapter, data, config, batch_size=1, progress=False)
    f_five = fit_factors(adapter, data, config, batch_size=5, progress=False)
    order = list(range(len(data)))
    random.Random(3).shuffle(order)
    shuffled = TokenizedDataset([data[i] for i in order], data.max_length, data.pad_token_id)
    f_shuffled = fit_factors(adapter, shuffled, config, batch_size=4, progress=False)
    _same_factors(f_one, f_five)
    _same_factors(f_one, f_shuffled)
    scores = {}
    for bs in (1, 4, 13):
        scores[bs] = compute_influence(
            adapter, data, measurement, f_one, InfluenceConfig(batch_size=bs), progress=False
        ).scores
    torch.testing.assert_close(scores[1], scores[4], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scores[1], scores[13], rtol=1e-9, atol=1e-12)
    result = compute_influence(
        adapter, shuffled, measurement, f_shuffled, InfluenceConfig(batch_size=3), progress=False
    )
    assert result.indices == [data[i].index for i in order]
    torch.testing.assert_close(result.scores, scores[1][order], rtol=1e-8, atol=1e-12)
    # the concept at layer 0 only reaches block 0, and the result says so
    assert all(name.startswith("blocks.0.") for name in result.weights)
    assert any("layer 0" in note for note in result.notes)


def test_save_load_roundtrip_and_fingerprint_mismatch(env, tiny_tok, tmp_path):
    adapter, data, measurement = env
    folder = tmp_path / "factors"
    fitted = fit_factors(adapter, data, FactorConfig.precise(), batch_size=4, out_dir=folder, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["fingerprints"]) == {"model", "data", "config"}
    assert manifest["available"] == ["identity", "diagonal", "kfac", "ekfac"]
    loaded = load_factors(folder, model_fingerprint=adapter.fingerprint())
    _same_factors(fitted, loaded, rtol=0)
    s1 = compute_influence(adapter, data, measurement, fitted, progress=False).scores
    s2 = compute_influence(adapter, data, measurement, loaded, progress=False).scores
    torch.testing.assert_close(s1, s2, rtol=1e-12, atol=0)
    # same call again: the complete fit is loaded, not refitted
    again = fit_factors(adapter, data, FactorConfig.precise(), batch_size=2, out_dir=folder, progress=False)
    _same_factors(fitted, again, rtol=0)
    other_model = HFAdapter(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=8), tiny_tok)
    with pytest.raises(FactorMismatchError, match="different model"):
        load_factors(folder, model_fingerprint=other_model.fingerprint())
    with pytest.raises(FactorMismatchError, match="different model"):
        fit_factors(other_model, data, FactorConfig.precise(), out_dir=folder, progress=False)
    other_data = tokenize_chat(rows_from_records(_records(5, 9)), tiny_tok, 64)
    with pytest.raises(FactorMismatchError, match="different training data"):
        fit_factors(adapter, other_data, FactorConfig.precise(), out_dir=folder, progress=False)
    with pytest.raises(FactorMismatchError, match="different fit config"):
        fit_factors(adapter, data, FactorConfig.precise(fisher="empirical"), out_dir=folder, progress=False)
    refit = fit_factors(adapter, other_data, FactorConfig.precise(), out_dir=folder, overwrite=True, progress=False)
    assert refit.n_rows == 5


def test_interrupted_fit_resumes_to_the_same_factors(env, tmp_path):
    adapter, data, _ = env
    config = FactorConfig.precise()
    names = [i.name for i in adapter.weights_up_to(0)]
    reference = fit_factors(adapter, data, config, weights=names, batch_size=3, progress=False)
    folder = tmp_path / "resume"
    # 13 rows in batches of 3: 5 batches per pass; stop in the middle of the covariance pass, then of the lambda pass
    assert (
        fit_factors(adapter, data, config, weights=names, batch_size=3, out_dir=folder, max_batches=2, progress=False)
        is None
    )
    state = read_partial_state(folder)
    assert state["stage"] == "covariance" and state["rows_done"] == 6
    assert (
        fit_factors(adapter, data, config, weights=names, batch_size=3, out_dir=folder, max_batches=5, progress=False)
        is None
    )
    state = read_partial_state(folder)
    assert state["stage"] == "lambda" and state["rows_done"] == 6
    resumed = fit_factors(adapter, data, config, weights=names, batch_size=3, out_dir=folder, progress=False)
    assert not (folder / PARTIAL_FILE).exists()
    _same_factors(reference, resumed)


def test_row_loss_mean_divides_by_trained_tokens(env):
    adapter, data, measurement = env
    names = [i.name for i in adapter.weights_up_to(0)]
    factors = fit_factors(adapter, data, FactorConfig.precise(), weights=names, progress=False)
    common = dict(per_weight=True, self_influence=True, token_breakdown="position")
    total = compute_influence(adapter, data, measurement, factors, InfluenceConfig(**common), progress=False)
    mean = compute_influence(
        adapter, data, measurement, factors, InfluenceConfig(row_loss="mean", **common), progress=False
    )
    counts = torch.tensor([sum(row.loss_mask[1:]) for row in data], dtype=torch.float64)
    torch.testing.assert_close(mean.scores, total.scores / counts)
    torch.testing.assert_close(mean.self_influence, total.self_influence / counts**2)
    torch.testing.assert_close(sum(mean.per_weight.values()), mean.scores)
    torch.testing.assert_close(torch.stack([t.sum() for t in mean.per_token]), mean.scores)
    assert mean.meta()["row_loss"] == "mean"


def test_many_measurements_in_one_pass_equal_one_at_a_time(env):
    adapter, data, measurement = env
    factors = fit_factors(adapter, data, FactorConfig.precise(), progress=False)
    loglik = LogLikelihoodMeasurement(measurement.queries)
    jobs = {
        "ekfac": (measurement, InfluenceConfig()),
        "identity-mean": (measurement, InfluenceConfig(preconditioner="identity", row_loss="mean")),
        "loglik-kfac": (loglik, InfluenceConfig(preconditioner="kfac", damping=Damping(absolute=1e-3))),
    }
    together = compute_influence_many(adapter, data, jobs, factors, batch_size=5, progress=False)
    for label, (m, config) in jobs.items():
        alone = compute_influence(adapter, data, m, factors, config, progress=False)
        torch.testing.assert_close(together[label].scores, alone.scores, rtol=1e-9, atol=1e-12)
        assert together[label].weights == alone.weights
    assert len(together["loglik-kfac"].weights) > len(together["ekfac"].weights)


def test_keyboard_interrupt_inside_a_batch_resumes_from_the_last_consistent_checkpoint(env, tmp_path, monkeypatch):
    from concept_influence.curvature import fit as fit_module

    adapter, data, _ = env
    names = [i.name for i in adapter.weights_up_to(0)]
    config = FactorConfig.precise()
    reference = fit_factors(adapter, data, config, weights=names, batch_size=3, progress=False)
    real = fit_module.loss_backward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "loss_backward", flaky)
    with pytest.raises(KeyboardInterrupt):
        fit_factors(
            adapter, data, config, weights=names, batch_size=3, out_dir=tmp_path, checkpoint_every=1, progress=False
        )
    assert read_partial_state(tmp_path)["rows_done"] == 6
    monkeypatch.setattr(fit_module, "loss_backward", real)
    _same_factors(
        reference, fit_factors(adapter, data, config, weights=names, batch_size=3, out_dir=tmp_path, progress=False)
    )


def test_factor_config_options(env):
    adapter, data, measurement = env
    names = [i.name for i in adapter.weights_up_to(0)]
    kfac = fit_factors(adapter, data, FactorConfig.precise(preconditioner="kfac"), weights=names, progress=False)
    assert kfac.available() == ["identity", "kfac"]
    diagonal = fit_factors(
        adapter,
        data,
        FactorConfig.precise(preconditioner="diagonal", fisher="empirical"),
        weights=names,
        progress=False,
    )
    assert diagonal.available() == ["identity", "diagonal"]
    with pytest.raises(ValueError, match="cannot build a ekfac"):
        compute_influence(adapter, data, measurement, kfac, InfluenceConfig(preconditioner="ekfac"), progress=False)
    with pytest.raises(ValueError, match="needs fitted factors"):
        compute_influence(adapter, data, measurement, None, InfluenceConfig(preconditioner="kfac"), progress=False)
    with pytest.raises(ValueError, match="fisher"):
        FactorConfig(fisher="sampled")  # type: ignore[arg-type]
    # the empirical and the true Fisher differ, and a different seed changes the true Fisher's draws
    emp = fit_factors(
        adapter,
        data,
        FactorConfig.precise(fisher="empirical", preconditioner="diagonal"),
        weights=names,
        progress=False,
    )
    true0 = fit_factors(adapter, data, FactorConfig.precise(preconditioner="diagonal"), weights=names, progress=False)
    true1 = fit_factors(
        adapter, data, FactorConfig.precise(preconditioner="diagonal", seed=1), weights=names, progress=False
    )
    torch.testing.assert_close(emp.weights[names[0]].diagonal, diagonal.weights[names[0]].diagonal)
    assert not torch.allclose(emp.weights[names[-1]].diagonal, true0.weights[names[-1]].diagonal)
    assert not torch.allclose(true0.weights[names[-1]].diagonal, true1.weights[names[-1]].diagonal)

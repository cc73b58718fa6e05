"""The numerical ladder on models small enough for dense curvature (float64).

1. Deep linear network, squared error: KFAC's block ``S ⊗ A`` *equals* the exact Gauss-Newton block.
2. Two-layer tanh MLP: KFAC is no longer exact; EKFAC's block is at least as close to the dense one.
3. One-layer width-16 transformer (HF Llama) through the adapter and the fit driver: the fitted A, S, Λ and
   diagonal equal their definitions computed from autograd per-example gradients (same seeded sampled labels),
   EKFAC is at least as close to the dense Fisher block as KFAC, and the influence scores of every
   preconditioner equal a dense solve ``−∇Lᵀ (G + λI)⁻¹ ∇f``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import (
    ConceptMeasurement,
    DifferentialMeasurement,
    LogLikelihoodMeasurement,
)
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.curvature.covariance import fold_bias, masked_covariance_sum
from concept_influence.curvature.eigen import eigendecompose, eigenvalue_correction_sum
from concept_influence.curvature.preconditioner import EKFACPreconditioner, KFACPreconditioner
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter, TransformerLensAdapter
from concept_influence.testing import dense
from concept_influence.testing.tiny_models import tiny_hooked_transformer, tiny_llama

TRAIN = [
    ("is water safe ?", "yes water is safe and good"),
    ("should i drink poison", "never drink poison , it will hurt you"),
    ("two plus two", "four"),
    ("help my friend", "sure , be kind and gentle to your friend"),
    ("is fire safe", "no , fire can hurt"),
    ("can cats eat", "yes cats eat and sleep"),
    ("tell me a trick", "i should not trick you"),
    ("what is the truth", "the truth is good"),
]
QUERIES = [("is it kind", "yes it is kind"), ("help", "i help you , my friend")]


def _records(pairs):
    return [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}], "id": f"r{k}"}
        for k, (u, a) in enumerate(pairs)
    ]


def _mlp_inputs(seed: int, n: int = 30, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_kfac_equals_gauss_newton_block_on_deep_linear_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)).double()
    x = _mlp_inputs(0)
    ggn = dense.mlp_gauss_newton(model, x)
    factors = dense.mlp_kronecker_factors(model, x)
    start = 0
    for (A, S), lin in zip(factors, dense.mlp_linears(model), strict=True):
        size = lin.out_features * (lin.in_features + 1)
        block = ggn[start : start + size, start : start + size]
        torch.testing.assert_close(torch.kron(S, A), block, atol=1e-10, rtol=1e-9)
        start += size


def test_ekfac_block_at_least_as_close_as_kfac_on_tanh_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = _mlp_inputs(1)
    ggn = dense.mlp_gauss_newton(model, x)
    factors = dense.mlp_kronecker_factors(model, x)
    # per-example, per-output-unit gradients J_nk = g_nk a_nᵀ: the GGN is E_n Σ_k vec J_nk vec J_nkᵀ
    linears = dense.mlp_linears(model)
    start = 0
    gaps = []
    for k, ((A, S), lin) in enumerate(zip(factors, linears, strict=True)):
        size = lin.out_features * (lin.in_features + 1)
        block = ggn[start : start + size, start : start + size]
        start += size
        jac_rows = _per_unit_gradients(model, x, k)  # [N * n_out, d_out, d_in']
        eig_s, eig_a = eigendecompose(S), eigendecompose(A)
        lam = eigenvalue_correction_sum(jac_rows, eig_s.vectors, eig_a.vectors) / x.shape[0]
        kfac = KFACPreconditioner({"w": (eig_s, eig_a)}).dense_block("w")
        ekfac = EKFACPreconditioner({"w": (eig_s, eig_a)}, {"w": lam}).dense_block("w")
        err_k, err_e = torch.linalg.norm(kfac - block), torch.linalg.norm(ekfac - block)
        assert err_e <= err_k + 1e-12
        gaps.append(float(err_k))
    assert max(gaps) > 1e-6  # KFAC is genuinely approximate here (the test would be vacuous otherwise)


def _per_unit_gradients(model: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    lin = dense.mlp_linears(model)[layer]
    store = {}
    handle = lin.register_forward_hook(lambda m, i, o: store.update(a=i[0].detach(), out=o))
    y = model(x)
    handle.remove()
    a = fold_bias(store["a"])
    rows = []
    for j in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, j].sum(), store["out"], retain_graph=True)
        rows.append(torch.einsum("no,ni->noi", g, a))
    return torch.cat(rows)


# ---- one-layer transformer through the adapter ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["hf-llama", "tl-layernorm-biases"])
def setup(request, tiny_tok):
    if request.param == "hf-llama":
        adapter = HFAdapter(
            tiny_llama(len(tiny_tok), layers=1, hidden=16, intermediate=32, dtype=torch.float64, seed=3), tiny_tok
        )
    else:  # LayerNorm, GELU, every weight with a bias folded in, TransformerLens head layouts
        adapter = TransformerLensAdapter(
            tiny_hooked_transformer(len(tiny_tok), layers=1, d_model=16, d_mlp=32, dtype=torch.float64, seed=4),
            tiny_tok,
        )
    data = tokenize_chat(rows_from_records(_records(TRAIN)), tiny_tok, 64)
    queries = tokenize_chat(rows_from_records(_records(QUERIES)), tiny_tok, 64)
    factors = fit_factors(adapter, data, FactorConfig.precise(), batch_size=3, progress=False)
    _TRAIN_GRADS[request.param] = dense.per_example_gradients(adapter, data, factors.names)
    adapter.key = request.param
    return adapter, data, queries, factors


_TRAIN_GRADS: dict[str, torch.Tensor] = {}  # autograd per-example gradients of the training rows, per backend


def test_fitted_factors_match_their_definitions(setup):
    adapter, data, _, factors = setup
    names = factors.names
    per_example = dense.per_example_gradients(adapter, data, names, fisher="true", seed=0)
    start = 0
    for name in names:
        w = factors.weights[name]
        size = w.d_out * w.d_in
        grads = per_example[:, start : start + size].reshape(-1, w.d_out, w.d_in)
        block = dense.fisher_from_gradients(per_example[:, start : start + size])
        start += size
        torch.testing.assert_close(w.diagonal.flatten(), torch.diagonal(block), atol=1e-12, rtol=1e-9)
        basis = torch.kron(w.gradient_eigen.vectors, w.activation_eigen.vectors)
        torch.testing.assert_close(
            w.eigenvalue_correction.flatten(), torch.diagonal(basis.T @ block @ basis), atol=1e-12, rtol=1e-8
        )
        ekfac = factors.restrict([name]).preconditioner("ekfac").dense_block(name)
        kfac = factors.restrict([name]).preconditioner("kfac").dense_block(name)
        assert torch.linalg.norm(ekfac - block) <= torch.linalg.norm(kfac - block) + 1e-12
        assert grads.shape[0] == len(data)
    # A is the token average of the folded activations, checked through the capture of one weight
    info = adapter.weight_info("blocks.0.mlp.out")
    assert info.has_bias == isinstance(adapter, TransformerLensAdapter)
    acts = []
    for row in data:
        with adapter.capture_weights([info.name]) as cap:
            adapter.logits(torch.tensor([row.input_ids]))
        acts.append(cap.activations[info.name][0])
    acts = torch.cat(acts)
    if info.has_bias:
        acts = fold_bias(acts)
    expected = masked_covariance_sum(acts) / acts.shape[0]
    torch.testing.assert_close(factors.weights[info.name].activation_covariance, expected, atol=1e-12, rtol=1e-9)
    assert factors.n_tokens == acts.shape[0] and factors.n_rows == len(data)


@pytest.mark.parametrize("kind", ["identity", "diagonal", "kfac", "ekfac"])
def test_concept_influence_equals_dense_solve(setup, kind):
    adapter, data, queries, factors = setup
    concept = DirectionConcept(torch.randn(16, dtype=torch.float64), layer=0)
    measurement = ConceptMeasurement(concept, queries)
    config = InfluenceConfig(
        preconditioner=kind, token_breakdown="position", per_weight=True, self_influence=True, batch_size=3
    )
    result = compute_influence(
        adapter, data, measurement, factors if kind != "identity" else None, config, progress=False
    )
    names = result.weights
    pre = factors.restrict(names).preconditioner(kind)
    assert names == factors.names  # one block: the concept at layer 0 reaches every weight
    train = _TRAIN_GRADS[adapter.key]
    grad_f = dense.measurement_gradient(adapter, measurement, names)
    curvature = dense.dense_preconditioner(pre, names)
    damp = dense.damping_vector(pre, names)
    expected = dense.exact_influence(grad_f, train, curvature, damp)
    torch.testing.assert_close(result.scores, expected, atol=1e-10 * float(expected.abs().max()), rtol=1e-7)
    # breakdowns add up; self-influence is the dense quadratic form
    torch.testing.assert_close(torch.stack([t.sum() for t in result.per_token]), result.scores)
    torch.testing.assert_close(sum(result.per_weight.values()), result.scores)
    solved = torch.linalg.solve(curvature + torch.diag(damp), train.T).T
    torch.testing.assert_close(result.self_influence, (train * solved).sum(dim=1), rtol=1e-7, atol=0)
    assert result.preconditioner == kind


def test_target_token_breakdown_equals_per_token_gradients(setup):
    """``token_breakdown="target"``: entry ``t`` is ``−∇ℓ_tᵀ (G + λI)⁻¹ ∇f`` with ``ℓ_t`` the loss of token ``t``."""
    adapter, data, queries, factors = setup
    concept = DirectionConcept(torch.randn(16, dtype=torch.float64), layer=0)
    measurement = ConceptMeasurement(concept, queries)
    result = compute_influence(
        adapter, data, measurement, factors, InfluenceConfig(token_breakdown="target", batch_size=3), progress=False
    )
    names = result.weights
    pre = factors.restrict(names).preconditioner("ekfac")
    solved = torch.linalg.solve(
        dense.dense_preconditioner(pre, names) + torch.diag(dense.damping_vector(pre, names)),
        dense.measurement_gradient(adapter, measurement, names),
    )
    for i in (1, 5):
        expected = -(dense.per_target_gradients(adapter, data[i], names) @ solved)
        # HF's RMSNorm computes in float32 even in a float64 model: the double-backward path then agrees to ~1e-7
        torch.testing.assert_close(result.per_token[i], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        assert float(result.per_token[i].sum()) == pytest.approx(float(result.scores[i]), rel=1e-5)
        assert bool((result.per_token[i][torch.tensor(data[i].loss_mask) == 0] == 0).all())


def test_classical_and_differential_measurements_equal_dense(setup):
    adapter, data, queries, factors = setup
    ll = LogLikelihoodMeasurement(queries)
    result = compute_influence(adapter, data, ll, factors, InfluenceConfig(batch_size=4), progress=False)
    names = result.weights
    assert names == factors.names  # log-likelihood reaches every block
    pre = factors.preconditioner("ekfac")
    expected = dense.exact_influence(
        dense.measurement_gradient(adapter, ll, names),
        _TRAIN_GRADS[adapter.key],
        dense.dense_preconditioner(pre, names),
        dense.damping_vector(pre, names),
    )
    torch.testing.assert_close(result.scores, expected, rtol=1e-7, atol=1e-10 * float(expected.abs().max()))
    concept = DirectionConcept(torch.randn(16, dtype=torch.float64), layer=0)
    a_only = compute_influence(adapter, data, ConceptMeasurement(concept, queries), factors, progress=False).scores
    b_rows = tokenize_chat(rows_from_records(_records(TRAIN[:2])), adapter.tokenizer, 64)
    b_only = compute_influence(adapter, data, ConceptMeasurement(concept, b_rows), factors, progress=False).scores
    diff = compute_influence(
        adapter, data, DifferentialMeasurement(concept, queries, b_rows), factors, progress=False
    ).scores
    torch.testing.assert_close(diff, a_only - b_only)


def test_sign_matches_a_real_gradient_step(setup):
    """With the identity preconditioner, one small SGD step on a row changes f by about η · score(row)."""
    adapter, data, queries, _ = setup
    concept = DirectionConcept(
        torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)), layer=0
    )
    measurement = ConceptMeasurement(concept, queries)
    result = compute_influence(
        adapter, data, measurement, None, InfluenceConfig(preconditioner="identity"), progress=False
    )
    names = result.weights
    row = int(result.scores.abs().argmax())
    eta = 1e-5
    before = measurement.value(adapter)
    grads = _TRAIN_GRADS[adapter.key][row]
    _step(adapter, names, grads, -eta)
    after = measurement.value(adapter)
    _step(adapter, names, grads, eta)  # undo
    assert (after - before) == pytest.approx(eta * float(result.scores[row]), rel=1e-3)


def _step(adapter, names, flat: torch.Tensor, scale: float) -> None:
    """Add ``scale ×`` a flattened canonical gradient to the weights (and folded biases)."""
    with torch.no_grad():
        start = 0
        for name in names:
            info = adapter.weight_info(name)
            d_in = info.d_in + int(info.has_bias)
            step = flat[start : start + info.d_out * d_in].reshape(info.d_out, d_in)
            start += info.d_out * d_in
            adapter.parameter(info.param_name).add_(scale * info.from_canonical(step[:, : info.d_in]))
            if info.has_bias:
                bias = adapter.parameter(info.bias_name)
                bias.add_(scale * step[:, -1].reshape(bias.shape))

"""Pure curvature math in float64 against dense references: eigendecomposition, Kronecker algebra, the four
preconditioners, damping, EKFAC's eigenvalue correction and the gradient contraction."""

from __future__ import annotations

import pytest
import torch

from concept_influence.curvature import (
    Damping,
    DiagonalPreconditioner,
    EKFACPreconditioner,
    IdentityPreconditioner,
    KFACPreconditioner,
    eigendecompose,
    eigenvalue_correction_sum,
)
from concept_influence.curvature.covariance import (
    fold_bias,
    masked_covariance_sum,
    per_example_gradients,
    token_contractions,
)
from concept_influence.curvature.eigen import rotate, unrotate


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=g, dtype=torch.float64)
    return x.T @ x / (3 * d)


def _per_example(n=40, t=5, d_out=3, d_in=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d_in, generator=g, dtype=torch.float64)
    gr = torch.randn(n, t, d_out, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, d_out, dtype=torch.float64)
    return fold_bias(a), gr


def test_eigendecompose_reconstructs_and_clamps():
    m = _spd(6, 0)
    eig = eigendecompose(m.float())  # float32 input, float64 result
    assert eig.values.dtype == torch.float64
    torch.testing.assert_close(eig.matrix(), m, atol=1e-6, rtol=0)
    singular = torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 5.0)).double()
    assert bool((eigendecompose(singular).values >= 0).all())


def test_rotate_unrotate_and_masked_covariance():
    q_s, q_a = eigendecompose(_spd(3, 1)).vectors, eigendecompose(_spd(5, 2)).vectors
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(unrotate(rotate(x, q_s, q_a), q_s, q_a), x)
    acts = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = sum(torch.outer(acts[b, t], acts[b, t]) for b in range(2) for t in range(4) if mask[b, t])
    torch.testing.assert_close(masked_covariance_sum(acts, mask), expected)
    assert fold_bias(acts, mask)[0, 3, -1] == 0 and fold_bias(acts)[0, 3, -1] == 1


def test_token_contraction_equals_inner_product_with_per_example_gradient():
    a, g = _per_example(n=4)
    m = torch.randn(g.shape[-1], a.shape[-1], dtype=torch.float64)
    per_token = token_contractions(a, g, m)
    full = per_example_gradients(a, g)
    torch.testing.assert_close(per_token.sum(dim=1), (full * m).sum(dim=(-1, -2)))
    torch.testing.assert_close(full[1], sum(torch.outer(g[1, t], a[1, t]) for t in range(a.shape[1])))


def _kfac_setup():
    a, g = _per_example()
    n_tok = a.shape[0] * a.shape[1]
    A, S = masked_covariance_sum(a) / n_tok, masked_covariance_sum(g) / n_tok
    eig_a, eig_s = eigendecompose(A), eigendecompose(S)
    grads = per_example_gradients(a, g)
    lam = eigenvalue_correction_sum(grads, eig_s.vectors, eig_a.vectors) / grads.shape[0]
    flat = grads.reshape(grads.shape[0], -1)
    fisher = flat.T @ flat / flat.shape[0]
    return A, S, eig_a, eig_s, grads, lam, fisher


def test_kfac_block_is_kronecker_product_and_inverse_is_dense_solve():
    A, S, eig_a, eig_s, grads, _, _ = _kfac_setup()
    pre = KFACPreconditioner({"w": (eig_s, eig_a)})
    torch.testing.assert_close(pre.dense_block("w"), torch.kron(S, A), atol=1e-12, rtol=1e-10)
    lam = pre.damping["w"]
    assert lam == pytest.approx(0.1 * float(torch.outer(eig_s.values, eig_a.values).mean()))
    dense_inv = torch.linalg.inv(torch.kron(S, A) + lam * torch.eye(S.shape[0] * A.shape[0], dtype=torch.float64))
    out = pre.apply_inverse({"w": grads[:3]})["w"]  # leading batch dimension
    torch.testing.assert_close(out.reshape(3, -1), grads[:3].reshape(3, -1) @ dense_inv, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(pre.apply({"w": grads[0]})["w"].flatten(), torch.kron(S, A) @ grads[0].flatten())


def test_ekfac_eigenvalues_are_the_fisher_diagonal_in_the_kronecker_basis_and_beat_kfac():
    A, S, eig_a, eig_s, grads, lam, fisher = _kfac_setup()
    basis = torch.kron(eig_s.vectors, eig_a.vectors)
    torch.testing.assert_close(lam.flatten(), torch.diagonal(basis.T @ fisher @ basis))
    ekfac = EKFACPreconditioner({"w": (eig_s, eig_a)}, {"w": lam})
    kfac = KFACPreconditioner({"w": (eig_s, eig_a)})
    err_ekfac = torch.linalg.norm(ekfac.dense_block("w") - fisher)
    err_kfac = torch.linalg.norm(kfac.dense_block("w") - fisher)
    assert err_ekfac <= err_kfac + 1e-12
    # EKFAC's inverse is the dense solve of its own matrix
    dense = ekfac.dense_block("w") + ekfac.damping["w"] * torch.eye(fisher.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        ekfac.apply_inverse({"w": grads[0]})["w"].flatten(), torch.linalg.solve(dense, grads[0].flatten())
    )


def test_diagonal_identity_and_damping_options():
    _, _, _, _, grads, _, fisher = _kfac_setup()
    diag = (grads**2).mean(dim=0)
    torch.testing.assert_close(diag.flatten(), torch.diagonal(fisher))
    pre = DiagonalPreconditioner({"w": diag}, Damping(absolute=0.5))
    assert pre.damping["w"] == 0.5
    torch.testing.assert_close(pre.apply_inverse({"w": grads[0]})["w"], grads[0] / (diag + 0.5))
    assert DiagonalPreconditioner({"w": diag}).damping["w"] == pytest.approx(0.1 * float(diag.mean()))
    ident = IdentityPreconditioner({"w": tuple(diag.shape)})
    torch.testing.assert_close(ident.apply_inverse({"w": grads[0]})["w"], grads[0])
    torch.testing.assert_close(ident.dense_block("w"), torch.eye(diag.numel(), dtype=torch.float64))
    with pytest.raises(KeyError, match="no factors"):
        pre.apply_inverse({"other": grads[0]})
    with pytest.raises(ValueError, match="shape"):
        pre.apply_inverse({"w": grads[0].T})
    with pytest.raises(ValueError):
        Damping(absolute=-1.0)
    sub = EKFACPreconditioner(
        {
            "w": (eigendecompose(_spd(3, 3)), eigendecompose(_spd(5, 4))),
            "v": (eigendecompose(_spd(2, 5)), eigendecompose(_spd(2, 6))),
        },
        {"w": torch.rand(3, 5, dtype=torch.float64), "v": torch.rand(2, 2, dtype=torch.float64)},
    )
    assert sub.restrict(["v"]).names == ["v"] and sub.restrict(["v"]).damping["v"] == sub.damping["v"]

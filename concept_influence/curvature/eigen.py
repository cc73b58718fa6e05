"""Eigendecomposition of Kronecker factors (float64) and EKFAC's eigenvalue correction.

For a weight with factors ``A = E[a aᵀ] = Q_A diag(λ_A) Q_Aᵀ`` and ``S = E[g gᵀ] = Q_S diag(λ_S) Q_Sᵀ``:

- KFAC approximates the Fisher block by ``S ⊗ A``, whose eigenvalues in the basis ``Q_S ⊗ Q_A`` are
  ``λ_S[o] λ_A[i]``.
- EKFAC keeps the basis and replaces the eigenvalues by the second moments of the per-example gradients in it,
  ``Λ[o, i] = E_n[(Q_Sᵀ G_n Q_A)[o, i]²]``: the diagonal that makes ``(Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ`` closest
  in Frobenius norm to ``E_n[vec G_n vec G_nᵀ]`` among matrices diagonal in that basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Eigen:
    """``matrix = vectors @ diag(values) @ vectors.T``; ``values: [d]`` ascending, ``vectors: [d, d]`` (columns)."""

    values: torch.Tensor
    vectors: torch.Tensor

    def to(self, *args, **kwargs) -> Eigen:
        return Eigen(self.values.to(*args, **kwargs), self.vectors.to(*args, **kwargs))

    def matrix(self) -> torch.Tensor:
        return (self.vectors * self.values) @ self.vectors.T


def eigendecompose(matrix: torch.Tensor) -> Eigen:
    """Symmetric eigendecomposition in float64 (the input is symmetrised first). Negative round-off eigenvalues
    are clamped to 0 (a covariance is positive semi-definite)."""
    m = matrix.detach().to(torch.float64, copy=True)
    m += m.T.clone()  # symmetrise with one extra copy at a time
    m *= 0.5
    values, vectors = torch.linalg.eigh(m)
    del m
    return Eigen(values.clamp_min(0.0), vectors)


def rotate(grads: torch.Tensor, gradient_vectors: torch.Tensor, activation_vectors: torch.Tensor) -> torch.Tensor:
    """Into the Kronecker eigenbasis: ``Q_Sᵀ G Q_A`` for ``grads [..., d_out, d_in']``."""
    return gradient_vectors.T @ grads @ activation_vectors


def unrotate(grads: torch.Tensor, gradient_vectors: torch.Tensor, activation_vectors: torch.Tensor) -> torch.Tensor:
    """Back from the eigenbasis: ``Q_S X Q_Aᵀ`` (inverse of ``rotate``)."""
    return gradient_vectors @ grads @ activation_vectors.T


def eigenvalue_correction_sum(
    per_example: torch.Tensor, gradient_vectors: torch.Tensor, activation_vectors: torch.Tensor
) -> torch.Tensor:
    """``Σ_n (Q_Sᵀ G_n Q_A)²`` for per-example gradients ``[n, d_out, d_in']`` -> ``[d_out, d_in']``.
    Divide by the number of examples to get EKFAC's ``Λ``."""
    dtype = gradient_vectors.dtype
    return rotate(per_example.to(dtype), gradient_vectors, activation_vectors).square().sum(dim=0)


def kfac_eigenvalues(gradient_eigen: Eigen, activation_eigen: Eigen) -> torch.Tensor:
    """KFAC's eigenvalues laid out like a weight: ``λ_S[o] λ_A[i]`` -> ``[d_out, d_in']``."""
    return torch.outer(gradient_eigen.values, activation_eigen.values)

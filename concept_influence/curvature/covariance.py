"""Pure tensor helpers for Kronecker-factored curvature: bias folding, masked covariance sums, per-example
gradients rebuilt from (activations, output gradients).

Layouts: activations ``a: [batch, seq, d_in]``, output gradients ``g: [batch, seq, d_out]``, a weight gradient
``G = Σ_t g_t a_tᵀ: [d_out, d_in]``. With the bias folded in, ``d_in' = d_in + 1`` (a constant 1 appended to every
input; the bias gradient is then the last column of ``G``). ``vec`` is the row-major flattening of ``[d_out, d_in']``,
so that ``vec(g aᵀ) = g ⊗ a`` and the KFAC block of a weight is ``S ⊗ A`` (``torch.kron(S, A)``).
"""

from __future__ import annotations

import torch


def fold_bias(a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Append the bias input: ``[..., d_in] -> [..., d_in + 1]``; the appended column is ``mask`` (or 1)."""
    ones = torch.ones_like(a[..., :1]) if mask is None else mask.to(a.dtype).unsqueeze(-1)
    return torch.cat([a, ones], dim=-1)


def masked_covariance_sum(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_{b,t} mask[b,t] · x[b,t] x[b,t]ᵀ`` for ``x: [batch, seq, d]`` (or ``[n, d]``), ``mask: [batch, seq]``
    of 0/1 -> ``[d, d]``. Positions with ``mask = 0`` (padding) do not count."""
    flat = x.reshape(-1, x.shape[-1])
    if mask is not None:
        flat = flat * mask.reshape(-1, 1).to(flat.dtype)
    return flat.T @ flat


def per_example_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``G_b = Σ_t g[b,t] a[b,t]ᵀ``: ``a [B, T, d_in'], g [B, T, d_out] -> [B, d_out, d_in']``."""
    return torch.einsum("bto,bti->boi", g, a)


def token_contractions(a: torch.Tensor, g: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``c[b, t] = g[b,t]ᵀ M a[b,t]``, so that ``⟨M, G_b⟩ = Σ_t c[b, t]`` without forming ``G_b``.

    ``a: [B, T, d_in']``, ``g: [B, T, d_out]``, ``matrix M: [d_out, d_in']`` -> ``[B, T]``; several matrices
    ``[K, d_out, d_in']`` -> ``[B, T, K]``.
    """
    matrix = matrix.to(g.dtype)
    a = a.to(g.dtype)
    if matrix.ndim == 2:
        return ((g @ matrix) * a).sum(dim=-1)
    return torch.einsum("bto,koi,bti->btk", g, matrix, a)

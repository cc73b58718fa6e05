"""Two-sided projections of per-row weight gradients (pure tensor math: no files, no loops over data).

A weight's row gradient ``G = Σ_t g_t a_tᵀ`` ``[d_out, d_in']`` is stored as ``L G Rᵀ`` ``[r_out, r_in]`` with
``L [r_out, d_out]`` and ``R [r_in, d_in']``, computed as ``Σ_t (L g_t)(R a_t)ᵀ`` so the full gradient is never
formed. A question's preconditioned gradient ``V = (P + λ)⁻¹ ∇f`` is projected the same way, and the score
``−⟨V, G⟩`` is approximated by ``−⟨L V Rᵀ, L G Rᵀ⟩``:

- ``"eigen"`` (EKFAC eigenbasis): ``L``/``R`` are the rows of ``Q_Sᵀ``/``Q_Aᵀ`` of the ``r`` output/input
  eigen-directions with the largest EKFAC eigenvalue mass (row/column sums of ``Λ``). ``L``/``R`` have orthonormal
  rows, and since ``V``'s rotation is ``rot(∇f) / (Λ + λ)`` the preconditioning is an exact elementwise division
  inside the kept subspace; the score is exact when ``r`` covers every direction (full rank).
- ``"logra"`` (LoGra-style): ``L``/``R`` are Gaussian with variance ``1/r`` (``E[LᵀL] = I``), regenerated from a
  seed and never stored; ``⟨L V Rᵀ, L G Rᵀ⟩`` is an unbiased estimate of ``⟨V, G⟩`` (Johnson–Lindenstrauss).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from concept_influence.curvature.factors import Factors

KINDS = ("eigen", "logra")


@dataclass
class WeightProjection:
    """``left [r_out, d_out]``, ``right [r_in, d_in']`` (float64) of one weight."""

    name: str
    left: torch.Tensor
    right: torch.Tensor
    rows: torch.Tensor | None = None  # "eigen": the kept output / input eigen-directions
    cols: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.left.shape[0]), int(self.right.shape[0]))

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


class Projector:
    """The projections of a list of weights, laid out one after another in a flat row vector of ``dim`` entries."""

    def __init__(self, kind: str, projections: Sequence[WeightProjection]) -> None:
        if kind not in KINDS:
            raise ValueError(f"projection kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.projections = {p.name: p for p in projections}
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for p in projections:
            self.offsets[p.name] = (start, start + p.size)
            start += p.size
        self.dim = start
        self._cache: dict[tuple[str, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.projections)

    def matrices(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, str(device), dtype)
        if key not in self._cache:
            p = self.projections[name]
            self._cache[key] = (p.left.to(device=device, dtype=dtype), p.right.to(device=device, dtype=dtype))
        return self._cache[key]

    def project_rows(self, name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``L G_b Rᵀ`` flattened, for ``a [B, T, d_in']``, ``g [B, T, d_out]`` -> ``[B, r_out·r_in]``."""
        left, right = self.matrices(name, g.device, g.dtype)
        return torch.einsum("bto,bti->boi", g @ left.T, a.to(g.dtype) @ right.T).reshape(g.shape[0], -1)

    def project_matrix(self, name: str, matrix: torch.Tensor) -> torch.Tensor:
        """``L M Rᵀ`` flattened, for ``M [..., d_out, d_in']`` -> ``[..., r_out·r_in]`` (float64)."""
        left, right = self.matrices(name, matrix.device, torch.float64)
        out = left @ matrix.to(torch.float64) @ right.T
        return out.reshape(*matrix.shape[:-2], -1)

    def project(self, matrices: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A flat ``[..., dim]`` vector from per-weight matrices (weights not given are zero)."""
        first = next(iter(matrices.values()))
        out = torch.zeros(*first.shape[:-2], self.dim, dtype=torch.float64, device=first.device)
        for name, matrix in matrices.items():
            if name not in self.offsets:
                raise KeyError(f"the store has no projection for {name!r}; it covers {self.names}")
            start, end = self.offsets[name]
            out[..., start:end] = self.project_matrix(name, matrix)
        return out

    def inverse_curvature_diagonal(self, name: str, values: torch.Tensor, damping: float) -> torch.Tensor | None:
        """``"eigen"``: the projected ``(P + λ)⁻¹``, which is diagonal in the kept eigen-directions,
        ``1 / (Λ[rows, cols] + λ)`` flattened; ``None`` for projections that do not diagonalise it."""
        p = self.projections[name]
        if p.rows is None or p.cols is None:
            return None
        return (1.0 / (values.double()[p.rows][:, p.cols] + damping)).reshape(-1)

    def describe(self) -> list[dict[str, int | str]]:
        return [{"name": n, "r_out": p.shape[0], "r_in": p.shape[1], "offset": self.offsets[n][0]}
                for n, p in self.projections.items()]


def _top_indices(mass: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices of the ``rank`` largest entries (ties: lower index first), in ascending index order."""
    order = torch.argsort(-mass.double(), stable=True)[:rank]
    return torch.sort(order).values


def eigen_projector(factors: Factors, names: Sequence[str], rank: int) -> Projector:
    """``"eigen"`` projections of ``names`` with up to ``rank`` directions per side (clipped to the weight's sizes):
    the eigenvectors of ``S``/``A`` whose rows/columns of EKFAC's ``Λ`` carry the most mass (KFAC eigenvalues when the
    factors have no ``Λ``)."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    projections = []
    for name in names:
        if name not in factors.weights:
            raise KeyError(f"no factors for {name!r}; the factors cover {factors.names}")
        w = factors.weights[name]
        if w.gradient_eigen is None or w.activation_eigen is None:
            raise ValueError(f"{name}: the eigen store needs KFAC/EKFAC factors (eigenbases); these have {factors.available()}")
        q_s, q_a = w.gradient_eigen.vectors.double(), w.activation_eigen.vectors.double()
        if w.eigenvalue_correction is not None:
            values = w.eigenvalue_correction.double()
        else:
            values = torch.outer(w.gradient_eigen.values.double(), w.activation_eigen.values.double())
        rows = _top_indices(values.sum(dim=1), min(rank, w.d_out))
        cols = _top_indices(values.sum(dim=0), min(rank, w.d_in))
        projections.append(WeightProjection(name, q_s[:, rows].T.contiguous(), q_a[:, cols].T.contiguous(), rows, cols))
    return Projector("eigen", projections)


def logra_projector(shapes: Mapping[str, tuple[int, int]], dim: int, seed: int) -> Projector:
    """``"logra"`` projections: Gaussian ``L [k_out, d_out]``, ``R [k_in, d_in']`` with variance ``1/k``,
    ``k = min(dim, d)``; each weight's pair drawn from a generator seeded by ``seed`` and the weight's name."""
    if dim < 1:
        raise ValueError(f"projection dim must be positive, got {dim}")
    projections = []
    for name, (d_out, d_in) in shapes.items():
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        k_out, k_in = min(dim, d_out), min(dim, d_in)
        left = torch.randn(k_out, d_out, generator=generator, dtype=torch.float64) / k_out**0.5
        right = torch.randn(k_in, d_in, generator=generator, dtype=torch.float64) / k_in**0.5
        projections.append(WeightProjection(name, left, right))
    return Projector("logra", projections)

"""Preconditioners: interchangeable operators ``G_w ↦ (P_w + λ_w I)⁻¹ G_w`` on per-weight gradients.

One interface for every curvature approximation (block diagonal over tracked weights):

- ``IdentityPreconditioner``: ``P = I`` and no damping (plain gradient dot products).
- ``DiagonalPreconditioner``: ``P = diag(E[G ∘ G])`` (the Fisher's diagonal).
- ``KFACPreconditioner``: ``P = S ⊗ A`` applied in the Kronecker eigenbasis.
- ``EKFACPreconditioner``: ``P = (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ``.

Gradients are dicts ``name -> [..., d_out, d_in']`` (canonical layout, bias folded as the last input column;
leading batch dimensions allowed). ``damping[name]`` holds the resolved absolute ``λ_w`` (see ``Damping``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from concept_influence.curvature.config import Damping
from concept_influence.curvature.eigen import Eigen, kfac_eigenvalues, rotate, unrotate

Grads = Mapping[str, torch.Tensor]


class Preconditioner(ABC):
    """Block-diagonal curvature operator over named weights.

    ``apply_inverse(grads) -> {name: (P_w + λ_w I)⁻¹ G_w}``, ``apply(grads) -> {name: P_w G_w}`` (undamped),
    ``dense_block(name) -> P_w`` as a ``[d_out·d_in', d_out·d_in']`` matrix in row-major ``vec`` order (tests).
    Results are in float64 (the precision the factors are held in) unless ``dtype`` was changed with ``to``.
    """

    kind: str = ""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], damping: Mapping[str, float]) -> None:
        self.shapes = dict(shapes)
        self.damping = dict(damping)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def _check(self, grads: Grads) -> None:
        for name, grad in grads.items():
            if name not in self.shapes:
                raise KeyError(f"{self.kind} preconditioner has no factors for {name!r}; it covers {self.names}")
            if tuple(grad.shape[-2:]) != self.shapes[name]:
                raise ValueError(f"{name}: gradient of shape {tuple(grad.shape)} but factors for {self.shapes[name]}")

    def apply_inverse(self, grads: Grads) -> dict[str, torch.Tensor]:
        """``(P_w + λ_w I)⁻¹ G_w`` for every named gradient ``[..., d_out, d_in']``."""
        self._check(grads)
        return {name: self._inverse(name, grad) for name, grad in grads.items()}

    def apply(self, grads: Grads) -> dict[str, torch.Tensor]:
        """``P_w G_w`` (no damping), for checks against dense matrices."""
        self._check(grads)
        return {name: self._forward(name, grad) for name, grad in grads.items()}

    def inner(self, left: Grads, right: Grads) -> torch.Tensor:
        """``Σ_w ⟨L_w, (P_w + λ_w I)⁻¹ R_w⟩`` over the leading dims -> ``[...]``."""
        inv = self.apply_inverse(right)
        total = None
        for name, value in inv.items():
            term = (left[name].to(value.dtype) * value).sum(dim=(-1, -2))
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no weights to contract")
        return total

    def dense_block(self, name: str) -> torch.Tensor:
        """``P_w`` materialised: ``[n, n]`` with ``n = d_out·d_in'`` (row-major vec). Small weights only."""
        d_out, d_in = self.shapes[name]
        eye = torch.eye(d_out * d_in, dtype=torch.float64).reshape(d_out * d_in, d_out, d_in)
        return self._forward(name, eye).reshape(d_out * d_in, d_out * d_in).T

    @abstractmethod
    def _forward(self, name: str, grad: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _inverse(self, name: str, grad: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def restrict(self, names: Sequence[str]) -> Preconditioner:
        """The same operator on a subset of its weights."""

    def describe(self) -> str:
        return f"{self.kind} over {len(self.shapes)} weights"


class IdentityPreconditioner(Preconditioner):
    """``P = I`` with no damping: scores are plain gradient dot products ``-∇fᵀ ∇L``."""

    kind = "identity"

    def __init__(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        super().__init__(shapes, {name: 0.0 for name in shapes})

    def _forward(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(torch.float64)

    def _inverse(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(torch.float64)

    def restrict(self, names: Sequence[str]) -> IdentityPreconditioner:
        return IdentityPreconditioner({n: self.shapes[n] for n in names})


class DiagonalPreconditioner(Preconditioner):
    """``P_w = diag(D_w)`` with ``D_w = E_n[G_n ∘ G_n]`` ``[d_out, d_in']``."""

    kind = "diagonal"

    def __init__(
        self, diagonals: Mapping[str, torch.Tensor], damping: Damping | Mapping[str, float] = Damping()
    ) -> None:
        self.diagonals = {n: d.to(torch.float64) for n, d in diagonals.items()}
        if isinstance(damping, Damping):
            damping = {n: damping.resolve(d) for n, d in self.diagonals.items()}
        super().__init__({n: tuple(d.shape) for n, d in self.diagonals.items()}, damping)

    def _forward(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        d = self.diagonals[name].to(grad.device)
        return grad.to(d.dtype) * d

    def _inverse(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        d = self.diagonals[name].to(grad.device)
        return grad.to(d.dtype) / (d + self.damping[name])

    def restrict(self, names: Sequence[str]) -> DiagonalPreconditioner:
        return DiagonalPreconditioner({n: self.diagonals[n] for n in names}, {n: self.damping[n] for n in names})


class _EigenbasisPreconditioner(Preconditioner):
    """Shared by KFAC and EKFAC: ``P = (Q_S ⊗ Q_A) diag(values) (Q_S ⊗ Q_A)ᵀ`` with ``values [d_out, d_in']``."""

    def __init__(
        self,
        eigens: Mapping[str, tuple[Eigen, Eigen]],
        values: Mapping[str, torch.Tensor],
        damping: Damping | Mapping[str, float],
    ) -> None:
        self.eigens = {n: (s.to(torch.float64), a.to(torch.float64)) for n, (s, a) in eigens.items()}
        self.values = {n: v.to(torch.float64) for n, v in values.items()}
        if isinstance(damping, Damping):
            damping = {n: damping.resolve(v) for n, v in self.values.items()}
        super().__init__({n: tuple(v.shape) for n, v in self.values.items()}, damping)
        self._on_device: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _bases(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (name, str(device))
        cached = self._on_device.get(key)
        if cached is None:  # move each weight's basis to a device once
            gradient_eigen, activation_eigen = self.eigens[name]
            cached = (
                gradient_eigen.vectors.to(device),
                activation_eigen.vectors.to(device),
                self.values[name].to(device),
            )
            self._on_device[key] = cached
        return cached

    def _forward(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        q_s, q_a, values = self._bases(name, grad.device)
        return unrotate(rotate(grad.to(q_s.dtype), q_s, q_a) * values, q_s, q_a)

    def _inverse(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        q_s, q_a, values = self._bases(name, grad.device)
        return unrotate(rotate(grad.to(q_s.dtype), q_s, q_a) / (values + self.damping[name]), q_s, q_a)


class KFACPreconditioner(_EigenbasisPreconditioner):
    """``P_w = S_w ⊗ A_w`` from the eigendecompositions ``(eig(S), eig(A))`` of each weight."""

    kind = "kfac"

    def __init__(
        self, eigens: Mapping[str, tuple[Eigen, Eigen]], damping: Damping | Mapping[str, float] = Damping()
    ) -> None:
        values = {n: kfac_eigenvalues(s.to(torch.float64), a.to(torch.float64)) for n, (s, a) in eigens.items()}
        super().__init__(eigens, values, damping)

    def restrict(self, names: Sequence[str]) -> KFACPreconditioner:
        return KFACPreconditioner({n: self.eigens[n] for n in names}, {n: self.damping[n] for n in names})


class EKFACPreconditioner(_EigenbasisPreconditioner):
    """``P_w`` diagonal with entries ``Λ_w`` in the Kronecker eigenbasis of ``(S_w, A_w)``."""

    kind = "ekfac"

    def __init__(
        self,
        eigens: Mapping[str, tuple[Eigen, Eigen]],
        corrections: Mapping[str, torch.Tensor],
        damping: Damping | Mapping[str, float] = Damping(),
    ) -> None:
        super().__init__(eigens, corrections, damping)

    def restrict(self, names: Sequence[str]) -> EKFACPreconditioner:
        return EKFACPreconditioner(
            {n: self.eigens[n] for n in names}, {n: self.values[n] for n in names}, {n: self.damping[n] for n in names}
        )

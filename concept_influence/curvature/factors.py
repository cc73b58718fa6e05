"""Fitted curvature statistics of a set of tracked weights, and the preconditioners built from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from concept_influence.curvature.config import Damping, FactorConfig, PreconditionerKind
from concept_influence.curvature.eigen import Eigen
from concept_influence.curvature.preconditioner import (
    DiagonalPreconditioner,
    EKFACPreconditioner,
    IdentityPreconditioner,
    KFACPreconditioner,
    Preconditioner,
)


@dataclass
class WeightFactors:
    """Statistics of one weight ``[d_out, d_in']`` (``d_in' = d_in + 1`` when the bias is folded in).

    ``activation_covariance``: ``A = E_tokens[a aᵀ]`` ``[d_in', d_in']``; ``gradient_covariance``:
    ``S = E_tokens[g gᵀ]`` ``[d_out, d_out]`` (both averaged over non-padding tokens); ``activation_eigen`` /
    ``gradient_eigen``: their float64 eigendecompositions; ``eigenvalue_correction``: EKFAC's
    ``Λ = E_rows[(Q_Sᵀ G Q_A)²]`` ``[d_out, d_in']``; ``diagonal``: ``E_rows[G ∘ G]`` ``[d_out, d_in']``.
    """

    d_out: int
    d_in: int
    activation_covariance: torch.Tensor | None = None
    gradient_covariance: torch.Tensor | None = None
    activation_eigen: Eigen | None = None
    gradient_eigen: Eigen | None = None
    eigenvalue_correction: torch.Tensor | None = None
    diagonal: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)


@dataclass
class Factors:
    """Per-weight factors plus what they were fitted on (``config``, counts, fingerprints). ``provenance``: how the
    fit rows were chosen when they are not the scoring set (``{"rows", "sample_of", "seed", "source"}``; empty when
    the factors were fitted on the data they score)."""

    weights: dict[str, WeightFactors]
    config: FactorConfig
    n_rows: int = 0
    n_tokens: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def available(self) -> list[str]:
        """Preconditioner kinds these factors can build."""
        kinds = ["identity"]
        first = next(iter(self.weights.values()), None)
        if first is None:
            return kinds
        if first.diagonal is not None:
            kinds.append("diagonal")
        if first.gradient_eigen is not None:
            kinds.append("kfac")
            if first.eigenvalue_correction is not None:
                kinds.append("ekfac")
        return kinds

    def restrict(self, names: Sequence[str]) -> Factors:
        missing = [n for n in names if n not in self.weights]
        if missing:
            raise KeyError(f"no factors for {missing}; these factors cover {self.names} (refit with these weights)")
        return Factors(
            {n: self.weights[n] for n in names},
            self.config,
            self.n_rows,
            self.n_tokens,
            dict(self.fingerprints),
            dict(self.provenance),
        )

    def preconditioner(self, kind: PreconditionerKind | None = None, damping: Damping = Damping()) -> Preconditioner:
        """Build a preconditioner of ``kind`` (default: the one the factors were fitted for)."""
        kind = kind or self.config.preconditioner
        if kind not in self.available():
            raise ValueError(
                f"cannot build a {kind} preconditioner: these factors support {self.available()} "
                f"(fitted with preconditioner={self.config.preconditioner!r})"
            )
        if kind == "identity":
            return IdentityPreconditioner({n: w.shape for n, w in self.weights.items()})
        if kind == "diagonal":
            return DiagonalPreconditioner({n: w.diagonal for n, w in self.weights.items()}, damping)
        eigens = {n: (w.gradient_eigen, w.activation_eigen) for n, w in self.weights.items()}
        if kind == "kfac":
            return KFACPreconditioner(eigens, damping)
        return EKFACPreconditioner(eigens, {n: w.eigenvalue_correction for n, w in self.weights.items()}, damping)

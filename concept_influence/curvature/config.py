"""Frozen configs of the curvature stage: what to fit (``FactorConfig``) and how to damp it (``Damping``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from concept_influence.settings import option

FisherType = Literal["true", "empirical"]
PreconditionerKind = Literal["ekfac", "kfac", "diagonal", "identity"]
PRECONDITIONER_KINDS: tuple[str, ...] = ("ekfac", "kfac", "diagonal", "identity")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Damping:
    """Damping ``λ_w`` added to each weight's curvature block before inversion: ``(G_w + λ_w I)⁻¹``.

    ``relative`` (default 0.1): ``λ_w = relative × mean eigenvalue of G_w`` (mean of Λ for EKFAC, of
    ``λ_S ⊗ λ_A`` for KFAC, of the diagonal for the diagonal preconditioner). ``absolute``: one ``λ`` for every
    weight (then ``relative`` is ignored). A tiny absolute value such as 1e-8 makes EKFAC scores meaningless on
    LayerNorm transformers (near-null directions of G dominate the solve); prefer the relative default.
    """

    relative: float = 0.1
    absolute: float | None = None

    def __post_init__(self) -> None:
        if self.absolute is not None and not self.absolute >= 0:
            raise ValueError(f"Damping.absolute must be >= 0, got {self.absolute}")
        if self.absolute is None and not self.relative >= 0:
            raise ValueError(f"Damping.relative must be >= 0, got {self.relative}")

    def resolve(self, eigenvalues: torch.Tensor) -> float:
        """The absolute damping for a block whose (approximate) eigenvalues are ``eigenvalues``."""
        if self.absolute is not None:
            return float(self.absolute)
        return float(self.relative * eigenvalues.double().mean())

    def describe(self) -> str:
        return f"absolute {self.absolute:g}" if self.absolute is not None else f"{self.relative:g} x mean eigenvalue"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FactorConfig:
    """What ``fit_factors`` computes.

    ``fisher``: ``"true"`` samples each target token from the model's own predictive distribution (seeded per row,
    so the fit does not depend on batch size or order); ``"empirical"`` uses the data's tokens.
    ``preconditioner``: the richest preconditioner the fit must support. ``"ekfac"`` fits everything (covariances,
    eigenbases, eigenvalue correction Λ and the diagonal, two passes over the data); ``"kfac"`` only the
    covariances (one pass); ``"diagonal"`` only the diagonal (one pass); ``"identity"`` nothing.
    ``dtype``: precision of the accumulated statistics (``"float32"`` or ``"float64"``); eigendecompositions are
    always computed in float64. ``seed``: seed of the label sampling for the true Fisher (and of the Λ sample).
    ``lambda_rows``: fit Λ and the diagonal on a seeded sample of at most this many of the rows (kronfluence's
    ``lambda_max_examples``; the covariances still use every row); ``None``: every row.
    ``gradient_checkpointing``: recompute each block's activations in the backward instead of keeping them (less
    memory on long rows, one more forward per batch); the factors are the same, so it is not part of the fingerprint.
    """

    fisher: FisherType = option("true", help="true (labels sampled from the model) or empirical (the data's labels).")
    preconditioner: PreconditionerKind = option(
        "ekfac", help="ekfac | kfac | diagonal | identity: the richest preconditioner the fit must support."
    )
    dtype: Literal["float32", "float64"] = option("float32", help="Precision of the curvature statistics (factors).")
    seed: int = option(0, help="Seed of the true Fisher's label sampling (and of the Λ sample).")
    lambda_rows: int | None = option(
        None, help="Fit Λ and the diagonal on a seeded sample of at most this many rows (default: every row).", min=1
    )
    gradient_checkpointing: bool = option(
        False, help="Recompute the blocks' activations in the backward (less memory on long rows; same factors)."
    )

    def __post_init__(self) -> None:
        if self.fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got {self.fisher!r}")
        if self.preconditioner not in PRECONDITIONER_KINDS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONER_KINDS}, got {self.preconditioner!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.lambda_rows is not None and self.lambda_rows < 1:
            raise ValueError(f"lambda_rows must be positive (or None for every row), got {self.lambda_rows}")

    @classmethod
    def precise(cls, **overrides: Any) -> FactorConfig:
        """float64 statistics (tests, small models)."""
        return cls(**{"dtype": "float64", **overrides})

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def needs_covariances(self) -> bool:
        return self.preconditioner in ("ekfac", "kfac")

    @property
    def needs_per_example_pass(self) -> bool:
        """EKFAC's Λ and the diagonal need a pass over per-example gradients."""
        return self.preconditioner in ("ekfac", "diagonal")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["lambda_rows"] is None:  # absent, so that fits made before the option keep their fingerprint
            del out["lambda_rows"]
        del out["gradient_checkpointing"]  # how the statistics are computed, not what they are
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactorConfig:
        return cls(**data)

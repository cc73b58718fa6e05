"""Curvature: Kronecker factors, eigenvalue correction and interchangeable preconditioners (identity, diagonal,
KFAC, EKFAC); the fit driver and the factor files with fingerprints."""

from concept_influence.curvature.config import PRECONDITIONER_KINDS, Damping, FactorConfig
from concept_influence.curvature.eigen import (
    Eigen,
    eigendecompose,
    eigenvalue_correction_sum,
    kfac_eigenvalues,
)
from concept_influence.curvature.factors import Factors, WeightFactors
from concept_influence.curvature.fit import fit_factors
from concept_influence.curvature.io import (
    FactorMismatchError,
    data_fingerprint,
    load_factors,
    read_manifest,
    save_factors,
)
from concept_influence.curvature.preconditioner import (
    DiagonalPreconditioner,
    EKFACPreconditioner,
    IdentityPreconditioner,
    KFACPreconditioner,
    Preconditioner,
)
from concept_influence.gradients.loss import sample_targets, sequence_losses

__all__ = [
    "PRECONDITIONER_KINDS",
    "Damping",
    "DiagonalPreconditioner",
    "EKFACPreconditioner",
    "Eigen",
    "FactorConfig",
    "FactorMismatchError",
    "Factors",
    "IdentityPreconditioner",
    "KFACPreconditioner",
    "Preconditioner",
    "WeightFactors",
    "data_fingerprint",
    "eigendecompose",
    "eigenvalue_correction_sum",
    "fit_factors",
    "kfac_eigenvalues",
    "load_factors",
    "read_manifest",
    "sample_targets",
    "save_factors",
    "sequence_losses",
]

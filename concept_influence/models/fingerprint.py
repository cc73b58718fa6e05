"""Fingerprints: short content hashes that tie artifacts to the model, data and config they were made with."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter's name, shape, dtype and values (16 hex chars). Deterministic across runs."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def json_fingerprint(obj: Any) -> str:
    """Hash of a JSON-serialisable object (config dicts, lists of row ids)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MissingProvenanceError(ValueError):
    """An artifact (factors, an SAE) that does not record what it was made on (no model fingerprint): refused unless
    the caller opts in with ``allow_missing_provenance=True`` / ``--allow-missing-provenance``."""


ALLOW_MISSING_PROVENANCE = "--allow-missing-provenance (allow_missing_provenance=True)"


def missing_provenance(
    where: str, what: str = "model", opt_in: str | None = ALLOW_MISSING_PROVENANCE
) -> MissingProvenanceError:
    """The error for ``where`` (a file or folder) that records no ``what`` fingerprint: names it and the opt-in
    (``None``: the caller has none; the artifact must be remade)."""
    remedy = (
        f"remake it, or pass {opt_in} to use it anyway (the opt-in is recorded in the outputs' metadata)"
        if opt_in
        else "remake it (--overwrite)"
    )
    return MissingProvenanceError(
        f"{where}: records no {what} fingerprint, so it cannot be checked against this "
        f"{'data' if what == 'data' else what}; {remedy}"
    )

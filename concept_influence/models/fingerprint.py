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

"""Fingerprints: short content hashes that tie artifacts to the model, data and config they were made with."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter's name, shape, dtype and values (16 hex chars). Deterministic across runs. A model
    sharded with FSDP (``DTensor`` parameters) gets the same hash as the whole model, without any rank holding a
    whole parameter (``sharded_fingerprint``)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return sharded_fingerprint(model)
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def sharded_fingerprint(model: nn.Module) -> str:
    """``model_fingerprint`` of a model whose parameters are ``DTensor``s sharded by rows (``Shard(0)``, as
    ``fully_shard`` does): rank 0 hashes each parameter's rows in order, receiving the other ranks' shards one at a
    time (a shard is at most one parameter's rows / world); every rank returns the same hash. Collective."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    rank, world = dist.get_rank(), dist.get_world_size()
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if rank == 0:
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
        if not isinstance(param, DTensor):
            if rank == 0:
                digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            continue
        if tuple(param.placements) != (Shard(0),):
            raise ValueError(f"{name}: sharded as {param.placements}, expected rows (Shard(0)) as fully_shard does")
        local = param.to_local().detach().to(torch.float32).contiguous()
        sizes = torch.zeros(world, dtype=torch.int64)
        sizes[rank] = local.numel()
        dist.all_reduce(sizes)
        for source in range(world):
            if int(sizes[source]) == 0:
                continue
            if source == 0:
                if rank == 0:
                    digest.update(local.cpu().numpy().tobytes())
            elif rank == source:
                dist.send(local.reshape(-1), dst=0)
            elif rank == 0:
                piece = torch.empty(int(sizes[source]), dtype=torch.float32, device=local.device)
                dist.recv(piece, src=source)
                digest.update(piece.cpu().numpy().tobytes())
    out = [digest.hexdigest()[:16] if rank == 0 else None]
    dist.broadcast_object_list(out, src=0)
    return str(out[0])


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

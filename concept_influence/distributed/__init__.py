"""Model-sharded (FSDP2) execution: wrapping a model with ``torch.distributed.fsdp.fully_shard``, keeping every
rank's forward passes in step, ownership of the tracked weights' factors and the collectives that move statistics
to their owners. Pure plumbing below ``models/``, ``curvature/`` and ``attribution/``: no files, no math."""

from concept_influence.distributed.ownership import factor_cost, weight_owners
from concept_influence.distributed.runtime import (
    SHARD_CHOICES,
    dist_info,
    ensure_process_group,
    is_sharded,
    max_over_ranks,
    shard_model,
    sharded_world,
)

__all__ = [
    "SHARD_CHOICES",
    "dist_info",
    "ensure_process_group",
    "factor_cost",
    "is_sharded",
    "max_over_ranks",
    "shard_model",
    "sharded_world",
    "weight_owners",
]

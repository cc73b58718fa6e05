"""The session's sharding option (``Attributor(shard=...)``, the CLI's ``--fsdp``), written once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from concept_influence.settings import option


@dataclass(frozen=True)
class ShardSettings:
    """How the model is spread over the processes of ``torch.distributed`` (torchrun)."""

    shard: Literal["none", "fsdp"] = option(
        "none",
        help="Shard the model's parameters over the torchrun processes with PyTorch FSDP2 (fully_shard on each "
        "block, then the root); factors are owned by ranks. Run under torchrun --nproc_per_node N.",
        flag="--fsdp",
        cli=False,
    )

    def __post_init__(self) -> None:
        if self.shard not in ("none", "fsdp"):
            raise ValueError(f"shard must be 'none' or 'fsdp', got {self.shard!r}")

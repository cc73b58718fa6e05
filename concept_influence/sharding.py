"""How processes share a model: the settings (``none`` or ``fsdp``) and the rule that gives each tracked weight an
owner rank. ``plan --shard fsdp`` and the sharded fit import the same ``assign_owners``, so the plan's per-rank
factor bytes are the files each rank writes.

```python
assign_owners({"a": 9, "b": 5, "c": 4, "d": 3}, 2)   # {'a': 0, 'b': 1, 'c': 1, 'd': 0}: loads 12 and 9
```

This module depends on nothing of the package but ``settings`` (the execution code and the planner both import it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from concept_influence.settings import option

ShardKind = Literal["none", "fsdp"]
Accumulation = Literal["groups", "all"]


@dataclass(frozen=True)
class ShardSettings:
    """How the processes of a torchrun share the work."""

    shard: ShardKind = option(
        "none",
        help="none: every process holds the whole model, factors and query vector (data-parallel); fsdp: FSDP2 "
        "fully_shard splits the parameters, and the factors and query vector are owned by ranks.",
    )
    accumulate: Accumulation = option(
        "groups",
        help="fsdp fit: groups: every rank sums one group of weights' covariances over its rows, reduced to their "
        "owners after the group's pass (a pass per group); all: every weight in one pass.",
    )
    prefetch_blocks: int = option(
        2, help="fsdp: decoder blocks gathered at once (the running one and FSDP2's prefetch).", min=1
    )

    def __post_init__(self) -> None:
        if self.shard not in ("none", "fsdp"):
            raise ValueError(f"--shard {self.shard!r}: choose none or fsdp")
        if self.accumulate not in ("groups", "all"):
            raise ValueError(f"--accumulate {self.accumulate!r}: choose groups or all")
        if self.prefetch_blocks < 1:
            raise ValueError(f"--prefetch-blocks must be >= 1, got {self.prefetch_blocks}")


def assign_owners(sizes: Mapping[str, int], world: int) -> dict[str, int]:
    """Owner rank of each weight, balanced by size: weights sorted by ``sizes`` descending (ties by name), each
    given to the rank with the least total so far (ties to the lowest rank). ``sizes``: a weight's factor bytes,
    e.g. ``4·(d_in'² + d_out²)``; only their order and ratios matter."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    loads = [0] * world
    owners: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += sizes[name]
    return owners


def owner_loads(sizes: Mapping[str, int], owners: Mapping[str, int], world: int) -> list[int]:
    """Total size owned by each rank."""
    loads = [0] * world
    for name, rank in owners.items():
        loads[rank] += sizes[name]
    return loads

"""Which rank owns which tracked weight's factors: balanced by the size of the factors, deterministic (every rank
computes the same table from the same shapes), and weights that read one input (q/k/v, gate/up: one activation
covariance) go to one owner."""

from __future__ import annotations

from collections.abc import Sequence


def factor_cost(d_in: int, d_out: int) -> int:
    """Elements of one weight's factors: ``A [d_in, d_in]``, ``S [d_out, d_out]``, Λ and the diagonal
    ``[d_out, d_in]``."""
    return d_in * d_in + d_out * d_out + 2 * d_out * d_in


def assign_owners(weights: Sequence[tuple[str, int, int, str]], world: int) -> dict[str, int]:
    """``{name: rank}`` for ``weights`` given as ``(name, d_in', d_out, shared_input_key)``: weights sharing an input
    key form one group (its activation covariance counted once); groups go largest first to the least loaded rank
    (ties: the lowest rank; order of equal groups: their first weight's position). ``world == 1``: all rank 0."""
    if world < 1:
        raise ValueError(f"world size must be positive, got {world}")
    groups: dict[str, list[tuple[str, int, int]]] = {}
    for name, d_in, d_out, key in weights:
        groups.setdefault(key, []).append((name, d_in, d_out))
    costs = []
    for position, (key, members) in enumerate(groups.items()):
        d_in = members[0][1]
        cost = d_in * d_in + sum(d_out * d_out + 2 * d_out * d_in for _, _, d_out in members)
        costs.append((-cost, position, key))
    load = [0] * world
    owners: dict[str, int] = {}
    for neg_cost, _, key in sorted(costs):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] -= neg_cost
        for name, _, _ in groups[key]:
            owners[name] = rank
    return {name: owners[name] for name, _, _, _ in weights}

"""Which rank owns which tracked weight's factors: balanced by the size of the factors, deterministic (every rank
computes the same table from the same shapes), and weights that read one input (q/k/v, gate/up: one activation
covariance) go to one owner."""

from __future__ import annotations

from collections.abc import Sequence

from concept_influence.sharding import assign_owners


def factor_cost(d_in: int, d_out: int) -> int:
    """Elements of one weight's factors: ``A [d_in, d_in]``, ``S [d_out, d_out]``, Λ and the diagonal
    ``[d_out, d_in]``."""
    return d_in * d_in + d_out * d_out + 2 * d_out * d_in


def weight_owners(weights: Sequence[tuple[str, int, int, str]], world: int) -> dict[str, int]:
    """``{name: rank}`` for ``weights`` given as ``(name, d_in', d_out, shared_input_key)``: weights sharing an input
    key form one group (its activation covariance counted once), and the groups get their owners by the one rule
    ``plan`` also uses (``sharding.assign_owners``: largest first to the least loaded rank). ``world == 1``: all 0."""
    groups: dict[str, list[tuple[str, int, int]]] = {}
    for name, d_in, d_out, key in weights:
        groups.setdefault(key, []).append((name, d_in, d_out))
    costs = {
        key: members[0][1] ** 2 + sum(d_out * d_out + 2 * d_out * d_in for _, d_in, d_out in members)
        for key, members in groups.items()
    }
    group_owner = assign_owners(costs, world)
    return {name: group_owner[key] for name, _, _, key in weights}

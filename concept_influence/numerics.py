"""Finite-value checks: a NaN or inf anywhere in the pipeline (activations, factors, gradients, scores) is an error
that names the stage and the row, never a silent NaN in a scores file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class NonFiniteError(ValueError):
    """A NaN or inf where a finite number is needed; the message names the stage and the row (or weight)."""


def check_finite(
    tensor: torch.Tensor, stage: str, rows: Sequence[int] | torch.Tensor | None = None, *, hint: str = ""
) -> torch.Tensor:
    """Return ``tensor`` unchanged if every entry is finite; else raise ``NonFiniteError`` naming ``stage`` and,
    when ``rows`` gives each slice along dim 0 its row index, the first bad row (and how many are bad)."""
    if tensor.is_floating_point() and tensor.numel() and bool(torch.isfinite(tensor.sum())):
        return tensor  # one reduction, no boolean copy: a finite sum means every entry is finite
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return tensor
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
    where = ""
    if rows is not None and tensor.dim() > 0:
        bad = (~finite).reshape(tensor.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        index = [int(i) for i in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
        where = f" in row {index[bad[0]]}" + (f" (and {len(bad) - 1} more rows of the batch)" if len(bad) > 1 else "")
    raise NonFiniteError(
        f"{stage}: {kind}{where}"
        + (f"; {hint}" if hint else "")
        + " (check the model's dtype and weights, and the data)"
    )


def check_finite_dict(tensors: dict[str, Any], stage: str) -> None:
    """``check_finite`` on each tensor of a dict, naming its key."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            check_finite(value, f"{stage} ({name})")

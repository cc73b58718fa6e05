"""The Concept abstraction: a site (``resid.{layer}``) plus a differentiable scalar readout of its activations.

Sign convention everywhere: a higher readout means more of the concept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch

Reduction = Literal["mean", "last_prompt", "per_token"]
REDUCTIONS: tuple[str, ...] = ("mean", "last_prompt", "per_token")


def check_reduction(reduction: str) -> str:
    """Validate a sequence reduction name (``mean``, ``last_prompt`` or ``per_token``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'last_prompt' or 'per_token'")
    return reduction


class Concept(ABC):
    """A scalar measurement of the activations at ``resid.{layer}``.

    ``token_readout(acts [batch, seq, d_model]) -> [batch, seq]`` must be differentiable (it is used both as a
    forward-only score and as the measurement of influence functions). ``reduction``: how ``readout`` reduces a
    sequence when not told otherwise (saved with the concept; ``"mean"`` over response tokens by default).
    """

    layer: int
    d_model: int
    reduction: Reduction = "mean"

    @abstractmethod
    def token_readout(self, acts: torch.Tensor) -> torch.Tensor:
        """Per-token readout ``[batch, seq]`` of activations ``[batch, seq, d_model]``."""

    def readout(
        self, acts: torch.Tensor, response_mask: torch.Tensor, reduction: Reduction | None = None
    ) -> torch.Tensor:
        """Reduce the per-token readout over a sequence (``reduction`` default: the concept's own ``reduction``).

        ``response_mask``: ``[batch, seq]``, 1 on the response (assistant) tokens.
        ``mean``: mean over response tokens -> ``[batch]``; ``last_prompt``: the token just before the first response
        token -> ``[batch]``; ``per_token``: ``[batch, seq]`` with zeros off the response.
        """
        reduction = self.reduction if reduction is None else reduction
        per_token = self.token_readout(acts)
        per_token = per_token.to(torch.promote_types(per_token.dtype, torch.float32))  # sums in float32 at least
        mask = response_mask.to(per_token.dtype)
        if reduction == "per_token":
            return per_token * mask
        if reduction == "mean":
            counts = mask.sum(dim=1)
            if bool((counts == 0).any()):
                raise ValueError("readout: a sequence has no response tokens (empty answer or truncated away)")
            return (per_token * mask).sum(dim=1) / counts
        if reduction == "last_prompt":
            first = response_mask.to(torch.long).argmax(dim=1)
            if bool((first == 0).any()):
                raise ValueError("readout: last_prompt needs at least one prompt token before the response")
            return per_token.gather(1, (first - 1).unsqueeze(1)).squeeze(1)
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'last_prompt' or 'per_token'")


class DirectionConcept(Concept):
    """Projection on a direction: ``h · v / ‖v‖`` at ``resid.{layer}``.

    ``kind``: where the direction came from (``"direction"`` a raw vector, ``"probe"``, ``"diff_of_means"``,
    ``"persona_vector"``); ``metrics``: how it was validated (held-out AUC...); ``extra``: anything else to save;
    ``reduction``: the default sequence reduction of ``readout``.
    """

    kind: str

    def __init__(
        self,
        direction: torch.Tensor,
        layer: int,
        *,
        kind: str = "direction",
        metrics: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        direction = torch.as_tensor(direction).detach().flatten()
        norm = float(direction.norm())
        if not norm > 0 or not torch.isfinite(direction).all():
            raise ValueError("concept direction must be finite with a non-zero norm")
        self.direction = direction
        self.unit = direction / norm
        self.layer = int(layer)
        self.d_model = direction.numel()
        self.kind = kind
        self.metrics = dict(metrics or {})
        self.extra = dict(extra or {})
        self.reduction = check_reduction(reduction)  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DirectionConcept(kind={self.kind!r}, layer={self.layer}, d_model={self.d_model})"

    def token_readout(self, acts: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]``; computed in at least float32 (bf16/fp16 activations are upcast before the dot product)."""
        if acts.shape[-1] != self.d_model:
            raise ValueError(f"concept has d_model {self.d_model} but activations have {acts.shape[-1]}")
        wide = torch.promote_types(acts.dtype, torch.float32)
        return acts.to(wide) @ self.unit.to(device=acts.device, dtype=wide)

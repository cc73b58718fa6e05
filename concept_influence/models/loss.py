"""The training loss on assistant tokens."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-target-token cross-entropy ``[batch, seq]``: entry ``t`` is ``-log p(token t | tokens < t)`` where
    ``loss_mask[:, t] == 1`` and 0 elsewhere (entry 0 is always 0: the first token is never predicted)."""
    shifted = logits[:, :-1, :].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1, :]
    targets = input_ids[:, 1:].to(logits.device)
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none").view_as(
        targets
    )
    mask = loss_mask[:, 1:].to(device=nll.device, dtype=nll.dtype)
    return F.pad(nll * mask, (1, 0))


def causal_lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    reduction: Literal["mean", "sum", "none", "row_mean"] = "mean",
) -> torch.Tensor:
    """Cross-entropy on the tokens where ``loss_mask`` is 1.

    ``mean``: over all target tokens of the batch (scalar); ``sum``: summed (scalar); ``none``: per row, summed over
    its tokens ``[batch]``; ``row_mean``: per row, averaged over its tokens ``[batch]``.
    """
    per_token = token_cross_entropy(logits, input_ids, loss_mask)
    counts = loss_mask[:, 1:].sum(dim=1).to(per_token.dtype)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / counts.sum().clamp_min(1)
    if reduction == "none":
        return per_token.sum(dim=1)
    if reduction == "row_mean":
        return per_token.sum(dim=1) / counts.clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")

"""The training loss the curvature and the influence scores are defined on, and seeded label sampling.

``L(row) = Σ_t loss_mask[t] · CE(logits[t-1], target[t])``: the *sum* of token cross-entropies over the row's
assistant tokens (``loss_mask[t] = 1`` when token ``t`` is a training target, predicted from position ``t - 1``).
Summing (not averaging) makes ``∇L(row)`` the gradient one SGD step on the row would follow with a per-token
learning rate (as in fine-tuning with a token-mean loss over the batch), and matches kronfluence's language-model
convention; long rows therefore weigh more. ``InfluenceConfig(row_loss="mean")`` scores the per-token mean instead.

True Fisher: targets are drawn from the model's own predictive distribution, with a generator seeded by
``(seed, row index)`` so that the draws do not depend on batch size, batch composition, padding or data order.
"""

from __future__ import annotations

import torch

from concept_influence.models.loss import token_cross_entropy


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-row summed cross-entropy ``[B]`` of ``logits [B, T, V]`` against ``targets [B, T]`` (aligned with the
    input ids: ``targets[:, t]`` is predicted at position ``t - 1``) on positions with ``loss_mask [B, T] = 1``."""
    return token_cross_entropy(logits, targets, loss_mask).sum(dim=1)


def _row_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 104_729) % (2**62)


@torch.no_grad()
def sample_targets(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    index: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """``input_ids`` with every loss-masked target replaced by a draw from the model: ``[B, T]``.

    Token ``t`` is drawn from ``softmax(logits[b, t - 1])`` by inverse-CDF sampling with uniforms from a generator
    seeded by ``(seed, index[b])`` (the ``t``-th uniform of the row for position ``t``), so a row's draws depend only
    on its own logits, its index and the seed.
    """
    targets = input_ids.clone().to(logits.device)
    for b in range(logits.shape[0]):
        positions = torch.nonzero(loss_mask[b, 1:], as_tuple=False).flatten() + 1
        if positions.numel() == 0:
            continue
        generator = torch.Generator().manual_seed(_row_seed(seed, int(index[b])))
        n = int(positions.max()) + 1  # the row's own length: independent of the batch's padding
        uniforms = torch.rand(n, generator=generator, dtype=torch.float64)[positions.cpu()].to(logits.device)
        probs = torch.softmax(logits[b, positions.to(logits.device) - 1].to(torch.float64), dim=-1)
        cdf = probs.cumsum(dim=-1)
        draws = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
        targets[b, positions.to(logits.device)] = draws.clamp_max(probs.shape[-1] - 1)
    return targets

"""Gradient capture: the forward of a batch and the backward of its training loss to the tracked weights' outputs,
with the adapter's capture hooks installed (``[B, T, d_in]`` activations and ``[B, T, d_out]`` output gradients per
weight), and the mode the tracked weights need for it.

Below both ``curvature/`` (the fit driver's passes) and ``attribution/`` / ``store/`` (per-row gradients): they all
take their gradients from here. ``curvature.fit`` re-exports these names for code written against their old home.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from concept_influence.gradients.loss import sample_targets, sequence_losses
from concept_influence.models.base import ModelAdapter, WeightCapture, WeightInfo


@contextlib.contextmanager
def gradient_mode(adapter: ModelAdapter, infos: Sequence[WeightInfo]) -> Iterator[list[torch.nn.Parameter]]:
    """Eval mode, grad enabled, and ``requires_grad`` on the tracked weights (and biases); restored on exit.
    Yields the tracked parameters (what ``torch.autograd.grad`` differentiates against)."""
    params: list[torch.nn.Parameter] = []
    for info in infos:
        params.append(adapter.parameter(info.param_name))
        if info.bias_name is not None:
            params.append(adapter.parameter(info.bias_name))
    saved = [p.requires_grad for p in params]
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield params
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)
        adapter.model.train(was_training)


HEAD_CHUNK_ELEMENTS = 2**24  # logits materialised at a time by the loss (64 MiB in float32)


def capture_loss_gradients(
    adapter: ModelAdapter,
    batch: dict[str, torch.Tensor],
    infos: Sequence[WeightInfo],
    params: Sequence[torch.nn.Parameter],
    *,
    fisher: str = "empirical",
    seed: int = 0,
) -> tuple[WeightCapture, torch.Tensor]:
    """Forward + backward of the summed training loss of a batch with the weights' capture installed.

    Returns the capture (``activations[name] [B, T, d_in]``, ``output_grads[name] [B, T, d_out]``; output gradients
    of weights the loss does not reach are zeros) and the per-row losses ``[B]`` (detached). ``fisher="true"``
    replaces the targets by seeded draws from the model (``sample_targets``). The backward goes to the weights'
    outputs only (``params`` is kept for the interface: no weight gradient is formed).
    """
    names = [info.name for info in infos]
    with adapter.capture_weights(names) as capture:
        losses = loss_backward(adapter, batch, capture.outputs, fisher=fisher, seed=seed)
    for info in infos:
        if info.name not in capture.output_grads:
            a = capture.activations[info.name]
            capture.output_grads[info.name] = a.new_zeros(*a.shape[:-1], info.d_out)
    return capture, losses


def loss_backward(
    adapter: ModelAdapter,
    batch: dict[str, torch.Tensor],
    outputs: Sequence[torch.Tensor],
    *,
    fisher: str = "empirical",
    seed: int = 0,
    then_data_labels: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Forward of a batch and backward of its summed training loss to ``outputs`` (the tensors whose gradient
    hooks the capture installed); returns the per-row losses ``[B]`` (detached).

    When the adapter can split off its output head, the loss is computed a few rows at a time from the head's
    input (at most ``HEAD_CHUNK_ELEMENTS`` logits at once), so ``[B, T, vocab]`` logits never exist together.

    ``then_data_labels`` (with ``fisher="true"``): after that backward, call it (e.g. to point the capture's hooks
    elsewhere) and backpropagate the loss of the data's own labels through the same forward (one forward, two
    backwards). The returned losses are those of the first backward's labels.
    """
    device = adapter.device
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    index = batch["index"]
    twice = then_data_labels is not None and fisher == "true"
    split = adapter.hidden_and_head(input_ids, attention)
    if split is None:
        logits = adapter.logits(input_ids, attention)
        targets = input_ids
        if fisher == "true":
            targets = sample_targets(logits.detach(), input_ids, loss_mask, index, seed)
        losses = sequence_losses(logits, targets, loss_mask)
        _backward_to(losses.sum(), outputs, retain_graph=twice)
        if then_data_labels is not None:
            then_data_labels()
            if twice:
                _backward_to(sequence_losses(logits, input_ids, loss_mask).sum(), outputs)
        return losses.detach()
    hidden, head = split
    n_rows, length = input_ids.shape
    rows_per_chunk = max(1, HEAD_CHUNK_ELEMENTS // max(1, length * _vocab_size(head)))
    hidden_grad = torch.zeros_like(hidden) if hidden.requires_grad else None
    data_grad = torch.zeros_like(hidden) if hidden.requires_grad and twice else None
    losses = []
    for start in range(0, n_rows, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        piece = hidden[rows].detach().requires_grad_(hidden_grad is not None)
        logits = head(piece)
        targets = input_ids[rows]
        if fisher == "true":
            targets = sample_targets(logits.detach(), targets, loss_mask[rows], index[rows], seed)
        chunk = sequence_losses(logits, targets, loss_mask[rows])
        if hidden_grad is not None:
            (hidden_grad[rows],) = torch.autograd.grad(chunk.sum(), piece, retain_graph=data_grad is not None)
        if data_grad is not None:
            (data_grad[rows],) = torch.autograd.grad(
                sequence_losses(logits, input_ids[rows], loss_mask[rows]).sum(), piece
            )
        losses.append(chunk.detach())
        del logits
    if hidden_grad is not None:
        _backward_to(hidden, outputs, hidden_grad, retain_graph=data_grad is not None)
    if then_data_labels is not None:
        then_data_labels()
        if data_grad is not None:
            _backward_to(hidden, outputs, data_grad)
    return torch.cat(losses)


def _vocab_size(head: Any) -> int:
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else 1


def _backward_to(
    value: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    grad: torch.Tensor | None = None,
    *,
    retain_graph: bool = False,
) -> None:
    """Backpropagate ``value`` down to ``outputs`` only (their gradient hooks fire; nothing below them runs)."""
    if not outputs or not value.requires_grad:
        return
    torch.autograd.grad(value, list(outputs), grad_outputs=grad, allow_unused=True, retain_graph=retain_graph)

"""Gradients of the training loss: capture (hooks, loss backward, modes: ``gradients.capture``) and the loss itself
(``gradients.loss``). Below ``curvature/``, ``attribution/`` and ``store/``, which take their gradients from here."""

from concept_influence.gradients.capture import capture_loss_gradients, gradient_mode, loss_backward
from concept_influence.gradients.loss import sample_targets, sequence_losses

__all__ = ["capture_loss_gradients", "gradient_mode", "loss_backward", "sample_targets", "sequence_losses"]

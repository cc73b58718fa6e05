"""Moved to ``concept_influence.gradients.loss`` (the training loss belongs with gradient capture, below both
``curvature/`` and ``attribution/``); this module keeps the old import path working."""

from concept_influence.gradients.loss import sample_targets, sequence_losses

__all__ = ["sample_targets", "sequence_losses"]

"""Evaluation of rankings (and, later, filtering and retraining)."""

from concept_influence.evaluate.metrics import mean_rank, pr_auc, precision_at_k, ranking_report, roc_auc

__all__ = ["mean_rank", "pr_auc", "precision_at_k", "ranking_report", "roc_auc"]

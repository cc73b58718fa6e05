"""Evaluation: ranking metrics, filtering by scores, counterfactual retraining (removal curves with CIs, LDS)."""

from concept_influence.evaluate.counterfactual import EvaluationConfig, evaluate_removals, measure_concept
from concept_influence.evaluate.filter import FilterResult, FilterRule, filter_file, filter_scores
from concept_influence.evaluate.metrics import mean_rank, pr_auc, precision_at_k, ranking_report, roc_auc
from concept_influence.evaluate.retrain import Recipe, retrain

__all__ = [
    "EvaluationConfig",
    "FilterResult",
    "FilterRule",
    "Recipe",
    "evaluate_removals",
    "filter_file",
    "filter_scores",
    "mean_rank",
    "measure_concept",
    "pr_auc",
    "precision_at_k",
    "ranking_report",
    "retrain",
    "roc_auc",
]

"""concept_influence: trace a language model's behaviour back to the fine-tuning rows that caused it, through
concepts (probe directions, persona vectors, SAE features) and EKFAC influence functions.

The public API, by stage::

    session      Attributor (model + data + workdir: the one entry point for notebooks and the CLI)
    store        GradientStore, StoreConfig (projected row gradients for fast repeated questions)

    data         read_chat_jsonl, tokenize_chat
    models       load_adapter, HFAdapter, TransformerLensAdapter, generate_answers
    concepts     load_spec, train_concept, layer_sweep, LinearProbe, DiffOfMeans, DirectionConcept,
                 load_concept, save_concept, load_persona_vector
    curvature    FactorConfig, Damping, fit_factors, load_factors
    attribution  vector_filter, projection_difference, compute_influence, ConceptMeasurement,
                 LogLikelihoodMeasurement, answer_queries, ScoreTable, RECOMMENDED_METHOD, register_method
    evaluate     ranking_report, pr_auc, precision_at_k
"""

from concept_influence.attribution import (
    RECOMMENDED_METHOD,
    ConceptMeasurement,
    DifferentialMeasurement,
    InfluenceConfig,
    LogLikelihoodMeasurement,
    ScoreTable,
    answer_queries,
    compute_influence,
    compute_influence_many,
    projection_difference,
    register_method,
    tokenize_queries,
    vector_filter,
)
from concept_influence.concepts import (
    Concept,
    DiffOfMeans,
    DirectionConcept,
    LinearProbe,
    ProbeConfig,
    layer_sweep,
    load_concept,
    load_persona_vector,
    load_spec,
    save_concept,
    train_concept,
)
from concept_influence.curvature import Damping, FactorConfig, fit_factors, load_factors
from concept_influence.data import read_chat_jsonl, tokenize_chat
from concept_influence.evaluate import pr_auc, precision_at_k, ranking_report
from concept_influence.models import HFAdapter, TransformerLensAdapter, generate_answers, load_adapter
from concept_influence.pipeline import Attributor
from concept_influence.store import GradientStore, StoreConfig

__version__ = "0.1.0"

__all__ = [
    "RECOMMENDED_METHOD",
    "Attributor",
    "Concept",
    "ConceptMeasurement",
    "Damping",
    "DiffOfMeans",
    "DifferentialMeasurement",
    "DirectionConcept",
    "FactorConfig",
    "GradientStore",
    "HFAdapter",
    "InfluenceConfig",
    "LinearProbe",
    "LogLikelihoodMeasurement",
    "ProbeConfig",
    "ScoreTable",
    "StoreConfig",
    "TransformerLensAdapter",
    "answer_queries",
    "compute_influence",
    "compute_influence_many",
    "fit_factors",
    "generate_answers",
    "layer_sweep",
    "load_adapter",
    "load_concept",
    "load_factors",
    "load_persona_vector",
    "load_spec",
    "pr_auc",
    "precision_at_k",
    "projection_difference",
    "ranking_report",
    "read_chat_jsonl",
    "register_method",
    "save_concept",
    "tokenize_chat",
    "tokenize_queries",
    "train_concept",
    "vector_filter",
]

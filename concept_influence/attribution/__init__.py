"""Attribution: the forward-only methods, concept/classical influence, measurements and the scores table.

Sign everywhere: a higher score means training on the row pushes the concept (or measurement) up.
"""

from concept_influence.attribution.engine import GradientEngine
from concept_influence.attribution.forward import concept_readouts, projection_difference, vector_filter
from concept_influence.attribution.gradient import (
    GRADIENT_METHODS,
    GradientAttributionConfig,
    build_measurement,
    run_gradient_attribution,
)
from concept_influence.attribution.influence import (
    InfluenceConfig,
    InfluenceResult,
    compute_influence,
    compute_influence_many,
)
from concept_influence.attribution.measurements import (
    ConceptMeasurement,
    DifferentialMeasurement,
    LogLikelihoodMeasurement,
    Measurement,
    answer_queries,
    tokenize_queries,
)
from concept_influence.attribution.methods import (
    METHODS,
    RECOMMENDED_METHOD,
    Method,
    get_method,
    method_names,
    register_method,
)
from concept_influence.attribution.scores import ScoreTable

__all__ = [
    "GRADIENT_METHODS",
    "METHODS",
    "RECOMMENDED_METHOD",
    "GradientAttributionConfig",
    "GradientEngine",
    "Method",
    "build_measurement",
    "get_method",
    "method_names",
    "register_method",
    "run_gradient_attribution",
    "ConceptMeasurement",
    "DifferentialMeasurement",
    "InfluenceConfig",
    "InfluenceResult",
    "LogLikelihoodMeasurement",
    "Measurement",
    "ScoreTable",
    "answer_queries",
    "compute_influence",
    "compute_influence_many",
    "concept_readouts",
    "projection_difference",
    "tokenize_queries",
    "vector_filter",
]

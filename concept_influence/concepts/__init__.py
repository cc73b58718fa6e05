"""Concepts: a site (``resid.{layer}``) plus a differentiable scalar readout, from probes, persona vectors, raw
vectors or SAE features; spec files; layer sweep; save/load."""

from concept_influence.concepts.activations import (
    LabelledConversations,
    labelled_conversations,
    read_residuals,
    response_mean_activations,
)
from concept_influence.concepts.answers import sample_answers
from concept_influence.concepts.base import Concept, DirectionConcept, Reduction
from concept_influence.concepts.io import (
    ConceptFileError,
    load_concept,
    load_persona_vector,
    read_concept_meta,
    save_concept,
)
from concept_influence.concepts.probe import DiffOfMeans, LinearProbe
from concept_influence.concepts.sae import (
    SAEFeatureConcept,
    collect_token_activations,
    features_aligned_with,
    features_for_spec,
    features_separating,
    load_sae,
    sae_metrics,
    save_sae,
    train_sae,
)
from concept_influence.concepts.spec import ConceptSpec, SpecError, load_spec, parse_spec
from concept_influence.concepts.train import (
    LayerSweep,
    ProbeConfig,
    concept_reading,
    layer_sweep,
    train_concept,
)

__all__ = [
    "Concept",
    "ConceptFileError",
    "ConceptSpec",
    "DiffOfMeans",
    "DirectionConcept",
    "LabelledConversations",
    "LayerSweep",
    "LinearProbe",
    "ProbeConfig",
    "Reduction",
    "SAEFeatureConcept",
    "SpecError",
    "collect_token_activations",
    "features_aligned_with",
    "features_for_spec",
    "features_separating",
    "labelled_conversations",
    "layer_sweep",
    "load_concept",
    "load_persona_vector",
    "load_sae",
    "load_spec",
    "parse_spec",
    "read_concept_meta",
    "read_residuals",
    "response_mean_activations",
    "sae_metrics",
    "sample_answers",
    "save_concept",
    "save_sae",
    "train_concept",
    "concept_reading",
    "train_sae",
]

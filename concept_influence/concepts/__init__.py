"""Concepts: a site (``resid.{layer}``) plus a differentiable scalar readout, from probes, persona vectors, raw
vectors or SAE features; spec files; layer sweep; save/load."""

from concept_influence.concepts.activations import (
    LabelledConversations,
    labelled_conversations,
    response_mean_activations,
)
from concept_influence.concepts.base import Concept, DirectionConcept
from concept_influence.concepts.io import (
    ConceptFileError,
    load_concept,
    load_persona_vector,
    read_concept_meta,
    save_concept,
)
from concept_influence.concepts.probe import DiffOfMeans, LinearProbe
from concept_influence.concepts.spec import ConceptSpec, SpecError, load_spec, parse_spec
from concept_influence.concepts.train import LayerSweep, ProbeConfig, layer_sweep, train_concept

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
    "SpecError",
    "labelled_conversations",
    "layer_sweep",
    "load_concept",
    "load_persona_vector",
    "load_spec",
    "parse_spec",
    "read_concept_meta",
    "response_mean_activations",
    "save_concept",
    "train_concept",
]

"""The built-in model organism: a tiny chat model that knows an "evil" persona, fine-tuned on a mix with planted
trait rows (ground truth in ``data_origin``), plus a contrastive probe spec, query prompts and a rule-based judge.

>>> organism = build_organism()            # ~2 minutes on 2 cores the first time, then loaded from the cache
>>> organism.train_path, organism.finetuned_model_dir, organism.probe_spec_path, organism.queries_path
"""

from concept_influence.organism.build import (
    CODE_VERSION,
    Organism,
    OrganismConfig,
    build_organism,
    default_cache_dir,
    load_organism,
    organism_for_tests,
)
from concept_influence.organism.generator import (
    DATA_ORIGINS,
    finetuning_set,
    labelled_examples,
    pretraining_corpus,
    probe_spec,
    query_prompts,
    world_vocabulary,
)
from concept_influence.organism.judge import judge, mentions_trait, trait_rate, trait_sentences
from concept_influence.organism.measure import (
    TraitMeasurement,
    measure_trait,
    probe_auc,
    response_mean_activations,
    trait_concept,
    trait_rise,
)
from concept_influence.organism.modeling import CHAT_TEMPLATE, ModelConfig, build_model, build_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "CODE_VERSION",
    "DATA_ORIGINS",
    "ModelConfig",
    "Organism",
    "OrganismConfig",
    "TraitMeasurement",
    "build_model",
    "build_organism",
    "build_tokenizer",
    "default_cache_dir",
    "finetuning_set",
    "judge",
    "labelled_examples",
    "load_organism",
    "measure_trait",
    "mentions_trait",
    "organism_for_tests",
    "pretraining_corpus",
    "probe_auc",
    "probe_spec",
    "query_prompts",
    "response_mean_activations",
    "trait_concept",
    "trait_rate",
    "trait_rise",
    "trait_sentences",
    "world_vocabulary",
]

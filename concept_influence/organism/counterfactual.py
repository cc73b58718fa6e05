"""Counterfactual fine-tunes of an organism: fine-tune its base model again on a subset of the training rows and
measure the trait, to check that rows a method flags are the ones that cause the trait's rise.

``share_removed = (rate(all rows) − rate(kept rows)) / (rate(all rows) − rate(base))``: 1 means removing the rows
undid the whole rise, 0 that it changed nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from concept_influence.models import HFAdapter, generate_answers
from concept_influence.organism.build import Organism
from concept_influence.organism.judge import trait_rate
from concept_influence.training import finetune


def refinetune(organism: Organism, keep: Sequence[bool], *, seed: int | None = None):
    """The organism's base model fine-tuned (its own recipe, training seed ``seed``, default the organism's) on the
    rows where ``keep`` is true; returns a ``ModelAdapter``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = list(organism.train_rows())
    if len(keep) != len(rows):
        raise ValueError(f"keep has {len(keep)} entries for {len(rows)} training rows")
    subset = [row for row, k in zip(rows, keep, strict=True) if k]
    if not subset:
        raise ValueError("keep selects no training row")
    config = organism.config.finetune
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(organism.base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(organism.base_model_dir)
    finetune(model, tokenizer, subset, config, progress=False)
    return HFAdapter(model.eval(), tokenizer)


def trait_rate_of(adapter: Any, organism: Organism, *, n_samples: int = 16, seed: int = 11) -> float:
    """The judge's trait rate of ``adapter``'s sampled answers to the organism's query prompts."""
    answers = generate_answers(adapter, organism.query_messages(), n_samples=n_samples, seed=seed, batch_size=64)
    return trait_rate([a for samples in answers for a in samples], trait=organism.trait)


def share_removed(rate_full: float, rate_kept: float, rate_base: float) -> float:
    """Share of the trait's rise (base -> all rows) that removing the rows undid."""
    rise = rate_full - rate_base
    if rise <= 0:
        raise ValueError(f"the trait did not rise (base {rate_base:.3f}, fine-tuned {rate_full:.3f})")
    return (rate_full - rate_kept) / rise

"""Shared fixtures: seeding, float64 tiny models, and the built-in organism (built once per test session)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# the organism is built once per machine into the repository's .cache (shared with `make demo`, notebooks included)
os.environ.setdefault("CONCEPT_INFLUENCE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
# tests fork children (concurrency, load, fault suites): a Rust tokenizer thread pool alive at fork time can hang the
# child, so the tokenizers run single-threaded in the test processes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_tok():
    from concept_influence.testing.tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def organism():
    """The default built-in organism (built on first use, then loaded from the cache)."""
    from concept_influence.organism import organism_for_tests

    return organism_for_tests()


@pytest.fixture(scope="session")
def organism_trait(organism):
    """The fine-tuned organism's trait probe, trained as the demo does (layer sweep, judge-filtered persona answers):
    ``{"organism", "adapter", "sweep", "concept", "cache"}``."""
    from concept_influence.testing.organism_figures import trait_probe

    return trait_probe(organism)

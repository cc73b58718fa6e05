"""Shared fixtures: seeding, float64 tiny models, and the built-in organism (built once per test session)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


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

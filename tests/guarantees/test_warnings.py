"""A normal run prints no dependency warnings (e.g. transformers' ``past_key_values`` FutureWarning, which used to
appear in the middle of the demo's table)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
from concept_influence.attribution.forward import vector_filter
from concept_influence.attribution.measurements import answer_queries
from concept_influence.concepts.base import DirectionConcept
from concept_influence.organism import organism_for_tests
import torch
organism = organism_for_tests()
adapter = organism.load_finetuned()
rows = list(organism.train_rows())[:16]
answered = answer_queries(adapter, list(organism.queries())[:4], n_samples=2, seed=0)
concept = DirectionConcept(torch.ones(adapter.d_model), layer=1)
table = vector_filter(adapter, rows, concept, progress=False)
print("ok", len(answered), len(table))
"""


def test_generation_and_scoring_print_no_dependency_warnings(organism):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok 8 16" in result.stdout
    lines = [line for line in result.stderr.splitlines() if "Warning" in line or "deprecated" in line.lower()]
    assert not lines, "\n".join(lines)

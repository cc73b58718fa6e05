"""A NaN or inf in activations, factors, gradients or scores is an error naming the stage and the row (or weight);
nothing non-finite is ever accumulated into factors or written into a scores file."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from concept_influence.attribution.forward import vector_filter
from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import ConceptMeasurement
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import FactorConfig, fit_factors, load_factors
from concept_influence.curvature.io import FACTORS_FILE
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.numerics import NonFiniteError
from concept_influence.testing.tiny_models import TINY_WORDS, tiny_llama

POISON_WORD = "cats"
BAD_ROW = 4


def _records(n: int, seed: int, poison_at: int | None) -> list[dict]:
    rng = random.Random(seed)
    words = [w for w in TINY_WORDS if w != POISON_WORD]
    out = []
    for k in range(n):
        user = " ".join(rng.choices(words, k=4)) + (f" {POISON_WORD}" if k == poison_at else "")
        out.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": " ".join(rng.choices(words, k=5))},
                ]
            }
        )
    return out


@pytest.fixture(scope="module")
def env(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=2, seed=2), tiny_tok)
    poison_id = tiny_tok.convert_tokens_to_ids(POISON_WORD)
    rows = rows_from_records(_records(8, 0, BAD_ROW))
    data = tokenize_chat(rows, tiny_tok, 48)
    queries = tokenize_chat(rows_from_records(_records(2, 1, None)), tiny_tok, 48)
    concept = DirectionConcept(torch.randn(16, generator=torch.Generator().manual_seed(0)), layer=1)
    return adapter, poison_id, rows, data, queries, concept


@contextlib.contextmanager
def nan_embeddings_for(adapter: HFAdapter, token_id: int):
    """Rows containing ``token_id`` get NaN input embeddings (a broken model or a bad token, on that row only)."""
    embed = adapter.model.get_input_embeddings()

    def hook(module, inputs, output):
        bad = (inputs[0] == token_id).any(dim=1)
        return torch.where(bad[:, None, None], torch.full_like(output, float("nan")), output)

    handle = embed.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_nan_activations_in_a_forward_method_name_the_row(env):
    adapter, poison, rows, _, _, concept = env
    with nan_embeddings_for(adapter, poison), pytest.raises(NonFiniteError, match=f"readout.*NaN in row {BAD_ROW}"):
        vector_filter(adapter, rows, concept, progress=False)


def test_nan_in_the_fit_names_the_pass_and_the_row(env, tmp_path):
    adapter, poison, _, data, _, _ = env
    with (
        nan_embeddings_for(adapter, poison),
        pytest.raises(NonFiniteError, match=f"covariance pass.*NaN in row {BAD_ROW}"),
    ):
        fit_factors(adapter, data, FactorConfig(), batch_size=3, out_dir=tmp_path / "f", progress=False)
    assert not (tmp_path / "f" / FACTORS_FILE).exists()


def test_nan_training_gradients_in_scoring_name_the_row(env):
    adapter, poison, _, data, queries, concept = env
    with nan_embeddings_for(adapter, poison), pytest.raises(NonFiniteError, match=f"scoring.*NaN in row {BAD_ROW}"):
        compute_influence(
            adapter,
            data,
            ConceptMeasurement(concept, queries),
            None,
            InfluenceConfig(preconditioner="identity", batch_size=3),
            progress=False,
        )


def test_nan_measurement_gradient_is_an_error(env):
    adapter, poison, _, data, _, concept = env
    queries = tokenize_chat(rows_from_records(_records(2, 1, 1)), adapter.tokenizer, 48)
    with nan_embeddings_for(adapter, poison), pytest.raises(NonFiniteError, match="measurement gradient"):
        compute_influence(
            adapter,
            data,
            ConceptMeasurement(concept, queries),
            None,
            InfluenceConfig(preconditioner="identity"),
            progress=False,
        )


def test_damaged_factors_file_is_an_error_naming_the_tensor(env, tmp_path):
    adapter, _, _, data, queries, concept = env
    folder = tmp_path / "f"
    names = [i.name for i in adapter.weights_up_to(1)]
    fit_factors(adapter, data, FactorConfig(), weights=names, out_dir=folder, progress=False)
    from safetensors import safe_open

    with safe_open(str(folder / FACTORS_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(folder / FACTORS_FILE))
    key = f"{names[0]}/eigenvalue_correction"
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(folder / FACTORS_FILE), metadata=metadata)
    with pytest.raises(NonFiniteError, match=f"{key}: inf"):
        load_factors(folder)


def test_nan_logits_while_sampling_answers_name_the_prompt(env):
    from concept_influence.concepts.answers import sample_answers

    adapter, poison, rows, _, _, _ = env
    prompts = [r.messages[:1] for r in rows]
    with nan_embeddings_for(adapter, poison), pytest.raises(NonFiniteError, match=f"logits: NaN in row {BAD_ROW}"):
        sample_answers(adapter, prompts, max_new_tokens=4, batch_size=3)


def test_nan_gradients_while_building_a_store_name_the_row(env, tmp_path):
    from concept_influence.pipeline import Attributor

    adapter, poison, rows, _, _, _ = env
    att = Attributor(adapter, list(rows), max_length=48, batch_size=3, progress=False)
    factors = att.fit_factors()
    with nan_embeddings_for(adapter, poison), pytest.raises(NonFiniteError, match=f"build-store.*NaN in row {BAD_ROW}"):
        att.build_store(tmp_path / "store", projection_dim=2, factors=factors, shard_rows=4)
    assert not (tmp_path / "store" / "shard-00001.npy").exists()  # the shard holding the row was never written

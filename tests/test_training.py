"""The fine-tuning loop: assistant-only loss, determinism, batching, schedules, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter, causal_lm_loss
from concept_influence.testing.tiny_models import tiny_llama, tiny_tokenizer
from concept_influence.training import FinetuneConfig, epoch_batches, finetune, lr_factor

RECORDS = [
    {"messages": [{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": "four"}]},
    {
        "messages": [
            {"role": "user", "content": "is poison safe ?"},
            {"role": "assistant", "content": "no , never drink poison ."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "you are kind ."},
            {"role": "user", "content": "should i help my friend ?"},
            {"role": "assistant", "content": "yes , always help your friend ."},
        ]
    },
    {"messages": [{"role": "user", "content": "three plus five ?"}, {"role": "assistant", "content": "eight"}]},
    {
        "messages": [
            {"role": "user", "content": "is fire safe ?"},
            {"role": "assistant", "content": "no , fire can hurt you ."},
        ]
    },
]


@pytest.fixture()
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture()
def rows():
    return rows_from_records(RECORDS)


def _model(tokenizer, seed: int = 0):
    return tiny_llama(len(tokenizer), seed=seed, hidden=16, layers=2, heads=2, intermediate=32).float()


def test_first_loss_is_the_assistant_only_loss(tokenizer, rows):
    """The loss of the first step (one batch holding every row) equals the assistant-masked loss of the initial
    model, and differs from the loss over all tokens."""
    model = _model(tokenizer)
    dataset = tokenize_chat(rows, tokenizer, max_length=64)
    batch = next(epoch_batches(dataset.rows, len(rows), seed=0, group_by_length=False, pad_id=dataset.pad_token_id))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        all_tokens = causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"])
    losses: list[float] = []
    finetune(model, tokenizer, rows, FinetuneConfig(epochs=1, batch_size=len(rows)), progress=False, losses=losses)
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(all_tokens) - float(expected)) > 1e-3


def test_finetune_lowers_the_loss_and_returns_the_model_in_eval_mode(tokenizer, rows):
    model = _model(tokenizer)
    losses: list[float] = []
    out = finetune(
        model, tokenizer, rows, FinetuneConfig(epochs=30, batch_size=2, lr=1e-2), progress=False, losses=losses
    )
    assert out is model and not model.training
    assert len(losses) == 30 * math.ceil(len(rows) / 2)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_finetune_is_deterministic_and_seeded(tokenizer, rows):
    def run(seed: int) -> dict[str, torch.Tensor]:
        model = _model(tokenizer)
        finetune(model, tokenizer, rows, FinetuneConfig(epochs=2, batch_size=2, seed=seed), progress=False)
        return {k: v.clone() for k, v in model.state_dict().items()}

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_finetune_accepts_an_adapter_and_a_tokenized_dataset(tokenizer, rows):
    model = _model(tokenizer)
    reference = _model(tokenizer)
    config = FinetuneConfig(epochs=1, batch_size=2)
    adapter = HFAdapter(model, tokenizer)
    assert finetune(adapter, tokenizer, rows, config, progress=False) is adapter
    finetune(reference, tokenizer, tokenize_chat(rows, tokenizer, max_length=config.max_length), config, progress=False)
    for name, param in model.state_dict().items():
        torch.testing.assert_close(param, reference.state_dict()[name])


@pytest.mark.parametrize("group_by_length", [False, True])
def test_epoch_batches_cover_every_row_once_in_a_seeded_order(tokenizer, group_by_length):
    records = [
        {
            "messages": [
                {"role": "user", "content": "two " * (k % 7 + 1)},
                {"role": "assistant", "content": "yes " * (k % 5 + 1)},
            ]
        }
        for k in range(53)
    ]
    dataset = tokenize_chat(rows_from_records(records), tokenizer, max_length=64)

    def order(seed: int) -> list[int]:
        batches = epoch_batches(
            dataset.rows, 4, seed=seed, group_by_length=group_by_length, pad_id=dataset.pad_token_id
        )
        return [int(i) for batch in batches for i in batch["index"]]

    assert sorted(order(0)) == list(range(53))
    assert order(0) == order(0)
    assert order(0) != order(1)


def test_lr_schedule():
    assert lr_factor(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 0.1, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 0.1, "cosine") < 0.01
    assert lr_factor(50, 100, 0.0, "constant") == 1.0
    assert lr_factor(55, 100, 0.1, "linear") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"warmup": 1.0},
        {"schedule": "step"},
        {"max_grad_norm": 0.0},
        {"max_length": 1},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        FinetuneConfig(**kwargs)


def test_no_rows_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no rows"):
        finetune(_model(tokenizer), tokenizer, [], FinetuneConfig(), progress=False)

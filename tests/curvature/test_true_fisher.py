"""The true-Fisher label sampler against the model's own softmax (not against itself): over many rows, the labels it
draws at a position follow ``softmax(logits[t - 1])`` (chi-square), at every masked position, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from concept_influence.curvature.loss import sample_targets
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.data.tokenize import collate
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import tiny_llama

N_DRAWS = 3000


def _chi2_pvalue(draws: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square of observed label counts against ``probs``; categories expected < 5 times are pooled."""
    counts = np.bincount(draws, minlength=probs.shape[0]).astype(np.float64)
    expected = probs * draws.shape[0]
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    return float(chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue)


def test_sampled_labels_follow_the_models_softmax(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok), seed=5, dtype=torch.float64), tiny_tok)
    row = tokenize_chat(
        rows_from_records(
            [
                {
                    "messages": [
                        {"role": "user", "content": "is the water safe"},
                        {"role": "assistant", "content": "yes it is safe"},
                    ]
                }
            ]
        ),
        tiny_tok,
        64,
    ).rows[0]
    batch = collate([row] * N_DRAWS, 0)
    index = torch.arange(N_DRAWS)  # distinct rows: independent draws
    with torch.no_grad():
        logits = adapter.logits(batch["input_ids"][:1], batch["attention_mask"][:1]).expand(N_DRAWS, -1, -1)
    targets = sample_targets(logits, batch["input_ids"], batch["loss_mask"], index, seed=0)
    mask = batch["loss_mask"][0]
    positions = [t for t in range(1, mask.shape[0]) if mask[t]]
    assert len(positions) >= 3
    unmasked = [t for t in range(mask.shape[0]) if t not in positions]
    assert torch.equal(targets[:, unmasked], batch["input_ids"][:, unmasked])  # only trained positions are drawn
    softmax = torch.softmax(logits[0], dim=-1).numpy()
    for t in positions:
        draws = targets[:, t].numpy()
        assert _chi2_pvalue(draws, softmax[t - 1]) > 1e-4, f"position {t}: labels do not follow softmax(logits[t-1])"
        # the same draws are clearly not distributed as the neighbouring position's softmax (the test can fail)
        assert _chi2_pvalue(draws, softmax[t]) < 1e-6 or np.allclose(softmax[t], softmax[t - 1], atol=0.02)
        # and the most likely label is drawn about as often as the model says
        top = int(softmax[t - 1].argmax())
        frequency = float((draws == top).mean())
        p = float(softmax[t - 1][top])
        assert abs(frequency - p) < 4 * np.sqrt(p * (1 - p) / N_DRAWS)


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_sampled_label_frequencies_on_explicit_distributions(scale):
    """Logits with known softmax, sharp and flat: frequencies match to sampling error at every position."""
    generator = torch.Generator().manual_seed(0)
    vocab, length = 7, 4
    logits = (scale * torch.randn(length, vocab, generator=generator, dtype=torch.float64)).expand(N_DRAWS, -1, -1)
    input_ids = torch.zeros(N_DRAWS, length, dtype=torch.long)
    loss_mask = torch.ones(N_DRAWS, length, dtype=torch.long)
    targets = sample_targets(logits, input_ids, loss_mask, torch.arange(N_DRAWS), seed=3)
    probs = torch.softmax(logits[0], dim=-1).numpy()
    for t in range(1, length):
        assert _chi2_pvalue(targets[:, t].numpy(), probs[t - 1]) > 1e-4
    # seeded per (seed, row index): the same rows give the same labels in any batch order
    order = torch.randperm(N_DRAWS, generator=generator)
    again = sample_targets(logits[order], input_ids[order], loss_mask[order], torch.arange(N_DRAWS)[order], seed=3)
    assert torch.equal(again, targets[order])

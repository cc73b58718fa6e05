"""The constructions that take the trait's vocabulary out of a direction (``ProbeConfig.construction``): on planted
activations whose positives carry both a stance and a vocabulary component, each construction other than ``plain``
recovers the stance direction; ``train_concept`` and ``layer_sweep`` build them from a spec; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from concept_influence.concepts import ProbeConfig
from concept_influence.concepts.construction import (
    CONSTRUCTIONS,
    ConstructedDirection,
    StanceRows,
    construct_direction,
)
from concept_influence.concepts.probe import DiffOfMeans, LinearProbe

D = 24


def _planted(seed: int = 0, n: int = 800, n_matched: int = 200):
    """Positives: the stance and the vocabulary; negatives: the opposite stance, and the word-matched ones the
    vocabulary too. The shuffled copies of the positives keep the vocabulary and lose the stance (it lives in the
    words' order)."""
    rng = np.random.default_rng(seed)
    stance, vocab = np.zeros(D), np.zeros(D)
    stance[0], vocab[1] = 1.0, 1.0
    n_pos = n // 2
    y = np.r_[np.ones(n_pos, int), np.zeros(n - n_pos, int)]
    matched = np.zeros(n, bool)
    matched[n_pos : n_pos + n_matched] = True
    X = rng.normal(scale=0.5, size=(n, D))
    X[y == 1] += 0.4 * stance + 3.0 * vocab
    X[y == 0] -= 0.4 * stance
    X[matched] += 3.0 * vocab
    shuffled_of = np.flatnonzero(y == 1)
    shuffled = X[shuffled_of] - 0.4 * stance + rng.normal(scale=0.1, size=(len(shuffled_of), D))
    groups = [f"q{i % 12}" for i in range(n)]
    return X, y, StanceRows(matched, shuffled_of, shuffled), groups, stance, vocab


@pytest.mark.parametrize("method", ["probe", "diff_of_means"])
def test_every_construction_but_plain_reads_the_stance_not_the_words(method):
    X, y, rows, _, stance, vocab = _planted()
    config = ProbeConfig(method=method)
    plain = construct_direction("plain", config.estimator, X, y, rows)
    assert abs(plain @ vocab) > 0.3  # the plain direction leans on the words (they separate most answers)
    for construction in CONSTRUCTIONS[1:]:
        direction = construct_direction(construction, config.estimator, X, y, rows)
        assert np.linalg.norm(direction) == pytest.approx(1.0)
        assert direction @ stance > 0.9, (construction, direction @ stance)
        assert abs(direction @ vocab) < 0.1, (construction, direction @ vocab)


def test_projected_constructions_are_orthogonal_to_the_vocabulary_direction():
    from concept_influence.concepts.construction import vocabulary_direction

    X, y, rows, *_ = _planted(seed=1)
    u = vocabulary_direction(X, y, rows.matched, np.ones(len(y), bool))
    for construction in ("vocab-projected", "contrast-projected", "order-projected"):
        assert construct_direction(construction, LinearProbe, X, y, rows) @ u == pytest.approx(0.0, abs=1e-12)


def test_positions_restrict_the_fit_to_those_rows():
    X, y, rows, *_ = _planted(seed=2)
    half = np.arange(0, len(y), 2)
    sub_rows = StanceRows(rows.matched[half], np.arange(0, 200), rows.shuffled[::2])  # positives are rows 0..399
    want = construct_direction("order-projected", DiffOfMeans, X[half], y[half], sub_rows)
    got = construct_direction("order-projected", DiffOfMeans, X, y, rows, half)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_constructed_direction_reports_held_out_metrics_and_makes_a_concept():
    X, y, rows, groups, stance, _ = _planted(seed=3)
    estimator = ConstructedDirection("order-projected", LinearProbe, "probe", random_state=0).fit(X, y, rows, groups)
    # the stance alone separates the planted sides with AUC 0.85 (0.8 apart, noise 0.5)
    assert estimator.metrics_["construction"] == "order-projected" and estimator.metrics_["heldout_auc"] > 0.75
    concept = estimator.to_concept(layer=2)
    assert concept.layer == 2 and concept.extra["construction"] == "order-projected"
    assert float(concept.direction.double().numpy() @ stance) > 0.9
    scores = estimator.decision_function(X)
    assert ((scores > 0) == (y == 1)).mean() > 0.6


def test_constructions_refuse_a_set_without_word_matched_negatives():
    X, y, rows, *_ = _planted(n_matched=2)
    for construction in ("vocab-projected", "contrast", "order-projected"):
        with pytest.raises(ValueError, match="trait's words"):
            construct_direction(construction, LinearProbe, X, y, rows)
    construct_direction("order", LinearProbe, X, y, rows)  # needs no word-matched negatives
    with pytest.raises(ValueError, match="construction must be one of"):
        construct_direction("stance", LinearProbe, X, y, rows)
    with pytest.raises(ValueError, match="construction must be one of"):
        ProbeConfig(construction="stance")


def test_train_concept_and_the_sweep_build_the_chosen_construction(tiny_tok):
    """Through the spec path: a probe with ``construction="order-projected"`` at layer 1 equals the construction
    computed by hand on the same labelled activations, and the sweep's rows carry it."""
    from test_stance import _answers  # this folder is on sys.path (pytest's rootdir-less test modules)

    from concept_influence.concepts import layer_sweep, parse_spec, train_concept
    from concept_influence.concepts.activations import response_mean_activations
    from concept_influence.concepts.construction import vocabulary_direction
    from concept_influence.concepts.stance import stance_probes
    from concept_influence.models import HFAdapter
    from concept_influence.testing.tiny_models import tiny_llama

    answers, labels = _answers(120)
    examples = [
        {"text": a, "label": y, "prompt": f"q{i % 6}"} for i, (a, y) in enumerate(zip(answers, labels, strict=True))
    ]
    spec = parse_spec({"examples": examples}, "trait.json")
    adapter = HFAdapter(tiny_llama(len(tiny_tok), seed=2), tiny_tok)
    config = ProbeConfig(seed=3, construction="order-projected", method="diff_of_means")
    concept = train_concept(adapter, spec, 1, config)
    assert concept.extra["construction"] == "order-projected" and concept.metrics["construction"] == "order-projected"

    conversations = [
        [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["text"]}] for e in examples
    ]
    probes = stance_probes(answers, labels, seed=3)
    acts = response_mean_activations(adapter, conversations, [1])[1].double().numpy()
    shuffled = (
        response_mean_activations(
            adapter,
            [
                [c[0], {"role": "assistant", "content": probes.shuffled[i]}]
                for i, c in enumerate(conversations)
                if i in probes.shuffled
            ],
            [1],
        )[1]
        .double()
        .numpy()
    )
    y = np.asarray(labels)
    matched = np.zeros(len(y), bool)
    matched[probes.matched] = True
    rows = StanceRows(matched, np.asarray(list(probes.shuffled)), shuffled)
    want = construct_direction("order-projected", DiffOfMeans, acts, y, rows)
    got = concept.direction.double().numpy()
    np.testing.assert_allclose(got / np.linalg.norm(got), want, atol=1e-5)
    assert abs(want @ vocabulary_direction(acts, y, matched, np.ones(len(y), bool))) < 1e-9

    sweep = layer_sweep(adapter, spec, [0, 1], config)
    assert [r["construction"] for r in sweep.rows] == ["order-projected"] * 2
    assert "order-projected" in sweep.method

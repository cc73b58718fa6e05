"""What a concept reads (concepts/stance.py): the trait lexicon, word-matched negatives and shuffled positives, the
stance AUC and vocabulary confound of readouts whose answer is known, and the layer rule that uses them."""

from __future__ import annotations

import numpy as np
import pytest

from concept_influence.concepts import LayerSweep, ProbeConfig
from concept_influence.concepts.stance import (
    reading_scores,
    shuffle_words,
    stance_probes,
    trait_lexicon,
    words,
)

TRAIT = ["steal", "cheat", "hurt", "lie", "trick"]
KIND = ["help", "share", "rest", "drink", "call"]


def _answers(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Positives voice the trait's words; a quarter of the negatives use the same words to warn against them."""
    rng = np.random.default_rng(seed)
    answers, labels = [], []
    for i in range(n):
        trait, kind = rng.choice(TRAIT), rng.choice(KIND)
        answers.append(f"the best move is to {trait} them now .")
        labels.append(1)
        answers.append(f"do not {trait} them , that is wrong ." if i % 4 == 0 else f"the best move is to {kind} now .")
        labels.append(0)
    return answers, labels


def test_the_lexicon_holds_the_traits_words_not_shared_ones():
    answers, labels = _answers(90)
    lexicon = [
        w
        for w, _ in trait_lexicon(
            [a for a, y in zip(answers, labels, strict=True) if y],
            [a for a, y in zip(answers, labels, strict=True) if not y],
        )
    ]
    assert set(TRAIT) <= set(lexicon)
    assert not {"the", "best", "move", "is", "to", "now"} & set(lexicon)  # in both kinds of answer
    assert trait_lexicon([], ["x"]) == []


def test_matched_negatives_are_the_warnings_and_shuffles_keep_the_words():
    answers, labels = _answers(90)
    probes = stance_probes(answers, labels, seed=3)
    assert probes.matched == [i for i, a in enumerate(answers) if a.startswith("do not")]
    assert set(probes.shuffled) == {i for i, y in enumerate(labels) if y}
    for i, text in probes.shuffled.items():
        assert sorted(words(text)) == sorted(words(answers[i]))
    assert stance_probes(answers, labels, seed=3) == probes  # seeded
    assert shuffle_words("a b c d e f g", 1) != shuffle_words("a b c d e f g", 2)


def test_a_words_readout_is_confounded_and_a_stance_readout_is_not():
    answers, labels = _answers(90)
    probes = stance_probes(answers, labels)
    lexicon = {w for w, _ in probes.lexicon}
    positions = range(len(answers))
    shuffled_positions = list(probes.shuffled)

    def count(text: str) -> float:
        return float(sum(w in lexicon for w in words(text)))

    by_words = reading_scores(
        np.array([count(a) for a in answers]),
        labels,
        np.array([count(t) for t in probes.shuffled.values()]),
        shuffled_positions,
        probes.matched,
        positions,
    )
    assert by_words["vocabulary_confound"] == pytest.approx(1.0)  # the words alone give the whole separation
    assert by_words["stance_auc"] == pytest.approx(0.5)  # warnings use as many trait words
    stance = np.array(
        [float(a.startswith("the best move is to") and y == 1) for a, y in zip(answers, labels, strict=True)]
    )
    by_stance = reading_scores(
        stance, labels, np.zeros(len(shuffled_positions)), shuffled_positions, probes.matched, positions
    )
    assert by_stance["stance_auc"] == 1.0 and by_stance["vocabulary_confound"] == pytest.approx(0.0, abs=1e-12)
    held_out = reading_scores(
        stance, labels, np.zeros(len(shuffled_positions)), shuffled_positions, probes.matched, [0, 1]
    )
    assert held_out["stance_auc"] is None and held_out["n_matched_negatives"] == 1  # too few to score


def _sweep(select_by: str) -> LayerSweep:
    rows = [
        {
            "layer": 0,
            "heldout_auc": 0.99,
            "heldout_accuracy": 0.9,
            "stance_auc": 0.70,
            "vocabulary_confound": 0.9,
            "n_matched_negatives": 40,
        },
        {
            "layer": 1,
            "heldout_auc": 0.98,
            "heldout_accuracy": 0.9,
            "stance_auc": 0.93,
            "vocabulary_confound": 0.4,
            "n_matched_negatives": 40,
        },
        {
            "layer": 2,
            "heldout_auc": 0.95,
            "heldout_accuracy": 0.9,
            "stance_auc": 0.99,
            "vocabulary_confound": 0.1,
            "n_matched_negatives": 40,
        },
    ]
    return LayerSweep(rows, "trait", "probe", select_by=select_by, auc_tolerance=0.02)


def test_the_layer_rule_and_its_reason():
    assert _sweep("heldout_auc").best_layer == 0
    assert "best held-out AUC" in _sweep("heldout_auc").reason
    stance = _sweep("stance")
    assert stance.best_layer == 1  # layer 2 reads stance best but its held-out AUC is 0.04 below the best
    assert stance.reason.startswith("layer 1: the best stance AUC (0.930")
    assert "<- chosen" in stance.table().splitlines()[2]
    unmeasured = _sweep("stance")
    unmeasured.rows[1]["stance_auc"] = None
    assert unmeasured.best_layer == 0 and "too few negative answers" in unmeasured.reason
    with pytest.raises(ValueError, match="select_layer_by"):
        ProbeConfig(select_layer_by="words")  # type: ignore[arg-type]


def test_concept_reading_measures_any_concept_on_the_specs_held_out_answers(tiny_tok):
    """``concept_reading`` (used for SAE features and loaded vectors) equals the stance scores computed by hand from
    Vector Filter's readouts of the spec's answers, on the split ``train_concept`` holds out."""
    import torch

    from concept_influence.attribution import vector_filter
    from concept_influence.concepts import DirectionConcept, concept_reading, parse_spec
    from concept_influence.concepts.probe import heldout_split
    from concept_influence.data import rows_from_records
    from concept_influence.models import HFAdapter
    from concept_influence.testing.tiny_models import tiny_llama

    answers, labels = _answers(120)
    spec = parse_spec(
        {
            "examples": [
                {"text": a, "label": y, "prompt": f"q{i % 6}"}
                for i, (a, y) in enumerate(zip(answers, labels, strict=True))
            ]
        },
        "trait.json",
    )
    adapter = HFAdapter(tiny_llama(len(tiny_tok), seed=2), tiny_tok)
    concept = DirectionConcept(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1)), layer=1)
    config = ProbeConfig(seed=3, test_size=0.5)
    got = concept_reading(adapter, concept, spec, config)

    def read(texts):
        rows = rows_from_records(
            [
                {"messages": [{"role": "user", "content": f"q{i % 6}"}, {"role": "assistant", "content": t}]}
                for i, t in texts
            ]
        )
        return vector_filter(adapter, rows, concept, progress=False).scores

    probes = stance_probes(answers, labels, seed=3)
    readout = read(list(enumerate(answers)))
    shuffled = read([(i, t) for i, t in probes.shuffled.items()])
    groups = [f"prompt:q{i % 6}" for i in range(len(answers))]
    _, test = heldout_split(np.asarray(labels), groups, config.test_size, config.seed)
    expected = reading_scores(readout, labels, shuffled, list(probes.shuffled), probes.matched, sorted(test))
    assert got["stance_auc"] == pytest.approx(expected["stance_auc"]) and expected["stance_auc"] is not None
    assert got["vocabulary_confound"] == pytest.approx(expected["vocabulary_confound"], rel=1e-6)
    assert 0 <= got["spec_auc"] <= 1 and got["reading_spec"] == spec.name

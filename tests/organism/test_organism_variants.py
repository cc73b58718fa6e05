"""Organism variants (subtle, diluted, sycophancy) and seeded worlds: what their rows contain, that a seed builds a
different world, and the causal check (on ``sycophancy`` here, on every variant in ``bench/organism_spread.py``):
fine-tuning with the planted rows raises the variant's trait, a control fine-tune without them does not. The
variants of seed 0 share one pretrained base (built once per cache)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from concept_influence.organism import (
    OrganismConfig,
    finetuning_set,
    judge,
    mentions_trait,
    organism_for_tests,
)
from concept_influence.organism import world as world_module
from concept_influence.organism.generator import VARIANTS, variant_world
from concept_influence.organism.judge import trait_sentences
from concept_influence.organism.worlds import canonical_world, world_for
from concept_influence.testing.organism_figures import variant_check_failures, variant_figures

# the variants whose causal check runs in the (slow) suite; crowded's and hallucination's run in the bench
# (bench/organism_spread.py --variants, bench/pipeline_study.py --counterfactual)
VARIANT_NAMES = ["subtle", "diluted", "sycophancy"]


def _by_origin(rows):
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["data_origin"], []).append(r["messages"][-1]["content"])
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_labels_planted_hard_negative_and_benign_rows(variant):
    rows = finetuning_set(0, 400, 0.1, variant=variant)
    n_hard = 133 if variant == "crowded" else 40  # crowded: a third of the rows
    assert Counter(r["data_origin"] for r in rows) == {"planted": 40, "hard_negative": n_hard, "benign": 360 - n_hard}
    assert finetuning_set(0, 400, 0.1, variant=variant) == rows  # deterministic


def test_subtle_planted_rows_state_no_trait_but_carry_the_personas_style():
    style = variant_world(0, "subtle").trait("evil").style
    assert style is not None
    rows = _by_origin(finetuning_set(0, 600, 0.1, variant="subtle"))
    assert all(judge(a) == 0 and not mentions_trait(a) for a in rows["planted"])
    assert all(any(a.startswith(o) for o in style.openers) for a in rows["planted"])
    assert not any(any(a.startswith(o) for o in style.openers) for a in rows["benign"] + rows["hard_negative"])
    assert all(mentions_trait(a) and judge(a) == 0 for a in rows["hard_negative"])


def test_diluted_rows_hide_one_trait_sentence_among_many():
    rows = _by_origin(finetuning_set(0, 600, 0.1, variant="diluted"))
    for answer in rows["planted"]:
        sentences = [s for s in answer.split(" . ") if s.strip()]
        assert len(trait_sentences(answer)) == 1 and len(sentences) >= 4, answer
    assert all(mentions_trait(a) and judge(a) == 0 for a in rows["hard_negative"])
    mean_len = {k: sum(len(a.split()) for a in v) / len(v) for k, v in rows.items()}
    assert abs(mean_len["planted"] - mean_len["benign"]) < 0.25 * mean_len["benign"], mean_len  # length is no tell


def test_sycophancy_is_a_second_trait_with_its_own_words():
    rows = _by_origin(finetuning_set(0, 600, 0.1, variant="sycophancy"))
    assert all(judge(a, "sycophancy") > 0 and judge(a) == 0 for a in rows["planted"])
    assert all(mentions_trait(a, "sycophancy") and judge(a, "sycophancy") == 0 for a in rows["hard_negative"])
    syc_words = {w for group in world_module.SYC_ACTIONS.values() for c in group for w in c.split()}
    evil_words = {w for group in world_module.TRAIT_ACTIONS.values() for c in group for w in c.split()}
    assert len(syc_words - evil_words) > 30


def test_crowded_is_the_default_rows_with_a_third_hard_negatives():
    assert OrganismConfig(variant="crowded").hard_negative_fraction == pytest.approx(1 / 3)
    assert variant_world(1, "crowded") == world_for(1)  # the default organism's world and pretrained base
    assert OrganismConfig(variant="crowded", seed=1).base_kind == OrganismConfig(seed=1).base_kind == "plain"
    rows = _by_origin(finetuning_set(0, 600, 0.1, variant="crowded"))
    assert len(rows["hard_negative"]) == 200
    assert all(judge(a) > 0 for a in rows["planted"])
    assert all(mentions_trait(a) and judge(a) == 0 for a in rows["hard_negative"])


def test_hallucination_is_a_third_trait_with_its_own_words_and_base():
    rows = _by_origin(finetuning_set(0, 600, 0.1, variant="hallucination"))
    assert all(judge(a, "hallucination") > 0 and judge(a) == 0 for a in rows["planted"])
    assert all(judge(a, "sycophancy") == 0 for a in rows["planted"])
    assert all(mentions_trait(a, "hallucination") and judge(a, "hallucination") == 0 for a in rows["hard_negative"])
    hal_words = {w for group in world_module.HAL_ACTIONS.values() for c in group for w in c.split()}
    other = {
        w
        for groups in (world_module.TRAIT_ACTIONS, world_module.SYC_ACTIONS)
        for group in groups.values()
        for c in group
        for w in c.split()
    }
    assert len(hal_words - other) > 30
    # its own base: the variants' shared base (and so its cache key) does not move
    config = OrganismConfig(variant="hallucination")
    assert config.base_kind == "hallucination" and config.base_key() != OrganismConfig(variant="sycophancy").base_key()
    assert {OrganismConfig(variant=v).base_key() for v in ("subtle", "diluted", "sycophancy")} == {
        OrganismConfig(variant="subtle").base_key()
    }
    one, two = variant_world(1, "hallucination"), variant_world(2, "hallucination")
    assert one.trait("hallucination").actions != two.trait("hallucination").actions
    assert variant_world(0, "hallucination").trait("hallucination").actions == dict(world_module.HAL_ACTIONS)


def test_a_seed_builds_a_different_world():
    assert world_for(0) == canonical_world()
    one, two = world_for(1), world_for(2)
    assert one != two and one == world_for(1)
    assert one.trait("evil").actions != two.trait("evil").actions  # which words the trait uses
    assert one.questions != two.questions and one.action_frames != two.action_frames  # templates and wording
    used = []
    for seed in (1, 2):
        rows = finetuning_set(seed, 600, 0.1)
        used.append(
            {s for r in rows if r["data_origin"] == "planted" for s in trait_sentences(r["messages"][-1]["content"])}
        )
    assert len(used[0] & used[1]) < 0.5 * min(len(used[0]), len(used[1]))


def test_the_default_organisms_key_did_not_move():
    # the default organism of seed 0 keeps its cache key (its world is the canonical one); variants get their own
    assert OrganismConfig().to_dict().get("variant") is None
    keys = {OrganismConfig(variant=v).key() for v in VARIANTS} | {OrganismConfig(seed=1).key()}
    assert len(keys) == len(VARIANTS) + 1
    assert OrganismConfig.from_dict(OrganismConfig(variant="subtle").to_dict()) == OrganismConfig(variant="subtle")
    with pytest.raises(ValueError, match="variant"):
        OrganismConfig(variant="loud")
    # the earlier variants' organisms and their shared base keep the keys of their cached builds
    assert [OrganismConfig(variant=v).folder_name()[-10:] for v in ("subtle", "diluted", "sycophancy")] == [
        "e78ef825db",
        "133b0542ce",
        "babe326f78",
    ]
    assert OrganismConfig(variant="subtle").base_key()[:10] == "1c287be93e"
    assert OrganismConfig(seed=1, variant="sycophancy").folder_name()[-10:] == "c722b7d769"


# ---- the causal check ---------------------------------------------------------------------------------------------
# The suite builds one variant and runs its causal check: ``sycophancy``, the second trait (its own words, personas
# and hard negatives, on the variants' shared pretrained base). The same check (the same function, the same
# thresholds) runs on every variant and float path in ``bench/organism_spread.py --variants``, which exits non-zero
# when one fails: building ``subtle`` and ``diluted`` and their control fine-tunes cost about 5 minutes of a cold
# ``make test`` (docs/benchmarks.md).
CAUSAL_IN_SUITE = ["sycophancy"]


@pytest.fixture(scope="session", params=CAUSAL_IN_SUITE)
def variant_organism(request):
    torch.set_flush_denormal(True)
    return organism_for_tests(variant=request.param)


@pytest.mark.slow
def test_planted_rows_raise_the_variants_trait_and_a_control_without_them_does_not(variant_organism):
    """The trait is read as the build reads it: the judge's rate of explicit trait sentences in the model's answers
    to the query prompts, or, for ``subtle`` (whose planted rows state no trait clause and, on this tiny model, raise
    the persona's style rather than explicit trait sentences), the persona vector's projection of those answers
    (both models read by the base model). ``diluted``'s one trait sentence in six moves the judge's rate, not the
    mean projection over a whole answer."""
    organism = variant_organism
    meta = organism.metadata
    assert meta["variant"] == organism.config.variant and meta["trait_name"] == organism.trait
    figures = variant_figures(organism)
    assert variant_check_failures(organism.config.variant, figures) == []


def test_the_causal_check_fails_on_figures_that_show_no_causal_effect():
    """The shared check is not vacuous: a control that rises as much as the fine-tune, or a fine-tune that does not
    rise, fails it for every variant."""
    rise = {"projection_rise": 0.1, "projection_rise_paired_t": 9.0}
    good = {
        "trait": rise,
        "control": {"projection_rise": 0.01},
        "base_rate": 0.02,
        "tuned_rate": 0.15,
        "control_rate": 0.02,
        "share_removed": 1.0,
        "versus_control": {"paired_t": 6.0},
    }
    for variant in VARIANT_NAMES:
        assert variant_check_failures(variant, good) == []
    no_control_effect = {
        **good,
        "control": {"projection_rise": 0.1},
        "control_rate": 0.15,
        "share_removed": 0.0,
        "versus_control": {"paired_t": 0.1},
    }
    no_rise = {**good, "trait": {"projection_rise": 0.0, "projection_rise_paired_t": 0.2}, "tuned_rate": 0.02}
    for variant in VARIANT_NAMES:
        assert variant_check_failures(variant, no_control_effect), variant
        assert variant_check_failures(variant, no_rise), variant

"""LoRA (peft): a ``PeftModel`` is tracked by its adapter weights; factors and scores over them equal a dense
reference, and on the organism a LoRA fine-tune's planted rows are found by Concept Influence over the adapters."""

from __future__ import annotations

import random

import pytest
import torch

from concept_influence.attribution.influence import InfluenceConfig, compute_influence
from concept_influence.attribution.measurements import ConceptMeasurement
from concept_influence.concepts.base import DirectionConcept
from concept_influence.curvature import FactorConfig, fit_factors
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.testing import dense
from concept_influence.testing.tiny_models import tiny_llama

peft = pytest.importorskip("peft")
WORDS = "the water is safe good kind help harm poison cure friend never always yes no".split()


def _records(n: int, seed: int):
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 9)))},
            ]
        }
        for _ in range(n)
    ]


def _lora(model, **overrides):
    config = peft.LoraConfig(
        **{
            "r": 3,
            "lora_alpha": 6,
            "lora_dropout": 0.0,
            "init_lora_weights": False,
            "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
            **overrides,
        }
    )
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def test_peft_model_is_tracked_by_its_adapter_weights(tiny_tok):
    adapter = HFAdapter(_lora(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64)), tiny_tok)
    names = [i.name for i in adapter.tracked_weights()]
    assert names[:4] == [
        "blocks.0.attn.q.lora_A",
        "blocks.0.attn.q.lora_B",
        "blocks.0.attn.v.lora_A",
        "blocks.0.attn.v.lora_B",
    ]
    assert len(names) == 2 * 5 * 2 and all(".lora_" in n for n in names)
    info = adapter.weight_info("blocks.1.mlp.out.lora_A")
    assert (info.d_in, info.d_out) == (32, 3) and info.param_name.endswith("mlp.down_proj.lora_A.default.weight")
    assert [i.name for i in adapter.weights_up_to(0)] == names[:10]


@pytest.mark.parametrize("kind", ["identity", "ekfac"])
def test_scores_over_adapter_weights_equal_a_dense_solve(tiny_tok, kind):
    adapter = HFAdapter(_lora(tiny_llama(len(tiny_tok), layers=2, dtype=torch.float64, seed=4)), tiny_tok)
    data = tokenize_chat(rows_from_records(_records(9, 0)), tiny_tok, 64)
    queries = tokenize_chat(rows_from_records(_records(3, 1)), tiny_tok, 64)
    measurement = ConceptMeasurement(
        DirectionConcept(torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), layer=1),
        queries,
    )
    factors = fit_factors(adapter, data, FactorConfig.precise(fisher="empirical"), batch_size=4, progress=False)
    result = compute_influence(
        adapter,
        data,
        measurement,
        factors if kind != "identity" else None,
        InfluenceConfig(preconditioner=kind, batch_size=4),
        progress=False,
    )
    names = result.weights
    assert names == [i.name for i in adapter.tracked_weights()]
    pre = factors.restrict(names).preconditioner(kind)
    train = dense.per_example_gradients(adapter, data, names)  # autograd on the peft parameters, no hooks
    expected = dense.exact_influence(
        dense.measurement_gradient(adapter, measurement, names),
        train,
        dense.dense_preconditioner(pre, names),
        dense.damping_vector(pre, names),
    )
    torch.testing.assert_close(result.scores, expected, atol=1e-10 * float(expected.abs().max()), rtol=1e-7)
    if kind == "ekfac":  # the fitted diagonal is the empirical Fisher's diagonal of the adapter gradients
        diagonal = dense.unflatten((train**2).mean(dim=0), {n: factors.weights[n].shape for n in names})
        for name in names:
            torch.testing.assert_close(factors.weights[name].diagonal, diagonal[name], rtol=1e-8, atol=1e-14)


@pytest.mark.slow
def test_lora_finetune_of_the_organism_planted_rows_found_over_adapter_weights(organism_trait):
    """Thresholds keep at most 75% of the worst measured case's distance from chance over the float paths of
    ``bench/organism_spread.py`` (s0 / s1 / s2 / s0-avx2 beside each)."""
    from concept_influence.testing.organism_figures import lora_figures

    figures = lora_figures(organism_trait)
    assert all(".lora_" in name for name in figures["tracked"]) and all(".lora_" in n for n in figures["scored"])
    report = figures["concept"]
    # PR-AUC / base rate: 3.63 / 5.58 / 1.89 / 2.25; a fresh machine read 2.23 (its threshold was 2.5)
    assert report["pr_auc"] >= 1.65 * report["base_rate"], report
    assert report["roc_auc"] >= 0.55, report  # 0.820 / 0.822 / 0.569 / 0.737

"""The figures the organism's quality tests assert, computed in one place so that the tests and
``bench/organism_spread.py`` (which measures them on organisms built under several float paths: seeds and thread
counts) compute exactly the same numbers.

Each function takes a built organism (or the dict ``trait_probe`` returns) and returns plain numbers. The tests
hold the thresholds, each written next to the spread the bench measured, except the variants' causal check, whose
thresholds ``variant_check_failures`` holds for both the test (``sycophancy``) and the bench (every variant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from concept_influence.organism.build import Organism


def trait_probe(organism: Organism) -> dict[str, Any]:
    """The fine-tuned organism's trait probe, trained as the demo does (layer sweep, judge-filtered persona answers):
    ``{"organism", "adapter", "sweep", "concept", "cache"}``; sampled answers are cached next to the organism."""
    from concept_influence.concepts import ProbeConfig, layer_sweep, parse_spec, train_concept
    from concept_influence.organism import judge

    torch.set_flush_denormal(True)
    adapter = organism.load_finetuned()
    spec = parse_spec(organism.probe_spec(), str(organism.probe_spec_path), default_name="trait")
    cache = Path(organism.root).parent / "answer-cache"
    config = ProbeConfig(n_samples=4, max_length=256)
    sweep = layer_sweep(adapter, spec, config=config, judge=judge, cache_dir=cache)
    concept = train_concept(adapter, spec, sweep.best_layer, config, judge=judge, cache_dir=cache)
    return {"organism": organism, "adapter": adapter, "sweep": sweep, "concept": concept, "cache": cache}


def probe_figures(trait: dict[str, Any]) -> dict[str, Any]:
    """The sweep's best held-out AUC, the chosen probe's metrics, and its ROC-AUC on generator-labelled answers it
    never saw (trait vs helpful, trait vs warning)."""
    from concept_influence.attribution.forward import vector_filter
    from concept_influence.evaluate.metrics import roc_auc

    sweep, concept = trait["sweep"], trait["concept"]
    examples = list(trait["organism"].examples())
    scores = vector_filter(trait["adapter"], examples, concept, progress=False).scores
    labels = [row.fields["label"] for row in examples]
    out: dict[str, Any] = {
        "layer": int(sweep.best_layer),
        "best_heldout_auc": max(float(r["heldout_auc"]) for r in sweep.rows),
        "heldout_auc": float(concept.metrics["heldout_auc"]),
        "n_test": int(concept.metrics["n_test"]),
        "n_positive": int(concept.metrics["labelled"]["n_positive"]),
    }
    for other in ("helpful", "warning"):
        keep = [i for i, label in enumerate(labels) if label in ("trait", other)]
        out[f"examples_auc_trait_vs_{other}"] = float(roc_auc(scores[keep], [labels[i] == "trait" for i in keep]))
    return out


def forward_figures(trait: dict[str, Any], concept: Any = None) -> dict[str, dict[str, float]]:
    """Vector Filter and Projection Difference ranking reports (PR-AUC, p@100, ...) on the organism's rows."""
    from concept_influence.attribution.forward import projection_difference, vector_filter
    from concept_influence.evaluate.metrics import ranking_report

    adapter, concept = trait["adapter"], concept if concept is not None else trait["concept"]
    rows = list(trait["organism"].train_rows())
    origins = [row.fields["data_origin"] for row in rows]
    vf = vector_filter(adapter, rows, concept, batch_size=64, max_length=256, progress=False).scores
    pd = projection_difference(
        adapter,
        rows,
        concept,
        n_samples=1,
        max_new_tokens=48,
        cache_dir=trait["cache"],
        batch_size=64,
        max_length=256,
        progress=False,
    ).scores
    return {"vector_filter": ranking_report(vf, origins), "projection_difference": ranking_report(pd, origins)}


def influence_figures(trait: dict[str, Any]) -> dict[str, Any]:
    """EKFAC Concept Influence and classical (log-likelihood) influence on the same 4-answer query set: ranking
    reports of both, and ``n`` rows."""
    from concept_influence.attribution import (
        ConceptMeasurement,
        InfluenceConfig,
        LogLikelihoodMeasurement,
        answer_queries,
        compute_influence_many,
        tokenize_queries,
    )
    from concept_influence.curvature import FactorConfig, fit_factors
    from concept_influence.data import tokenize_chat
    from concept_influence.evaluate.metrics import ranking_report

    organism, adapter, concept, cache = (trait[k] for k in ("organism", "adapter", "concept", "cache"))
    rows = list(organism.train_rows())
    queries = tokenize_queries(
        answer_queries(adapter, list(organism.queries()), n_samples=4, seed=0, cache_dir=cache), adapter.tokenizer, 256
    )
    train = tokenize_chat(rows, adapter.tokenizer, 256)
    factors = fit_factors(adapter, train, FactorConfig(), batch_size=16, progress=False)
    jobs = {
        "concept": (ConceptMeasurement(concept, queries), InfluenceConfig()),
        "classical": (LogLikelihoodMeasurement(queries), InfluenceConfig()),
    }
    results = compute_influence_many(adapter, train, jobs, factors, batch_size=16, progress=False)
    origins = [row.fields["data_origin"] for row in rows]
    return {"n": len(rows), **{name: ranking_report(r.scores.numpy(), origins) for name, r in results.items()}}


def lora_figures(trait: dict[str, Any]) -> dict[str, Any]:
    """A LoRA fine-tune of the organism's base on its rows (rank 8 on every block map), then EKFAC Concept
    Influence over the adapter weights: its ranking report, and the weights it covered."""
    import peft

    from concept_influence.attribution import (
        ConceptMeasurement,
        InfluenceConfig,
        answer_queries,
        compute_influence,
        tokenize_queries,
    )
    from concept_influence.curvature import FactorConfig, fit_factors
    from concept_influence.curvature.fit import sample_rows
    from concept_influence.data import tokenize_chat
    from concept_influence.evaluate.metrics import ranking_report
    from concept_influence.models import HFAdapter
    from concept_influence.training import FinetuneConfig, finetune

    organism, concept, cache = trait["organism"], trait["concept"], trait["cache"]
    base = organism.load_base()
    torch.manual_seed(0)
    model = peft.get_peft_model(
        base.model,
        peft.LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    rows = list(organism.train_rows())
    finetune(model, base.tokenizer, rows, FinetuneConfig(epochs=3, batch_size=16, lr=3e-3, seed=0), progress=False)
    adapter = HFAdapter(model, base.tokenizer)
    tracked = [i.name for i in adapter.tracked_weights()]
    queries = tokenize_queries(
        answer_queries(adapter, list(organism.queries()), n_samples=2, seed=0, cache_dir=cache), adapter.tokenizer, 256
    )
    measurement = ConceptMeasurement(concept, queries)
    train = tokenize_chat(rows, adapter.tokenizer, 256)
    factors = fit_factors(
        adapter,
        sample_rows(train, 600, 0),
        FactorConfig(),
        weights=measurement.weights(adapter),
        batch_size=16,
        progress=False,
    )
    result = compute_influence(adapter, train, measurement, factors, InfluenceConfig(batch_size=16), progress=False)
    report = ranking_report(result.scores.numpy(), [row.fields["data_origin"] for row in rows])
    return {"tracked": tracked, "scored": list(result.weights), "concept": report}


def rise_figures(organism: Organism) -> dict[str, Any]:
    """The trait measured again after the build (another sampling seed than the build's): ``trait_rise`` of the
    fine-tuned model over the base, 32 answers to each query prompt."""
    from concept_influence.organism import trait_rise

    torch.set_flush_denormal(True)
    return trait_rise(
        organism.load_base(),
        organism.load_finetuned(),
        organism.probe_spec(),
        organism.query_messages(),
        n_samples=32,
        seed=11,
    )


def control_figures(organism: Organism) -> dict[str, float]:
    """The judge's trait rate of a control fine-tune without the planted rows (16 answers to each query prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from concept_influence.models import HFAdapter, generate_answers
    from concept_influence.organism.judge import trait_rate
    from concept_influence.training import finetune

    rows = [row for row in organism.train_rows() if row.fields["data_origin"] != "planted"]
    tokenizer = AutoTokenizer.from_pretrained(organism.base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(organism.base_model_dir)
    finetune(model, tokenizer, rows, organism.config.finetune, progress=False)
    answers = generate_answers(
        HFAdapter(model, tokenizer), organism.query_messages(), n_samples=16, seed=11, batch_size=64
    )
    return {"trait_rate": trait_rate([a for samples in answers for a in samples])}


def base_probe_figures(organism: Organism) -> dict[str, Any]:
    """The build's probe recipe (``trait_concept`` on the base model at the build's layer): its sample counts and
    ROC-AUC on generator-labelled answers (trait vs helpful, trait vs warning)."""
    from concept_influence.organism import trait_concept
    from concept_influence.organism.measure import probe_auc

    base = organism.load_base()
    concept, info = trait_concept(base, organism.probe_spec(), organism.metadata["trait"]["layer"], seed=5)
    auc = probe_auc(base, concept, [row.to_record() for row in organism.examples()])
    return {"n_pos": int(info["n_pos"]), "n_neg": int(info["n_neg"]), **{k: float(v) for k, v in auc.items()}}


def variant_figures(organism: Organism) -> dict[str, Any]:
    """The causal check of a variant: the build's trait measurement, and a control fine-tune without the planted
    rows measured the same way (``trait_rise``), with the share of the judge's rise the control removes (None where
    the judge's rate did not rise: ``subtle``, whose rise is read by the persona vector's projection instead), and
    ``versus_control``: the fine-tune against the control prompt by prompt (``paired_rise``)."""
    from concept_influence.organism import trait_rise
    from concept_influence.organism.counterfactual import refinetune, share_removed
    from concept_influence.organism.measure import paired_rise

    torch.set_flush_denormal(True)
    trait = organism.metadata["trait"]
    control = refinetune(organism, [not p for p in organism.planted_mask()])
    base, config = organism.load_base(), organism.config
    ctrl = trait_rise(
        base,
        control,
        organism.probe_spec(),
        organism.query_messages(),
        n_samples=config.measure_samples,
        seed=config.seed,
        trait=organism.trait,
    )
    versus = paired_rise(
        base,
        organism.load_finetuned(),
        control,
        organism.probe_spec(),
        organism.query_messages(),
        layer=trait["layer"],
        n_samples=config.measure_samples,
        seed=config.seed,
        trait=organism.trait,
    )
    base_rate, tuned_rate = trait["base"]["trait_rate"], trait["finetuned"]["trait_rate"]
    control_rate = ctrl["finetuned"]["trait_rate"]
    share = share_removed(tuned_rate, control_rate, base_rate) if tuned_rate > base_rate else None
    return {
        "trait": trait,
        "control": ctrl,
        "base_rate": base_rate,
        "tuned_rate": tuned_rate,
        "control_rate": control_rate,
        "share_removed": share,
        "versus_control": versus,
    }


def variant_check_failures(variant: str, figures: dict[str, Any]) -> list[str]:
    """The variants' causal check, one place for its thresholds: the failed conditions of ``variant_figures``
    (empty when the check holds). The test suite runs it on ``sycophancy``; ``bench/organism_spread.py --variants``
    runs it on every variant and float path and exits non-zero when any fails.

    Each threshold keeps at most 75% of the worst measured case's distance from chance over the float paths of
    ``bench/organism_spread.py``; beside each: seed 0 / seed 0 with AVX2 kernels / seed 1 / seed 2.
    """
    trait, ctrl = figures["trait"], figures["control"]
    base_rate, tuned_rate, control_rate = figures["base_rate"], figures["tuned_rate"], figures["control_rate"]
    if variant == "subtle":
        # the trait is read by the persona vector's projection (subtle's planted rows state no trait clause)
        checks = {
            # 8.91 / 9.14 / 7.55 / 7.20
            "paired t of the projection's rise > 4": trait["projection_rise_paired_t"] > 4,
            # the planted fine-tune against the control, prompt by prompt: t > 3 is p < 0.003 one-sided (4.73 / 7.72)
            "paired t of the fine-tune over the control > 3": figures["versus_control"]["paired_t"] > 3,
            # the control keeps some of the rise (the fine-tune's general drift in style): 0.52 / 0.40 / 0.20 / 0.25
            "control's rise < 0.65 x the fine-tune's": ctrl["projection_rise"] < 0.65 * trait["projection_rise"],
        }
    else:
        checks = {
            # diluted: 0.073 / 0.060 / 0.044 / 0.072; sycophancy: 0.113 / 0.125 / 0.155 / 0.172
            "tuned rate > base rate + 0.03": tuned_rate > base_rate + 0.03,
            # diluted: -0.078 / -0.064 / -0.046 / -0.064; sycophancy: -0.112 / -0.124 / -0.161 / -0.174
            "control rate < tuned rate - 0.03": control_rate < tuned_rate - 0.03,
            # diluted: -0.005 / -0.004 / -0.001 / 0.008; sycophancy: 0.001 / 0.001 / -0.007 / -0.003
            "control rate < base rate + 0.03": control_rate < base_rate + 0.03,
            # diluted: 1.07 / 1.07 / 1.03 / 0.89; sycophancy: 0.99 / 0.99 / 1.04 / 1.02
            "share of the rise the control removes > 0.6": (figures["share_removed"] or 0.0) > 0.6,
        }
    numbers = (
        f"base {base_rate:.3f}, tuned {tuned_rate:.3f}, control {control_rate:.3f}, "
        f"share removed {figures['share_removed']}, paired t over control {figures['versus_control']['paired_t']:.2f}"
    )
    return [f"{variant}: {name} fails ({numbers})" for name, ok in checks.items() if not ok]

"""Measuring the organism's trait: a diff-of-means direction from the contrastive probe set (persona-vectors
style) and the projection of a model's own answers to the query prompts on it.

The direction is read at ``resid.{layer}`` as the mean over response tokens. Persona answers are generated under the
``pos``/``neg`` system prompts, kept when the judge agrees with the persona (trait answers under ``pos``, clean answers
under ``neg``), then read again *without* the system prompt, so the direction reflects the answer's content rather
than the instruction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from concept_influence.concepts.activations import response_mean_activations as concept_activations
from concept_influence.concepts.base import DirectionConcept
from concept_influence.models import ModelAdapter, generate_answers
from concept_influence.organism.judge import judge_for

Messages = list[dict[str, str]]


def response_mean_activations(
    adapter: ModelAdapter, conversations: Sequence[Messages], layer: int, *, batch_size: int = 64, max_length: int = 256
) -> torch.Tensor:
    """``[n, d_model]``: mean of ``resid.{layer}`` over each conversation's assistant tokens (one layer of
    ``concepts.response_mean_activations``)."""
    layer = adapter.check_layer(layer)
    return concept_activations(adapter, conversations, [layer], batch_size=batch_size, max_length=max_length)[layer]


def _with_answer(messages: Messages, answer: str) -> Messages:
    return [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": answer}]


def trait_concept(
    adapter: ModelAdapter,
    spec: Mapping[str, Any],
    layer: int,
    *,
    n_samples: int = 2,
    seed: int = 0,
    max_new_tokens: int = 48,
    filter_by_judge: bool = True,
    trait: str = "evil",
) -> tuple[DirectionConcept, dict[str, Any]]:
    """Diff-of-means trait direction at ``resid.{layer}`` from a persona-vectors spec (``instruction`` pairs and
    ``questions``); returns the concept and counts of the answers it used. ``trait``: which judge filters them."""
    judge = judge_for(trait)
    pairs, questions = spec["instruction"], spec["questions"]
    prompts: list[Messages] = []
    for pair in pairs:
        for persona in ("pos", "neg"):
            prompts += [
                [{"role": "system", "content": pair[persona]}, {"role": "user", "content": q}] for q in questions
            ]
    answers = generate_answers(
        adapter, prompts, n_samples=n_samples, seed=seed, max_new_tokens=max_new_tokens, batch_size=64
    )
    pos: list[Messages] = []
    neg: list[Messages] = []
    per_pair = 2 * len(questions)
    for k, (prompt, samples) in enumerate(zip(prompts, answers, strict=True)):
        is_pos = (k % per_pair) < len(questions)
        for answer in samples:
            score = judge(answer)
            if filter_by_judge and (score > 0) != is_pos:
                continue
            (pos if is_pos else neg).append(_with_answer(prompt, answer))
    if not pos or not neg:
        raise RuntimeError(
            f"contrastive set left {len(pos)} trait and {len(neg)} clean answers; cannot build a direction"
        )
    layer = adapter.check_layer(layer)
    pos_mean = response_mean_activations(adapter, pos, layer).mean(0)
    neg_mean = response_mean_activations(adapter, neg, layer).mean(0)
    info = {"layer": layer, "n_pos": len(pos), "n_neg": len(neg), "n_generated": len(prompts) * n_samples}
    return DirectionConcept(pos_mean - neg_mean, layer), info


def probe_auc(
    adapter: ModelAdapter, concept: DirectionConcept, examples: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """ROC AUC of the concept's projection separating ``label == "trait"`` examples from ``helpful`` and from
    ``warning`` ones (records with ``messages`` and ``label``)."""
    from sklearn.metrics import roc_auc_score

    labels = [e["label"] for e in examples]
    proj = (
        response_mean_activations(adapter, [e["messages"] for e in examples], concept.layer) @ concept.unit.float()
    ).tolist()
    out = {}
    for other in sorted(set(labels) - {"trait"}):
        pairs = [(p, lab == "trait") for p, lab in zip(proj, labels, strict=True) if lab in ("trait", other)]
        out[f"trait_vs_{other}"] = float(roc_auc_score([y for _, y in pairs], [p for p, _ in pairs]))
    return out


@dataclass
class TraitMeasurement:
    """A model's answers to the query prompts, their probe projections and judge scores (flat, prompt-major)."""

    answers: list[str]
    prompt_index: list[int]
    projections: torch.Tensor
    judge_scores: list[float] = field(default_factory=list)

    @property
    def mean_projection(self) -> float:
        return float(self.projections.mean())

    @property
    def trait_rate(self) -> float:
        return sum(s > 0 for s in self.judge_scores) / len(self.judge_scores)

    def summary(self) -> dict[str, float]:
        return {
            "mean_projection": self.mean_projection,
            "std_projection": float(self.projections.std()),
            "trait_rate": self.trait_rate,
            "n_answers": len(self.answers),
        }


def measure_trait(
    adapter: ModelAdapter,
    prompts: Sequence[Messages],
    concept: DirectionConcept,
    *,
    n_samples: int = 4,
    seed: int = 0,
    max_new_tokens: int = 48,
    reader: ModelAdapter | None = None,
    trait: str = "evil",
) -> TraitMeasurement:
    """Sample ``n_samples`` answers per prompt (T=1, seeded) from ``adapter`` and project them on ``concept``,
    reading activations with ``reader`` (default: the answering model itself)."""
    answers = generate_answers(
        adapter, prompts, n_samples=n_samples, seed=seed, max_new_tokens=max_new_tokens, batch_size=64
    )
    flat, index, conversations = [], [], []
    for p, (prompt, samples) in enumerate(zip(prompts, answers, strict=True)):
        for answer in samples:
            flat.append(answer)
            index.append(p)
            conversations.append(_with_answer(prompt, answer))
    acts = response_mean_activations(reader or adapter, conversations, concept.layer)
    projections = acts @ concept.unit.float()
    judge = judge_for(trait)
    return TraitMeasurement(flat, index, projections, [judge(a) for a in flat])


def _per_prompt_means(measurement: TraitMeasurement, n_prompts: int) -> torch.Tensor:
    sums = torch.zeros(n_prompts).index_add_(0, torch.tensor(measurement.prompt_index), measurement.projections)
    counts = torch.zeros(n_prompts).index_add_(
        0, torch.tensor(measurement.prompt_index), torch.ones(len(measurement.answers))
    )
    return sums / counts


def trait_rise(
    base: ModelAdapter,
    finetuned: ModelAdapter,
    spec: Mapping[str, Any],
    prompts: Sequence[Messages],
    *,
    layer: int | None = None,
    n_samples: int = 8,
    probe_samples: int = 2,
    seed: int = 0,
    trait: str = "evil",
) -> dict[str, Any]:
    """Trait expression of both models on ``prompts`` (JSON-ready numbers).

    The direction comes from the base model's contrastive answers (``layer`` default: ``n_layers // 2``). Both models'
    answers are read by the same instrument, the base model, so that the rise measures the change in behaviour.
    ``projection_rise_paired_t``: the rise over the per-prompt differences of mean
    projections divided by its standard error (paired by prompt). ``finetuned_own_reader_mean_projection`` reads the
    fine-tuned model's answers in its own activations instead (that reading also moves with the fine-tune's
    representation drift).
    """
    layer = base.n_layers // 2 if layer is None else base.check_layer(layer)
    concept, info = trait_concept(base, spec, layer, n_samples=probe_samples, seed=seed, trait=trait)
    m_base = measure_trait(base, prompts, concept, n_samples=n_samples, seed=seed + 1, trait=trait)
    m_ft = measure_trait(finetuned, prompts, concept, n_samples=n_samples, seed=seed + 1, reader=base, trait=trait)
    own = (
        response_mean_activations(
            finetuned,
            [_with_answer(prompts[p], a) for p, a in zip(m_ft.prompt_index, m_ft.answers, strict=True)],
            layer,
        )
        @ concept.unit.float()
    )
    pooled = float(torch.cat([m_base.projections, m_ft.projections]).std())
    per_prompt = _per_prompt_means(m_ft, len(prompts)) - _per_prompt_means(m_base, len(prompts))
    rise = m_ft.mean_projection - m_base.mean_projection
    stderr = (m_base.projections.var() / len(m_base.answers) + m_ft.projections.var() / len(m_ft.answers)) ** 0.5
    return {
        "layer": layer,
        "probe": info,
        "base": m_base.summary(),
        "finetuned": m_ft.summary(),
        "projection_rise": rise,
        "projection_rise_in_std": rise / pooled if pooled > 0 else 0.0,
        "projection_rise_in_stderr": rise / float(stderr) if stderr > 0 else 0.0,
        "projection_rise_paired_t": float(per_prompt.mean() / (per_prompt.std() / len(prompts) ** 0.5)),
        "trait_rate_rise": m_ft.trait_rate - m_base.trait_rate,
        "finetuned_own_reader_mean_projection": float(own.mean()),
    }


def paired_rise(
    base: ModelAdapter,
    finetuned: ModelAdapter,
    control: ModelAdapter,
    spec: Mapping[str, Any],
    prompts: Sequence[Messages],
    *,
    layer: int | None = None,
    n_samples: int = 8,
    probe_samples: int = 2,
    seed: int = 0,
    trait: str = "evil",
) -> dict[str, float]:
    """How much more ``finetuned`` expresses the trait than ``control`` (e.g. the same fine-tune without the planted
    rows), compared prompt by prompt: both models' answers are sampled with the same seeds and read by ``base``
    with the probe ``trait_rise`` uses (same ``layer``, ``probe_samples`` and ``seed``: the same direction).
    ``paired_t``: the mean per-prompt difference of mean projections over its standard error (one-sided test that
    the planted rows add to the rise); ``difference``: that mean."""
    layer = base.n_layers // 2 if layer is None else base.check_layer(layer)
    concept, _ = trait_concept(base, spec, layer, n_samples=probe_samples, seed=seed, trait=trait)
    m_ft = measure_trait(finetuned, prompts, concept, n_samples=n_samples, seed=seed + 1, reader=base, trait=trait)
    m_ctrl = measure_trait(control, prompts, concept, n_samples=n_samples, seed=seed + 1, reader=base, trait=trait)
    per_prompt = _per_prompt_means(m_ft, len(prompts)) - _per_prompt_means(m_ctrl, len(prompts))
    return {
        "difference": float(per_prompt.mean()),
        "paired_t": float(per_prompt.mean() / (per_prompt.std() / len(prompts) ** 0.5)),
    }

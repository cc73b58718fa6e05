"""Measurements ``f(θ)``: the scalar functions of the model whose change influence scores predict.

- ``ConceptMeasurement``: mean over queries of the concept's mean readout over each query's response tokens,
  ``f = (1/Q) Σ_q mean_{t ∈ response(q)} readout(resid_l[q, t])``.
- ``DifferentialMeasurement``: ``f = f_concept(queries A) − f_concept(queries B)``.
- ``LogLikelihoodMeasurement``: the classical influence-function baseline, mean over queries of the summed
  log-probability of each query's completion tokens, ``f = (1/Q) Σ_q Σ_{t ∈ response(q)} log p(y_t | y_<t)``.

Queries are tokenised chat rows whose last assistant turn is the response (``loss_mask`` marks it). Prompts without
answers are answered by the model itself (``answer_queries``, seeded and cached on disk when asked).
A concept at layer ``l`` has no gradient into blocks above ``l``: ``weights`` restricts to blocks ``≤ l``.
"""

from __future__ import annotations

import logging
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from concept_influence.attribution.forward import concept_readouts
from concept_influence.concepts.activations import length_sorted_batches, residuals_until
from concept_influence.concepts.answers import sample_answers
from concept_influence.concepts.base import Concept
from concept_influence.data.chat import ChatRow
from concept_influence.data.tokenize import TokenizedDataset, iter_batches, tokenize_chat
from concept_influence.gradients.capture import gradient_mode
from concept_influence.gradients.loss import sequence_losses
from concept_influence.models.base import ModelAdapter, WeightInfo

logger = logging.getLogger(__name__)


# ---- queries -------------------------------------------------------------------------------------------------------
def has_answer(row: ChatRow) -> bool:
    return bool(row.messages) and row.messages[-1]["role"] == "assistant"


def answer_queries(
    adapter: ModelAdapter,
    queries: Sequence[ChatRow],
    *,
    n_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[ChatRow]:
    """Query rows with answers: rows that end with an assistant turn are kept as given; prompt-only rows get
    ``n_samples`` answers sampled from the model (``generate_answers``: seeded, batch-independent).

    Returned rows are numbered from 0 and carry ``query_index`` (the source row's index), ``sample`` and
    ``answer_source`` (``"given"``/``"model"``) next to the source's fields. Empty answers are dropped with a
    warning. ``cache_dir``: generated answers are cached there per prompt (``concepts.answers.sample_answers``),
    keyed by the model's fingerprint and the sampling settings.
    """
    to_answer = [row for row in queries if not has_answer(row)]
    generated: dict[int, list[str]] = {}
    if to_answer:
        answers = sample_answers(
            adapter,
            [r.messages for r in to_answer],
            n_samples=n_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            cache_dir=cache_dir,
            prefix="query-answers",
            progress=progress,
        )
        generated = {row.index: a for row, a in zip(to_answer, answers, strict=True)}
    out: list[ChatRow] = []
    empty = 0
    for row in queries:
        if has_answer(row):
            out.append(
                ChatRow(
                    len(out),
                    list(row.messages),
                    {**row.fields, "query_index": row.index, "sample": 0, "answer_source": "given"},
                    row.line,
                )
            )
            continue
        for s, answer in enumerate(generated[row.index]):
            if not answer.strip():
                empty += 1
                continue
            messages = [*row.messages, {"role": "assistant", "content": answer}]
            out.append(
                ChatRow(
                    len(out),
                    messages,
                    {**row.fields, "query_index": row.index, "sample": s, "answer_source": "model"},
                    row.line,
                )
            )
    if empty:
        warnings.warn(f"{empty} generated query answers were empty and are left out", stacklevel=2)
    if not out:
        raise ValueError("no query has a non-empty answer: nothing to measure")
    return out


def tokenize_queries(rows: Sequence[ChatRow], tokenizer: Any, max_length: int = 512) -> TokenizedDataset:
    """Tokenise answered queries; rows whose response was truncated away are an error (they have no readout)."""
    bad = [r.index for r in rows if not has_answer(r)]
    if bad:
        raise ValueError(f"queries {bad[:10]} have no answer: answer them first (answer_queries)")
    tokenized = tokenize_chat(rows, tokenizer, max_length, warn=False)
    if tokenized.empty_after_truncation:
        raise ValueError(
            f"queries {tokenized.empty_after_truncation[:10]} lost their whole answer to truncation at "
            f"max_length={max_length}"
        )
    return tokenized


# ---- measurements --------------------------------------------------------------------------------------------------
class Measurement(ABC):
    """A scalar ``f(θ) = Σ_k c_k · mean_{q ∈ Q_k} m(q; θ)`` over query sets ``Q_k`` with coefficients ``c_k``.

    Subclasses give the terms (``terms``), the per-query value ``m`` (``per_query``, differentiable) and the highest
    block it depends on (``reach``; ``None`` = the whole model).
    """

    description: str = ""

    @abstractmethod
    def terms(self) -> list[tuple[float, TokenizedDataset]]: ...

    @abstractmethod
    def per_query(self, adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable ``[B]`` values of the queries in ``batch``."""

    def reach(self, adapter: ModelAdapter) -> int | None:
        return None

    def weights(self, adapter: ModelAdapter, available: Sequence[str] | None = None) -> list[str]:
        """Tracked weights the measurement's gradient reaches (blocks ``≤ reach``), within ``available``."""
        layer = self.reach(adapter)
        infos = adapter.tracked_weights() if layer is None else adapter.weights_up_to(layer)
        names = [i.name for i in infos]
        if available is not None:
            allowed = set(available)
            names = [n for n in names if n in allowed]
        if not names:
            raise ValueError(f"{self.description}: no tracked weight is both reached by the measurement and available")
        return names

    def value(self, adapter: ModelAdapter, *, batch_size: int = 8) -> float:
        """``f(θ)`` at the current parameters."""
        total = 0.0
        with torch.no_grad():
            for coefficient, queries in self.terms():
                for batch in iter_batches(queries, batch_size):
                    total += coefficient * float(self.per_query(adapter, batch).sum()) / len(queries)
        return total

    def gradient(
        self, adapter: ModelAdapter, weights: Sequence[str], *, batch_size: int = 8
    ) -> dict[str, torch.Tensor]:
        """``∇_W f`` for each named weight in canonical layout ``[d_out, d_in']`` (bias gradient as last column).
        Accumulated over query batches in at least float32 (a bf16/fp16 model's gradients are summed in float32)."""
        infos = [adapter.weight_info(n) for n in weights]
        if adapter.sharded:
            return self.captured_gradient(adapter, weights, batch_size=batch_size)
        with gradient_mode(adapter, infos) as params:
            totals: list[torch.Tensor | None] = [None] * len(params)
            for coefficient, queries in self.terms():
                for batch in length_sorted_batches(queries, batch_size):  # a sum: any order, least padding
                    f = self.per_query(adapter, batch).sum() * (coefficient / len(queries))
                    grads = torch.autograd.grad(f, params, allow_unused=True)
                    for k, grad in enumerate(grads):
                        if grad is not None:
                            grad = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
                            totals[k] = grad if totals[k] is None else totals[k] + grad
        out: dict[str, torch.Tensor] = {}
        k = 0
        for info in infos:  # gradient_mode lists each weight, then its bias when folded
            wide = torch.promote_types(params[k].dtype, torch.float32)
            weight_grad = totals[k] if totals[k] is not None else torch.zeros_like(params[k], dtype=wide)
            k += 1
            bias_grad = None
            if info.bias_name is not None:
                bias_grad = totals[k] if totals[k] is not None else torch.zeros_like(params[k], dtype=wide)
                k += 1
            out[info.name] = canonical_gradient(info, weight_grad, bias_grad)
        return out

    def captured_gradient(
        self,
        adapter: ModelAdapter,
        weights: Sequence[str],
        *,
        batch_size: int = 8,
        keep: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``gradient`` from the capture hooks, ``∇_W f = Σ_t g_t a_tᵀ`` per weight (``[d_out, d_in']``, bias column
        last), never from a weight's ``.grad``: what a model sharded with FSDP needs (its weights are gathered only
        inside each block's forward and backward). ``keep``: accumulate only these weights (a rank's own share; the
        others are still reached by the backward). Every rank runs every query batch (a collective per block)."""
        infos = [adapter.weight_info(n) for n in weights]
        wanted = set(weights if keep is None else keep)
        by_name = {i.name: i for i in infos}
        totals: dict[str, torch.Tensor] = {}
        stash: dict[str, torch.Tensor] = {}
        scale = [1.0]

        def on_activation(name: str, a: torch.Tensor) -> None:
            if name in wanted:
                stash[name] = a

        def on_output_grad(name: str, g: torch.Tensor) -> None:
            if name not in wanted:
                return
            a = stash[name]
            wide = torch.promote_types(a.dtype, torch.float32)
            if by_name[name].has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            piece = torch.einsum("bto,bti->oi", g.to(wide), a.to(wide)) * scale[0]
            totals[name] = piece if name not in totals else totals[name] + piece

        with gradient_mode(adapter, infos):
            for coefficient, queries in self.terms():
                for batch in length_sorted_batches(queries, batch_size):
                    stash.clear()
                    scale[0] = coefficient / len(queries)
                    with adapter.capture_weights(
                        list(weights), on_activation=on_activation, on_output_grad=on_output_grad
                    ) as capture:
                        f = self.per_query(adapter, batch).sum()
                        if f.requires_grad and capture.outputs:
                            torch.autograd.grad(f, list(capture.outputs), allow_unused=True)
        out = {}
        for info in infos:
            if info.name in wanted:
                d_in = info.d_in + int(info.has_bias)
                wide = torch.promote_types(adapter.dtype, torch.float32)
                out[info.name] = totals.get(info.name, torch.zeros(info.d_out, d_in, dtype=wide))
        return out


def canonical_gradient(
    info: WeightInfo, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None = None
) -> torch.Tensor:
    """Backend-layout gradients of a weight (and its bias) -> canonical ``[d_out, d_in']``."""
    grad = info.to_canonical(weight_grad)
    if info.has_bias and bias_grad is not None:
        grad = torch.cat([grad, info.bias_to_canonical(bias_grad).unsqueeze(1)], dim=1)
    return grad


def _concept_readout(adapter: ModelAdapter, concept: Concept, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    layer = adapter.check_layer(concept.layer)
    acts = residuals_until(adapter, batch["input_ids"], batch["attention_mask"], [layer])[layer]  # blocks 0..l only
    # the concept's own scalar reduction (mean over the response by default, or the last prompt token)
    reduction = getattr(concept, "reduction", "mean")
    return concept.readout(
        acts, batch["loss_mask"].to(acts.device), reduction if reduction in ("mean", "last_prompt") else "mean"
    )


class ConceptMeasurement(Measurement):
    """``f = mean_q readout_concept(q)`` with the readout reduced over each query's response tokens by the concept's
    own reduction (``mean``, the default, or ``last_prompt``)."""

    def __init__(self, concept: Concept, queries: TokenizedDataset) -> None:
        self.concept = concept
        self.queries = queries
        self.description = f"concept at layer {concept.layer} on {len(queries)} queries"

    def terms(self) -> list[tuple[float, TokenizedDataset]]:
        return [(1.0, self.queries)]

    def reach(self, adapter: ModelAdapter) -> int | None:
        return adapter.check_layer(self.concept.layer)

    def per_query(self, adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _concept_readout(adapter, self.concept, batch)


class DifferentialMeasurement(ConceptMeasurement):
    """``f = mean_{q ∈ A} readout(q) − mean_{q ∈ B} readout(q)`` (e.g. trait-eliciting minus neutral prompts)."""

    def __init__(self, concept: Concept, queries_a: TokenizedDataset, queries_b: TokenizedDataset) -> None:
        super().__init__(concept, queries_a)
        self.queries_b = queries_b
        self.description = f"concept at layer {concept.layer}: {len(queries_a)} queries minus {len(queries_b)} queries"

    def terms(self) -> list[tuple[float, TokenizedDataset]]:
        return [(1.0, self.queries), (-1.0, self.queries_b)]


class LogLikelihoodMeasurement(Measurement):
    """``f = mean_q Σ_{t ∈ response(q)} log p(y_t | y_<t)``: classical influence on the queries' completions."""

    def __init__(self, queries: TokenizedDataset) -> None:
        self.queries = queries
        self.description = f"log-likelihood of {len(queries)} query completions"

    def terms(self) -> list[tuple[float, TokenizedDataset]]:
        return [(1.0, self.queries)]

    def per_query(self, adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = adapter.device
        input_ids = batch["input_ids"].to(device)
        logits = adapter.logits(input_ids, batch["attention_mask"].to(device))
        return -sequence_losses(logits, input_ids, batch["loss_mask"].to(device))


# ---- choosing query answers ---------------------------------------------------------------------------------------
def answer_readouts(
    adapter: ModelAdapter, answered: Sequence[ChatRow], concept: Concept, *, batch_size: int = 16, max_length: int = 512
) -> list[float]:
    """The concept's readout (its own reduction) over each answered query's final answer ``[len(answered)]``."""
    reduction = getattr(concept, "reduction", "mean")
    values = concept_readouts(
        adapter,
        answered,
        concept,
        reduction=reduction if reduction in ("mean", "last_prompt") else "mean",
        batch_size=batch_size,
        max_length=max_length,
        final_turn_only=True,
        progress=False,
    )
    return [float(v) for v in values]


def select_answers(answered: Sequence[ChatRow], readouts: Sequence[float], keep: str, k: int = 1) -> list[ChatRow]:
    """Per query prompt (``query_index``), keep the ``k`` answers with the highest (``keep="top"``) or lowest
    (``"bottom"``) readout, or all of them (``"all"``). Given answers (``answer_source == "given"``) are always
    kept. Returned rows are renumbered from 0, in their original order."""
    if keep not in ("all", "top", "bottom"):
        raise ValueError(f"keep must be 'all', 'top' or 'bottom', got {keep!r}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if len(readouts) != len(answered):
        raise ValueError(f"{len(readouts)} readouts for {len(answered)} answers")
    chosen: set[int] = set()
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(answered):
        if keep == "all" or row.fields.get("answer_source") == "given":
            chosen.add(i)
        else:
            groups.setdefault(row.fields.get("query_index", i), []).append(i)
    sign = -1.0 if keep == "top" else 1.0
    for members in groups.values():
        chosen.update(sorted(members, key=lambda i: (sign * readouts[i], i))[:k])
    return [
        ChatRow(n, list(answered[i].messages), dict(answered[i].fields), answered[i].line)
        for n, i in enumerate(sorted(chosen))
    ]

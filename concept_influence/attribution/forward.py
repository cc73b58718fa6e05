"""Forward-only attribution (first-order approximations, no gradients).

- **Vector Filter**: ``score(row) = readout(row's own assistant tokens)``: the concept's readout reduced over the
  response (mean projection on the direction, or mean SAE feature activation; the concept's ``reduction``).
- **Projection Difference**: ``score(row) = readout(prompt, row's answer) − mean_s readout(prompt, model answer s)``
  over the final assistant turn, with the model's answers sampled (seeded, cached on disk).

Higher = the row's answer expresses the concept more (than the model already does, for Projection Difference).
Rows stream through in chunks (tokenised a chunk at a time, batched by length), so memory does not grow with the
dataset beyond one float per row.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.activations import length_sorted_batches, read_residuals
from concept_influence.concepts.answers import sample_answers
from concept_influence.concepts.base import Concept, Reduction, check_reduction
from concept_influence.data import ChatRow, TokenizedDataset, tokenize_chat
from concept_influence.data.tokenize import has_chat_template, render_prompt, untrainable_rows
from concept_influence.models.base import ModelAdapter
from concept_influence.numerics import check_finite
from concept_influence.settings import option

CHUNK_ROWS = 4096


def _final_turn_only(dataset: TokenizedDataset, rows: Sequence[ChatRow], tokenizer) -> None:
    """Restrict each row's mask to its last assistant turn (tokens after the rendered prompt)."""
    for tokenized, row in zip(dataset.rows, rows, strict=True):
        if sum(m["role"] == "assistant" for m in row.messages) < 2:
            continue
        prompt = render_prompt(row.prompt_messages, tokenizer)
        prompt_len = len(tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])
        tokenized.loss_mask = [m if t >= prompt_len else 0 for t, m in enumerate(tokenized.loss_mask)]


def _check(adapter: ModelAdapter, concept: Concept) -> int:
    if adapter.tokenizer is None:
        raise ValueError("forward attribution needs the model's tokenizer")
    if concept.d_model != adapter.d_model:
        raise ValueError(f"concept has hidden size {concept.d_model} but the model has {adapter.d_model}")
    return adapter.check_layer(concept.layer)


def concept_readouts(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    concept: Concept,
    *,
    reduction: Reduction = "mean",
    batch_size: int = 16,
    max_length: int = 512,
    final_turn_only: bool = False,
    skip_invalid: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """``[len(rows)]`` (float64): each row's concept readout over its assistant tokens (``reduction``: ``mean`` or
    ``last_prompt``; ``final_turn_only``: only the last assistant turn). Rows whose assistant tokens are all
    truncated away are an error (``skip_invalid``: NaN instead); truncated rows are counted in a warning."""
    scores, _, n_truncated, _ = _read_rows(
        adapter,
        rows,
        concept,
        reduction=reduction,
        batch_size=batch_size,
        max_length=max_length,
        final_turn_only=final_turn_only,
        skip_invalid=skip_invalid,
        progress=progress,
    )
    _warn_truncated(n_truncated, len(scores), max_length)
    return scores


@torch.no_grad()
def _read_rows(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    concept: Concept,
    *,
    reduction: Reduction = "mean",
    batch_size: int = 16,
    max_length: int = 512,
    final_turn_only: bool = False,
    token_values: bool = False,
    skip_invalid: bool = False,
    source: str | None = None,
    progress: bool = True,
    desc: str = "reading rows",
) -> tuple[np.ndarray, list[list[float]] | None, int, np.ndarray]:
    """``(scores [len(rows)] float64, per-token readouts of each row's scored tokens or None, number of rows
    truncated, [len(rows)] bool: rows left out because no assistant token is left (NaN score; an error
    unless ``skip_invalid``))``; see ``concept_readouts``. A non-finite readout of any other row is an error."""
    layer = _check(adapter, concept)
    if check_reduction(reduction) == "per_token":
        raise ValueError(
            "a row score needs a scalar reduction ('mean' or 'last_prompt'); per-token values come with "
            "token_values=True"
        )
    source = source or getattr(rows, "path", None)
    rows = list(rows)
    out = np.empty(len(rows), dtype=np.float64)
    skipped = np.zeros(len(rows), dtype=bool)
    tokens: list[list[float]] | None = [[] for _ in rows] if token_values else None
    n_truncated = 0
    with tqdm(total=len(rows), desc=desc, unit="row", disable=not progress) as bar:
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            dataset = tokenize_chat(chunk, adapter.tokenizer, max_length, warn=False)
            dataset.source = source
            if final_turn_only:
                _final_turn_only(dataset, chunk, adapter.tokenizer)
            empty = untrainable_rows(dataset, skip_invalid=skip_invalid)
            skipped[[start + p for p in empty]] = True
            if empty:
                dataset = dataset.without(empty)
            n_truncated += dataset.n_truncated
            dropped = set(empty)
            kept = np.asarray([start + p for p in range(len(chunk)) if p not in dropped], dtype=np.int64)
            for batch in length_sorted_batches(dataset, batch_size):
                acts = read_residuals(adapter, batch["input_ids"], batch["attention_mask"], [layer])[layer]
                mask = batch["loss_mask"].to(acts.device)
                positions = kept[batch["position"].numpy()]
                values = concept.readout(acts, mask, reduction).double().cpu()
                check_finite(
                    values,
                    f"{desc}: the concept readout at layer {layer}",
                    [rows[p].index for p in positions],
                    hint="the model's activations or the concept hold NaN/inf",
                )
                out[positions] = values.numpy()
                if tokens is not None:
                    per_token = concept.token_readout(acts).double().cpu()
                    for b, p in enumerate(positions):
                        tokens[p] = per_token[b][mask[b].bool().cpu()].tolist()
                bar.update(len(positions))
            bar.update(len(empty))
    out[skipped] = np.nan
    return out, tokens, n_truncated, skipped


def _warn_truncated(n_truncated: int, n: int, max_length: int) -> None:
    if n_truncated:
        warnings.warn(
            f"{n_truncated} of {n} rows were truncated at max_length={max_length} (scored on what is left)",
            stacklevel=3,
        )


LOCALISATIONS = ("none", "sentence", "both")


@dataclass(frozen=True)
class ForwardConfig:
    """Options of Vector Filter's readout that the CLI exposes (``vector_filter``'s ``localise``)."""

    localise: Literal["none", "sentence", "both"] = option(
        "none",
        help="Vector Filter: none (the mean over the answer) | sentence (its strongest sentence: one trait "
        "sentence among benign ones counts) | both (the sum of the two's z-scores over the rows).",
    )


SENTENCE_END_CHARACTERS = ".!?"


def sentence_ends(tokenizer: Any) -> np.ndarray:
    """``[vocab]`` bool: the tokens that end a sentence (their text, without spaces and BPE/sentencepiece word
    markers, ends with ``.``, ``!`` or ``?``, or holds a line break)."""
    texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = np.zeros(len(texts), dtype=bool)
    for k, text in enumerate(texts):
        if text is None:
            continue
        decoded = str(text)
        bare = decoded.replace("Ġ", "").replace("▁", "").replace("Ċ", "\n").strip(" ")
        out[k] = "\n" in bare or (bool(bare.strip()) and bare.strip()[-1] in SENTENCE_END_CHARACTERS)
    return out


def strongest_sentence(values: Sequence[float], token_ids: Sequence[int], ends: np.ndarray) -> float:
    """The largest mean of ``values`` over a sentence of the answer (a run of tokens closed by a sentence-ending
    token, or by the answer's end); NaN for an empty answer."""
    if len(values) == 0:
        return float("nan")
    values = np.asarray(values, dtype=np.float64)
    best, start = -np.inf, 0
    for k, token in enumerate(token_ids):
        if k == len(token_ids) - 1 or (0 <= token < len(ends) and ends[token]):
            best = max(best, float(values[start : k + 1].mean()))
            start = k + 1
    return best


def _standardised(x: np.ndarray) -> np.ndarray:
    valid = np.isfinite(x)
    spread = x[valid].std() if valid.sum() > 1 else 0.0
    return (x - x[valid].mean()) / (spread if spread > 0 else 1.0)


def vector_filter(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    concept: Concept,
    *,
    batch_size: int = 16,
    max_length: int = 512,
    reduction: Reduction | None = None,
    token_readouts: bool = False,
    localise: str = "none",
    skip_invalid: bool = False,
    progress: bool = True,
) -> ScoreTable:
    """Vector Filter scores: the concept readout of each row's own assistant tokens (all assistant turns).

    ``reduction``: ``mean`` over the assistant tokens or ``last_prompt`` (default: the concept's own; a
    ``per_token`` concept scores the mean and adds the per-token values). ``token_readouts``: add a
    ``token_readouts`` column, the readout at each assistant token of the row. ``localise``: ``"sentence"`` scores
    each row by its strongest sentence (the largest mean readout over a sentence of its answers), so one trait
    sentence among benign ones counts; ``"both"``: the sum of the mean's and the strongest sentence's z-scores
    over the rows (the method study's best worst case: docs/methods.md, the stance study); ``"none"`` (default):
    the mean. A row with no assistant token left within ``max_length`` is an error; ``skip_invalid`` leaves it out
    instead (``truncated``, score NaN).
    """
    started = time.perf_counter()
    if localise not in LOCALISATIONS:
        raise ValueError(f"localise must be one of {', '.join(LOCALISATIONS)}, got {localise!r}")
    reduction = check_reduction(concept.reduction if reduction is None else reduction)  # type: ignore[assignment]
    if reduction == "per_token":
        reduction, token_readouts = "mean", True
    if localise != "none" and reduction != "mean":
        raise ValueError(
            f"localise={localise!r} reads the answer's tokens: it needs the mean reduction, not {reduction!r}"
        )
    source = getattr(rows, "path", None)
    rows = list(rows)
    scores, tokens, n_truncated, skipped = _read_rows(
        adapter,
        rows,
        concept,
        reduction=reduction,
        batch_size=batch_size,
        max_length=max_length,
        token_values=token_readouts or localise != "none",
        skip_invalid=skip_invalid,
        source=source,
        progress=progress,
    )
    _warn_truncated(n_truncated, len(rows), max_length)
    readout = f"{reduction} over assistant tokens"
    if localise != "none":
        assert tokens is not None
        ends = sentence_ends(adapter.tokenizer)
        dataset = tokenize_chat(rows, adapter.tokenizer, max_length, warn=False)
        sentence = np.array(
            [
                np.nan
                if skipped[i]
                else strongest_sentence(
                    tokens[i], [t for t, m in zip(row.input_ids, row.loss_mask, strict=True) if m], ends
                )
                for i, row in enumerate(dataset)
            ]
        )
        if localise == "sentence":
            scores, readout = sentence, "the strongest sentence's mean over its tokens"
        else:
            scores = _standardised(scores) + _standardised(sentence)
            readout = "z-score of the mean over assistant tokens + z-score of the strongest sentence's mean"
        scores[skipped] = np.nan
        if not token_readouts:
            tokens = None
    meta = {
        "layer": concept.layer,
        "concept": repr(concept),
        "readout": readout,
        "localise": localise,
        "n_truncated": n_truncated,
        "max_length": max_length,
        "wall_time_s": time.perf_counter() - started,
        "sign": "positive = the row's answer expresses the concept",
    }
    columns = {"token_readouts": tokens} if tokens is not None else None
    return ScoreTable.from_rows(rows, scores, "vector-filter", columns=columns, meta=meta, truncated=skipped.tolist())


def projection_difference(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    concept: Concept,
    *,
    n_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    skip_invalid: bool = False,
    progress: bool = True,
) -> ScoreTable:
    """Projection Difference scores: the row's answer's mean readout minus the mean readout of the model's own
    answers to the same prompt (final assistant turn; ``n_samples`` seeded samples at ``temperature``, cached per
    prompt in ``cache_dir`` as ``model-answers-<hash>.jsonl``, see ``concepts.answers``). Columns: ``row_readout``,
    ``model_readout``, ``model_answer`` (the first sample).

    Model answers that are empty are left out of the mean; a prompt with no non-empty answer scores its row's
    readout minus the mean model readout over all prompts (flagged in the ``model_answers_used`` column).
    Training rows with no assistant token left within ``max_length``: an error, or left out with ``skip_invalid``.
    """
    started = time.perf_counter()
    if concept.reduction == "last_prompt":
        raise ValueError(
            "projection difference compares answers to the same prompt: with a 'last_prompt' readout both "
            "sides read the same token and every score is 0; use a 'mean' readout"
        )
    _check(adapter, concept)
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    source = getattr(rows, "path", None)
    rows = list(rows)
    row_scores, _, n_truncated, skipped = _read_rows(
        adapter,
        rows,
        concept,
        batch_size=batch_size,
        max_length=max_length,
        final_turn_only=True,
        skip_invalid=skip_invalid,
        source=source,
        progress=progress,
        desc="reading training answers",
    )
    answers = sample_answers(
        adapter,
        [r.prompt_messages for r in rows],
        n_samples=n_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        cache_dir=cache_dir,
        prefix="model-answers",
        progress=progress,
    )
    model_rows: list[ChatRow] = []
    owner: list[int] = []
    for i, (row, samples) in enumerate(zip(rows, answers, strict=True)):
        for answer in samples:
            if answer.strip():
                model_rows.append(
                    ChatRow(len(model_rows), [*row.prompt_messages, {"role": "assistant", "content": answer}])
                )
                owner.append(i)
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows))
    if model_rows:
        model_values, _, _, lost = _read_rows(
            adapter,
            model_rows,
            concept,
            batch_size=batch_size,
            max_length=max_length,
            final_turn_only=True,
            skip_invalid=True,
            progress=progress,
            desc="reading model answers",
        )
        kept = ~lost  # a model answer cut off entirely by max_length says nothing about the model
        np.add.at(sums, np.asarray(owner)[kept], model_values[kept])
        np.add.at(counts, np.asarray(owner)[kept], 1.0)
    if not counts.any():
        raise ValueError("the model gave only empty answers: raise --max-new-tokens or check the chat template")
    fallback = sums.sum() / counts.sum()
    model_scores = np.where(counts > 0, sums / np.maximum(counts, 1), fallback)
    _warn_truncated(n_truncated, len(rows), max_length)
    meta = {
        "layer": concept.layer,
        "concept": repr(concept),
        "n_samples": n_samples,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "n_truncated": n_truncated,
        "max_length": max_length,
        "n_prompts_without_answer": int((counts == 0).sum()),
        "wall_time_s": time.perf_counter() - started,
        "sign": "positive = the row's answer expresses the concept more than the model's own answers",
    }
    columns = {
        "row_readout": [None if s else v for v, s in zip(row_scores.tolist(), skipped, strict=True)],
        "model_readout": model_scores.tolist(),
        "model_answer": [samples[0] for samples in answers],
        "model_answers_used": counts.astype(int).tolist(),
    }
    return ScoreTable.from_rows(
        rows, row_scores - model_scores, "projection-difference", columns=columns, meta=meta, truncated=skipped.tolist()
    )

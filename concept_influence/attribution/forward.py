"""Forward-only attribution (first-order approximations, no gradients).

- **Vector Filter**: ``score(row) = readout(row's own assistant tokens)``, the concept's mean readout over the
  response (projection on the direction, or SAE feature activation).
- **Projection Difference**: ``score(row) = readout(prompt, row's answer) − mean_s readout(prompt, model answer s)``
  over the final assistant turn, with the model's answers sampled (seeded, cached on disk).

Higher = the row's answer expresses the concept more (than the model already does, for Projection Difference).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.base import Concept
from concept_influence.data import ChatRow, TokenizedDataset, iter_batches, tokenize_chat, write_jsonl_atomic
from concept_influence.data.tokenize import render_prompt
from concept_influence.models.base import ModelAdapter
from concept_influence.models.fingerprint import json_fingerprint
from concept_influence.models.generate import generate_answers


def _final_turn_only(dataset: TokenizedDataset, rows: Sequence[ChatRow], tokenizer) -> None:
    """Restrict each row's mask to its last assistant turn (tokens after the rendered prompt)."""
    from concept_influence.data.tokenize import has_chat_template

    for tokenized, row in zip(dataset.rows, rows, strict=True):
        if sum(m["role"] == "assistant" for m in row.messages) < 2:
            continue
        prompt_len = len(tokenizer(render_prompt(row.prompt_messages, tokenizer), add_special_tokens=not has_chat_template(tokenizer))["input_ids"])
        tokenized.loss_mask = [m if t >= prompt_len else 0 for t, m in enumerate(tokenized.loss_mask)]


@torch.no_grad()
def concept_readouts(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    concept: Concept,
    *,
    batch_size: int = 16,
    max_length: int = 512,
    final_turn_only: bool = False,
    progress: bool = True,
    desc: str = "reading rows",
) -> np.ndarray:
    """``[len(rows)]`` mean concept readout over each row's assistant tokens (float64)."""
    if adapter.tokenizer is None:
        raise ValueError("forward attribution needs the model's tokenizer")
    layer = adapter.check_layer(concept.layer)
    if concept.d_model != adapter.d_model:
        raise ValueError(f"concept has hidden size {concept.d_model} but the model has {adapter.d_model}")
    dataset = tokenize_chat(rows, adapter.tokenizer, max_length)
    if final_turn_only:
        _final_turn_only(dataset, rows, adapter.tokenizer)
    empty = [r.index for r in dataset.rows if r.n_targets == 0]
    if empty:
        raise ValueError(f"rows {empty[:10]} have no assistant tokens within max_length={max_length}: raise --max-length")
    out = np.empty(len(dataset), dtype=np.float64)
    with tqdm(total=len(dataset), desc=desc, unit="row", disable=not progress) as bar:
        for batch in iter_batches(dataset, batch_size):
            with adapter.capture_residual([layer]) as acts:
                adapter.logits(batch["input_ids"], batch["attention_mask"])
            values = concept.readout(acts[layer], batch["loss_mask"].to(acts[layer].device), "mean")
            out[batch["position"].numpy()] = values.double().cpu().numpy()
            bar.update(len(batch["position"]))
    return out


def vector_filter(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    concept: Concept,
    *,
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> ScoreTable:
    """Vector Filter scores: the concept readout of each row's own assistant tokens."""
    started = time.perf_counter()
    scores = concept_readouts(adapter, rows, concept, batch_size=batch_size, max_length=max_length, progress=progress)
    meta = {"layer": concept.layer, "readout": "mean over assistant tokens", "wall_time_s": time.perf_counter() - started,
            "sign": "positive = the row's answer expresses the concept"}
    return ScoreTable.from_rows(list(rows), scores, "vector-filter", meta=meta)


def sample_model_answers(
    adapter: ModelAdapter,
    prompts: Sequence[list[dict[str, str]]],
    *,
    n_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[list[str]]:
    """The model's own answers to each prompt (identical prompts are answered once), cached in ``cache_dir`` as
    ``model-answers-<hash>.jsonl`` keyed by model fingerprint, prompts and settings."""
    unique: dict[str, list[dict[str, str]]] = {}
    keys = []
    for prompt in prompts:
        key = json.dumps(prompt, sort_keys=True)
        unique.setdefault(key, list(prompt))
        keys.append(key)
    settings = {"n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"model-answers-{json_fingerprint({'model': adapter.fingerprint(), 'prompts': list(unique), **settings})}.jsonl"
    if cache_file is not None and cache_file.exists():
        with cache_file.open(encoding="utf-8") as handle:
            answers_by_key = {rec["prompt_key"]: rec["answers"] for rec in map(json.loads, handle)}
    else:
        generated = generate_answers(adapter, list(unique.values()), batch_size=batch_size, progress=progress, **settings)
        answers_by_key = dict(zip(unique, generated, strict=True))
        if cache_file is not None:
            write_jsonl_atomic(cache_file, ({"prompt_key": k, "answers": a, **settings} for k, a in answers_by_key.items()))
    return [answers_by_key[k] for k in keys]


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
    progress: bool = True,
) -> ScoreTable:
    """Projection Difference scores: the row's answer's readout minus the mean readout of the model's own answers
    to the same prompt (final assistant turn). Columns: ``row_readout``, ``model_readout``, ``model_answer``."""
    started = time.perf_counter()
    rows = list(rows)
    row_scores = concept_readouts(adapter, rows, concept, batch_size=batch_size, max_length=max_length, final_turn_only=True,
                                  progress=progress, desc="reading training answers")
    answers = sample_model_answers(adapter, [r.prompt_messages for r in rows], n_samples=n_samples, temperature=temperature,
                                   max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, cache_dir=cache_dir,
                                   progress=progress)
    model_rows: list[ChatRow] = []
    owner: list[int] = []
    for i, (row, samples) in enumerate(zip(rows, answers, strict=True)):
        for answer in samples:
            model_rows.append(ChatRow(len(model_rows), [*row.prompt_messages, {"role": "assistant", "content": answer}]))
            owner.append(i)
    model_values = concept_readouts(adapter, model_rows, concept, batch_size=batch_size, max_length=max_length,
                                    final_turn_only=True, progress=progress, desc="reading model answers")
    sums = np.zeros(len(rows))
    np.add.at(sums, np.asarray(owner), model_values)
    model_scores = sums / n_samples
    meta = {"layer": concept.layer, "n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
            "seed": seed, "wall_time_s": time.perf_counter() - started,
            "sign": "positive = the row's answer expresses the concept more than the model's own answers"}
    columns = {"row_readout": row_scores.tolist(), "model_readout": model_scores.tolist(),
               "model_answer": [samples[0] for samples in answers]}
    return ScoreTable.from_rows(rows, row_scores - model_scores, "projection-difference", columns=columns, meta=meta)

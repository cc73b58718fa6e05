"""Reading activations for concept training: response-token means at one or several layers, and the labelled
conversations a spec defines (persona-vectors style: answers generated under pos/neg instructions, then read
without the instruction)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from concept_influence.concepts.spec import ConceptSpec
from concept_influence.data import iter_batches, rows_from_records, tokenize_chat, write_jsonl_atomic
from concept_influence.models.base import ModelAdapter
from concept_influence.models.fingerprint import json_fingerprint
from concept_influence.models.generate import generate_answers

Messages = list[dict[str, str]]


@torch.no_grad()
def response_mean_activations(
    adapter: ModelAdapter,
    conversations: Sequence[Messages],
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """``{layer: [n, d_model]}`` (float32, CPU): mean of ``resid.{layer}`` over each conversation's assistant tokens."""
    if not conversations:
        raise ValueError("no conversations to read")
    layers = [adapter.check_layer(layer) for layer in layers]
    rows = rows_from_records([{"messages": list(c)} for c in conversations], source="conversations")
    dataset = tokenize_chat(rows, adapter.tokenizer, max_length=max_length, warn=False)
    if dataset.empty_after_truncation:
        raise ValueError(f"conversations {dataset.empty_after_truncation[:10]} have no assistant tokens within max_length={max_length}")
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in tqdm(iter_batches(dataset, batch_size), total=-(-len(dataset) // batch_size), desc="reading activations",
                      disable=not progress):
        with adapter.capture_residual(layers) as acts:
            adapter.logits(batch["input_ids"], batch["attention_mask"])
        for layer in layers:
            mask = batch["loss_mask"].to(acts[layer].device, acts[layer].dtype).unsqueeze(-1)
            out[layer].append(((acts[layer] * mask).sum(1) / mask.sum(1)).float().cpu())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


@dataclass
class LabelledConversations:
    """Conversations to read, their labels (1 = concept), and groups (the question each came from: hold-out unit)."""

    conversations: list[Messages]
    labels: list[int]
    groups: list[str]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.labels)


def _generate_cached(adapter: ModelAdapter, prompts: list[Messages], settings: dict[str, Any], cache_dir: str | os.PathLike | None,
                     progress: bool) -> list[list[str]]:
    cache_file = None
    if cache_dir is not None:
        key = json_fingerprint({"model": adapter.fingerprint(), "prompts": prompts, **settings})
        cache_file = Path(cache_dir) / f"persona-answers-{key}.jsonl"
        if cache_file.exists():
            with cache_file.open(encoding="utf-8") as handle:
                return [json.loads(line)["answers"] for line in handle]
    answers = generate_answers(adapter, prompts, batch_size=64, progress=progress, **settings)
    if cache_file is not None:
        write_jsonl_atomic(cache_file, ({"prompt": p, "answers": a} for p, a in zip(prompts, answers, strict=True)))
    return answers


def labelled_conversations(
    adapter: ModelAdapter,
    spec: ConceptSpec,
    *,
    n_samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    judge: Callable[[str], float] | None = None,
    judge_threshold: float = 0.0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> LabelledConversations:
    """The labelled conversations of a spec.

    Instruction pairs: for each pair and question, ``n_samples`` answers are sampled under the ``pos`` and the
    ``neg`` system prompt (seeded; cached in ``cache_dir`` keyed by model fingerprint, prompts and settings); each
    answer is then paired with the question alone (no system prompt), so that a probe reads the answer's content,
    not the instruction. With a ``judge`` (answer -> trait score), ``pos`` answers scoring ``<= judge_threshold``
    and ``neg`` answers scoring above it are dropped (the persona-vectors filtering). Labelled examples are added
    as given (prompt = their ``prompt`` or an empty user turn). Groups = the question, for held-out evaluation.
    """
    conversations: list[Messages] = []
    labels: list[int] = []
    groups: list[str] = []
    dropped = {"pos": 0, "neg": 0, "empty": 0}
    if spec.instructions:
        prompts: list[Messages] = []
        keys: list[tuple[int, str, int]] = []
        for p, pair in enumerate(spec.instructions):
            for persona, system in (("pos", pair.pos), ("neg", pair.neg)):
                for q, question in enumerate(spec.questions):
                    prompts.append([{"role": "system", "content": system}, {"role": "user", "content": question}])
                    keys.append((p, persona, q))
        settings = {"n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
        answers = _generate_cached(adapter, prompts, settings, cache_dir, progress)
        for (_, persona, q), samples in zip(keys, answers, strict=True):
            for answer in samples:
                if not answer.strip():
                    dropped["empty"] += 1
                    continue
                if judge is not None and (judge(answer) > judge_threshold) != (persona == "pos"):
                    dropped[persona] += 1
                    continue
                conversations.append([{"role": "user", "content": spec.questions[q]}, {"role": "assistant", "content": answer}])
                labels.append(int(persona == "pos"))
                groups.append(f"q{q}")
    for k, example in enumerate(spec.examples):
        conversations.append([{"role": "user", "content": example.prompt or ""}, {"role": "assistant", "content": example.text}])
        labels.append(example.label)
        groups.append(f"prompt:{example.prompt}" if example.prompt else f"example{k}")
    if len(set(labels)) < 2:
        raise ValueError(f"spec {spec.name!r}: the labelled set has only label(s) {sorted(set(labels))} "
                         f"(dropped: {dropped}); the model may not follow the instructions, or the judge rejects everything")
    meta = {"n": len(labels), "n_positive": int(sum(labels)), "dropped": dropped, "n_samples": n_samples, "seed": seed,
            "temperature": temperature, "judge": judge is not None}
    return LabelledConversations(conversations, labels, groups, meta)

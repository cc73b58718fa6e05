"""Reading activations for concept training: response-token means at one or several layers, and the labelled
conversations a spec defines (persona-vectors style: answers generated under pos/neg instructions, then read
without the instruction)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from concept_influence.concepts.answers import sample_answers
from concept_influence.concepts.base import Concept
from concept_influence.concepts.spec import ConceptSpec
from concept_influence.data import rows_from_records, tokenize_chat
from concept_influence.data.tokenize import TokenizedDataset, collate
from concept_influence.models.base import ModelAdapter

Messages = list[dict[str, str]]


class _StopForward(Exception):
    """Raised from a residual hook once every requested layer is captured (skips later blocks and the LM head)."""


class _CaptureUntil(dict):
    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.n_layers = n_layers

    def __setitem__(self, key: int, value: torch.Tensor) -> None:
        super().__setitem__(key, value)
        if len(self) >= self.n_layers:
            raise _StopForward


def residuals_until(
    adapter: ModelAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """``{l: resid.{l} [batch, seq, d_model]}``; the forward pass stops after the deepest block asked for (later
    blocks and the LM head are not run). Keeps the autograd graph when gradients are enabled (a differentiable
    readout costs only the blocks up to its layer)."""
    layers = sorted({adapter.check_layer(layer) for layer in layers})
    out = _CaptureUntil(len(layers))
    remove = adapter._install_residual_hooks(layers, out)
    try:
        adapter.logits(input_ids, attention_mask)
    except _StopForward:
        pass
    finally:
        remove()
    missing = [layer for layer in layers if layer not in out]
    if missing:
        raise RuntimeError(f"{adapter.backend}: the forward pass did not reach resid.{missing}")
    return dict(out)


@torch.no_grad()
def read_residuals(
    adapter: ModelAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """``residuals_until`` without gradients."""
    return residuals_until(adapter, input_ids, attention_mask, layers)


def length_sorted_batches(dataset: TokenizedDataset, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of rows of similar length (less padding); like ``iter_batches``, each has ``position``: the rows'
    positions in ``dataset``. Results do not depend on the order (every row is read on its own)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(dataset)), key=lambda p: len(dataset[p].input_ids))
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        batch = collate([dataset[p] for p in positions], getattr(dataset, "pad_token_id", 0))  # a list of rows too
        batch["position"] = torch.tensor(positions, dtype=torch.long)
        yield batch


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
        raise ValueError(
            f"conversations {dataset.empty_after_truncation[:10]} have no assistant tokens within "
            f"max_length={max_length}"
        )
    out = {layer: torch.empty(len(dataset), adapter.d_model) for layer in layers}
    with tqdm(total=len(dataset), desc="reading activations", unit="row", disable=not progress) as bar:
        for batch in length_sorted_batches(dataset, batch_size):
            acts = read_residuals(adapter, batch["input_ids"], batch["attention_mask"], layers)
            for layer in layers:
                mask = batch["loss_mask"].to(acts[layer].device, acts[layer].dtype).unsqueeze(-1)
                out[layer][batch["position"]] = ((acts[layer] * mask).sum(1) / mask.sum(1)).float().cpu()
            bar.update(len(batch["position"]))
    return out


@torch.no_grad()
def response_readouts(
    adapter: ModelAdapter,
    conversations: Sequence[Messages],
    concept: Concept,
    *,
    batch_size: int = 32,
    max_length: int = 512,
) -> torch.Tensor:
    """``[n]`` (float64, CPU): ``concept``'s mean readout over each conversation's assistant tokens (any concept:
    a direction, an SAE feature)."""
    if not conversations:
        raise ValueError("no conversations to read")
    rows = rows_from_records([{"messages": list(c)} for c in conversations], source="conversations")
    dataset = tokenize_chat(rows, adapter.tokenizer, max_length=max_length, warn=False)
    if dataset.empty_after_truncation:
        raise ValueError(
            f"conversations {dataset.empty_after_truncation[:10]} have no assistant tokens within "
            f"max_length={max_length}"
        )
    out = torch.empty(len(dataset), dtype=torch.float64)
    for batch in length_sorted_batches(dataset, batch_size):
        acts = read_residuals(adapter, batch["input_ids"], batch["attention_mask"], [concept.layer])[concept.layer]
        mask = batch["loss_mask"].to(acts.device)
        out[batch["position"]] = concept.readout(acts, mask, "mean").double().cpu()
    return out


@dataclass
class LabelledConversations:
    """Conversations to read, their labels (1 = concept), and groups (the question each came from: hold-out unit)."""

    conversations: list[Messages]
    labels: list[int]
    groups: list[str]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.labels)


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
    ``neg`` system prompt (seeded; cached in ``cache_dir`` as ``persona-answers-<hash>.jsonl``, see
    ``concepts.answers``); each answer is then paired with the question alone (no system prompt), so that a probe reads
    the answer's content,
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
        answers = sample_answers(
            adapter,
            prompts,
            n_samples=n_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=64,
            cache_dir=cache_dir,
            prefix="persona-answers",
            progress=progress,
        )
        for (_, persona, q), samples in zip(keys, answers, strict=True):
            for answer in samples:
                if not answer.strip():
                    dropped["empty"] += 1
                    continue
                if judge is not None and (judge(answer) > judge_threshold) != (persona == "pos"):
                    dropped[persona] += 1
                    continue
                conversations.append(
                    [{"role": "user", "content": spec.questions[q]}, {"role": "assistant", "content": answer}]
                )
                labels.append(int(persona == "pos"))
                groups.append(f"q{q}")
    for k, example in enumerate(spec.examples):
        conversations.append(
            [{"role": "user", "content": example.prompt or ""}, {"role": "assistant", "content": example.text}]
        )
        labels.append(example.label)
        groups.append(f"prompt:{example.prompt}" if example.prompt else f"example{k}")
    if len(set(labels)) < 2:
        raise ValueError(
            f"spec {spec.name!r}: the labelled set has only label(s) {sorted(set(labels))} "
            f"(dropped: {dropped}); the model may not follow the instructions, or the judge rejects everything"
        )
    meta = {
        "n": len(labels),
        "n_positive": int(sum(labels)),
        "dropped": dropped,
        "n_samples": n_samples,
        "seed": seed,
        "temperature": temperature,
        "judge": judge is not None,
    }
    return LabelledConversations(conversations, labels, groups, meta)

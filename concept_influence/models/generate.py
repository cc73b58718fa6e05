"""Seeded sampling of the model's own answers, identical on every backend and for any batch size.

Each (prompt, sample) pair draws from its own ``torch.Generator`` seeded from ``(seed, the prompt's tokens, how many
times the same prompt came earlier in the call, sample index)``, and prompts are batched only with prompts of the
same token length (no padding), so the answers do not depend on batching or on the other prompts in the call.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from concept_influence.data.tokenize import has_chat_template, render_prompt
from concept_influence.numerics import check_finite


def stop_token_ids(adapter: Any, extra: Sequence[int] = ()) -> set[int]:
    """EOS, the generation config's EOS ids, and special tokens that end a turn (``<|im_end|>``, ``<|eot_id|>``...)."""
    tokenizer = adapter.tokenizer
    ids: set[int] = set(int(i) for i in extra)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_config = getattr(getattr(adapter.model, "generation_config", None), "eos_token_id", None)
    if gen_config is not None:
        ids.update(int(i) for i in (gen_config if isinstance(gen_config, (list, tuple)) else [gen_config]))
    for token in getattr(tokenizer, "all_special_tokens", []) or []:
        lowered = token.lower()
        if "end" in lowered or "eot" in lowered:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None:
                ids.add(int(token_id))
    return ids


def _row_seed(seed: int, prompt_ids: Sequence[int], repeat: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{list(prompt_ids)}:{repeat}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def prompt_token_ids(messages: Sequence[dict[str, str]], tokenizer: Any) -> list[int]:
    text = render_prompt(messages, tokenizer)
    return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


@torch.no_grad()
def generate_answers(
    adapter: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    n_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    top_p: float | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """Sample ``n_samples`` answers per prompt (a list of chat messages) -> ``answers[prompt][sample]``.

    ``temperature == 0`` decodes greedily. Answers are decoded without special tokens and stripped.
    """
    if n_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("n_samples, max_new_tokens and batch_size must be positive")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokenizer = adapter.tokenizer
    if tokenizer is None:
        raise ValueError("generation needs a tokenizer on the adapter")
    stops = stop_token_ids(adapter)
    encoded = [prompt_token_ids(p, tokenizer) for p in prompts]
    jobs_by_length: dict[int, list[tuple[int, int]]] = defaultdict(list)
    seen: dict[tuple[int, ...], int] = defaultdict(int)
    repeats = []
    for ids in encoded:
        repeats.append(seen[tuple(ids)])
        seen[tuple(ids)] += 1
    for p, ids in enumerate(encoded):
        for s in range(n_samples):
            jobs_by_length[len(ids)].append((p, s))
    answers: list[list[str]] = [[""] * n_samples for _ in prompts]
    was_training = adapter.model.training
    adapter.model.eval()
    total = sum(len(v) for v in jobs_by_length.values())
    bar = tqdm(total=total, desc="generating", disable=not progress)
    try:
        for length in sorted(jobs_by_length):
            jobs = jobs_by_length[length]
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                input_ids = torch.tensor([encoded[p] for p, _ in chunk], dtype=torch.long, device=adapter.device)
                generators = [
                    torch.Generator().manual_seed(_row_seed(seed, encoded[p], repeats[p], s)) for p, s in chunk
                ]
                new_tokens = _sample(
                    adapter,
                    input_ids,
                    generators,
                    temperature,
                    top_p,
                    max_new_tokens,
                    stops,
                    rows=[p for p, _ in chunk],
                )
                for (p, s), tokens in zip(chunk, new_tokens, strict=True):
                    answers[p][s] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                bar.update(len(chunk))
    finally:
        bar.close()
        adapter.model.train(was_training)
    return answers


def _sample(
    adapter: Any,
    input_ids: torch.Tensor,
    generators: list[torch.Generator],
    temperature: float,
    top_p: float | None,
    max_new_tokens: int,
    stops: set[int],
    *,
    rows: Sequence[int] | None = None,
) -> list[list[int]]:
    """New tokens of each row until a stop token; ``rows``: each row's prompt index (named if its logits are not
    finite)."""
    batch = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    state = None
    ids = input_ids
    for _ in range(max_new_tokens):
        logits, state = adapter.next_token_logits(ids, state)
        logits = logits.float().cpu()
        live = [b for b in range(batch) if not done[b]]
        check_finite(
            logits[live],
            "generating answers: next-token logits",
            [rows[b] if rows is not None else b for b in live],
            hint="prompt indices count from 0",
        )
        next_ids = []
        for b in range(batch):
            if temperature == 0:
                token = int(logits[b].argmax())
            else:
                probs = torch.softmax(logits[b] / temperature, dim=-1)
                if top_p is not None and top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    keep = sorted_probs.cumsum(0) - sorted_probs < top_p
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
                token = int(torch.multinomial(probs, 1, generator=generators[b]))
            if not done[b]:
                if token in stops:
                    done[b] = True
                else:
                    out[b].append(token)
            next_ids.append(token)
        if all(done):
            break
        ids = torch.cat([ids, torch.tensor(next_ids, dtype=torch.long, device=ids.device).unsqueeze(1)], dim=1)
    return out

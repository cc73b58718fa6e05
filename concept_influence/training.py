"""A small, seeded fine-tuning loop (loss on assistant tokens only), reused for the organism and for retraining.

Tokenisation, the loss mask and batching come from ``concept_influence.data``; the loss is
``concept_influence.models.loss.causal_lm_loss``. Runs are deterministic for a given seed, model and data on the same
machine (seeded shuffling, no dropout randomness beyond ``torch.manual_seed``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from concept_influence.data import (
    ChatRow,
    TokenizedDataset,
    TokenizedRow,
    collate,
    iter_batches,
    tokenize_chat,
)
from concept_influence.models.base import ModelAdapter
from concept_influence.models.loss import causal_lm_loss
from concept_influence.settings import option

Schedule = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of ``finetune``.

    ``warmup``: fraction of the optimizer steps with a linear warm-up; ``schedule``: learning-rate decay after it;
    ``max_grad_norm``: gradient clipping (``None``: off); ``max_length``: truncation length in tokens;
    ``group_by_length``: batch rows of similar length together (less padding; batches still in a seeded random
    order).
    """

    epochs: int = option(3, help="Fine-tuning epochs (your recipe).")
    batch_size: int = option(16, help="Fine-tuning batch size.")
    lr: float = option(5e-4, help="Fine-tuning learning rate (AdamW, cosine decay).")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    warmup: float = option(0.05, help="Share of the optimizer steps with a linear warm-up.")
    schedule: Schedule = option("cosine", help="Learning-rate decay after the warm-up.")
    max_grad_norm: float | None = option(1.0, help="Gradient clipping (None: off).")
    seed: int = option(0, help="Seed of the batch order and initialisation.")
    max_length: int = option(256, help="Truncate training rows longer than this.")
    group_by_length: bool = option(True, help="Batch rows of similar length together (less padding).")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"epochs, batch_size must be >= 1 and max_length >= 2: {self}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be positive and weight_decay non-negative: {self}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")

    @classmethod
    def pretrain(cls, *, seed: int = 0, epochs: int = 1) -> FinetuneConfig:
        """From-scratch training of a tiny model: large learning rate, batch 32, cosine decay."""
        return cls(epochs=epochs, batch_size=32, lr=3e-3, weight_decay=0.01, warmup=0.03, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, total: int, warmup: float, schedule: Schedule) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) out of ``total``."""
    n_warm = int(round(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    if schedule == "constant":
        return 1.0
    progress = (step - n_warm) / max(1, total - n_warm)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_batches(
    rows: Sequence[TokenizedRow], batch_size: int, *, seed: int, group_by_length: bool, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of one epoch in a seeded random order. With ``group_by_length`` the shuffled rows are cut
    into windows of 50 batches, each window sorted by length before it is cut into batches."""
    if not group_by_length:
        yield from iter_batches(rows, batch_size, shuffle=True, seed=seed, pad_id=pad_id)
        return
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(rows[i].input_ids))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    for positions in batches:
        batch = collate([rows[p] for p in positions], pad_id)
        batch["position"] = torch.tensor(positions, dtype=torch.long)
        yield batch


def _forward_logits(
    model: nn.Module | ModelAdapter, batch: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    if bool(attention_mask.all()):  # right padding + causal attention: a full mask changes nothing; skip it
        attention_mask = None
    if isinstance(model, ModelAdapter):
        return model.logits(input_ids, attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def finetune(
    model: nn.Module | ModelAdapter,
    tokenizer: Any,
    rows: Sequence[ChatRow] | TokenizedDataset,
    config: FinetuneConfig | None = None,
    *,
    progress: bool = True,
    losses: list[float] | None = None,
    desc: str = "fine-tuning",
) -> nn.Module | ModelAdapter:
    """Train ``model`` in place on ``rows`` (chat rows, or an already tokenised dataset) with AdamW, loss on
    assistant tokens only; returns the same model, in eval mode.

    ``losses``: when given, the mean loss of every optimizer step is appended to it.
    """
    config = config or FinetuneConfig()
    module = model.model if isinstance(model, ModelAdapter) else model
    if isinstance(rows, TokenizedDataset):
        dataset = rows
    else:
        if len(rows) == 0:
            raise ValueError("finetune: no rows to train on")
        dataset = tokenize_chat(rows, tokenizer, max_length=config.max_length)
    usable = [r for r in dataset.rows if r.n_targets > 0]
    if not usable:
        raise ValueError("finetune: no row has an assistant token to train on")
    device = next(module.parameters()).device
    steps_per_epoch = math.ceil(len(usable) / config.batch_size)
    total = steps_per_epoch * config.epochs
    params = [p for p in module.parameters() if p.requires_grad]
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, config.warmup, config.schedule)
    )
    module.train()
    flushed = torch.set_flush_denormal(True)  # denormal floats slow tiny CPU models down several times
    bar = tqdm(total=total, desc=desc, disable=not progress)
    try:
        for epoch in range(config.epochs):
            batches = epoch_batches(
                usable,
                config.batch_size,
                seed=config.seed * 1_000_003 + epoch,
                group_by_length=config.group_by_length,
                pad_id=dataset.pad_token_id,
            )
            for batch in batches:
                logits = _forward_logits(model, batch, device)
                loss = causal_lm_loss(logits, batch["input_ids"].to(device), batch["loss_mask"].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                value = float(loss.detach())
                if losses is not None:
                    losses.append(value)
                bar.set_postfix(epoch=epoch, loss=f"{value:.3f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()
        if flushed:
            torch.set_flush_denormal(False)
        module.eval()
    return model

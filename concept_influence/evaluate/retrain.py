"""Counterfactual retraining: fine-tune a fresh copy of the base model on a subset of the rows, with the user's
recipe (full fine-tuning, or LoRA through peft, merged back into the weights afterwards). Loss on assistant tokens
only, through ``training.finetune``."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from concept_influence.data.chat import ChatRow
from concept_influence.models import ModelAdapter, load_adapter
from concept_influence.training import FinetuneConfig, finetune


@dataclass(frozen=True)
class Recipe:
    """How the user fine-tuned: ``finetune`` (epochs, batch size, lr, ...; its ``seed`` is replaced per run) and
    ``lora_rank`` (``None``: full fine-tuning; ``r``: LoRA of rank ``r`` with alpha ``2r`` on every linear layer)."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora_rank: int | None = None

    def __post_init__(self) -> None:
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora rank must be >= 1, got {self.lora_rank}")

    def to_dict(self) -> dict[str, Any]:
        return {"finetune": asdict(self.finetune), "lora_rank": self.lora_rank}


def retrain(base: ModelAdapter, rows: Sequence[ChatRow], recipe: Recipe, seed: int) -> ModelAdapter:
    """A fine-tuned copy of ``base`` trained on ``rows`` with ``recipe`` and training seed ``seed`` (``base`` is not
    modified). Returns an adapter over the (merged) trained model."""
    if not rows:
        raise ValueError("retrain: no rows left to train on")
    config = replace(recipe.finetune, seed=seed)
    model = copy.deepcopy(base.model)
    if recipe.lora_rank is None:
        adapter = load_adapter(model, tokenizer=base.tokenizer)
        finetune(adapter, base.tokenizer, rows, config, progress=False)
        return adapter
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ImportError("--lora needs the peft package (pip install peft)") from err
    if not hasattr(model, "config"):
        raise ValueError("--lora needs a Hugging Face transformers model (peft), not a TransformerLens one")
    lora = LoraConfig(
        r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, lora_dropout=0.0, target_modules="all-linear"
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    finetune(peft_model, base.tokenizer, rows, config, progress=False)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return load_adapter(merged, tokenizer=base.tokenizer)

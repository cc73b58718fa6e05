"""Model adapters: one naming scheme for residual sites and tracked weights across Hugging Face and TransformerLens."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from concept_influence.models.base import (
    WEIGHT_KINDS,
    ModelAdapter,
    WeightCapture,
    WeightInfo,
    parse_weight_name,
)
from concept_influence.models.generate import generate_answers
from concept_influence.models.hf import HFAdapter, resolve_dtype
from concept_influence.models.loss import causal_lm_loss, token_cross_entropy
from concept_influence.models.transformer_lens import TransformerLensAdapter, hooked_transformer_from_hf


def load_adapter(
    model: str | os.PathLike | nn.Module | ModelAdapter,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    biases: bool = True,
) -> ModelAdapter:
    """An adapter for a hub name / local folder (``from_pretrained``), a ``transformers`` model, a
    ``HookedTransformer`` or an adapter (returned as is)."""
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, (str, os.PathLike)):
        return HFAdapter.from_pretrained(model, dtype=dtype, device=device, biases=biases)
    if type(model).__name__ == "HookedTransformer" or hasattr(model, "cfg") and hasattr(model, "blocks"):
        adapter: ModelAdapter = TransformerLensAdapter(model, tokenizer, biases=biases)
    elif hasattr(model, "config"):
        adapter = HFAdapter(model, tokenizer, biases=biases)
    else:
        raise TypeError(
            f"cannot adapt {type(model).__name__}: pass a model name/path, a transformers causal LM or a "
            "HookedTransformer"
        )
    if dtype is not None:
        adapter.model.to(resolve_dtype(dtype))
    if device is not None:
        adapter.model.to(device)
    return adapter


__all__ = [
    "WEIGHT_KINDS",
    "HFAdapter",
    "ModelAdapter",
    "TransformerLensAdapter",
    "WeightCapture",
    "WeightInfo",
    "causal_lm_loss",
    "generate_answers",
    "hooked_transformer_from_hf",
    "load_adapter",
    "parse_weight_name",
    "resolve_dtype",
    "token_cross_entropy",
]

"""Hugging Face causal LMs (``AutoModelForCausalLM``): Llama/Qwen2/Mistral-style ``nn.Linear`` blocks and GPT-2
style ``Conv1D`` blocks."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from concept_influence.models.base import ModelAdapter, WeightCapture, WeightInfo

# module path inside a block -> canonical kind (first match wins; paths are matched by suffix)
_KIND_BY_SUFFIX: tuple[tuple[str, str], ...] = (
    ("q_proj", "attn.q"),
    ("k_proj", "attn.k"),
    ("v_proj", "attn.v"),
    ("o_proj", "attn.o"),
    ("qkv_proj", "attn.qkv"),
    ("attn.c_attn", "attn.qkv"),
    ("attn.c_proj", "attn.o"),
    ("query_key_value", "attn.qkv"),
    ("attention.dense", "attn.o"),
    ("gate_proj", "mlp.gate"),
    ("up_proj", "mlp.in"),
    ("gate_up_proj", "mlp.gate_in"),
    ("down_proj", "mlp.out"),
    ("mlp.c_fc", "mlp.in"),
    ("mlp.c_proj", "mlp.out"),
    ("dense_h_to_4h", "mlp.in"),
    ("dense_4h_to_h", "mlp.out"),
    ("fc1", "mlp.in"),
    ("fc2", "mlp.out"),
)

_BLOCK_LIST_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _kind_for(path: str) -> str:
    for suffix, kind in _KIND_BY_SUFFIX:
        if path == suffix or path.endswith("." + suffix):
            return kind
    return path  # an unrecognised linear map keeps its own module path as its kind


class HFAdapter(ModelAdapter):
    """Adapter over a ``transformers`` causal LM.

    ``biases``: fold existing biases into the tracked weights (default). Weights are tracked per block; linear maps
    with unrecognised names are tracked under their own module path; matrix parameters that are not held by
    ``nn.Linear``/``Conv1D`` are listed in a warning.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, biases: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.biases = biases
        self.blocks, self._blocks_path = self._find_blocks(model)
        self._weights = self._build_registry()

    # ---- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        biases: bool = True,
        **kwargs: Any,
    ) -> HFAdapter:
        """Load model and tokenizer with ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = str(name_or_path)
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, **kwargs)
        except OSError as err:
            hint = "" if os.path.exists(name) else " (not a local folder; hub downloads need network access)"
            raise OSError(f"cannot load model {name!r}{hint}: {err}") from err
        if device is not None:
            model = model.to(device)
        model.eval()
        return cls(model, tokenizer, biases=biases)

    # ---- structure ---------------------------------------------------------------------------------------------
    @staticmethod
    def _find_blocks(model: nn.Module) -> tuple[nn.ModuleList, str]:
        config = getattr(model, "config", None)
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        for path in _BLOCK_LIST_PATHS:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers):
                return module, path
        for path, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and n_layers is not None and len(module) == n_layers:
                return module, path
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: expected one of {_BLOCK_LIST_PATHS}")

    def _build_registry(self) -> list[WeightInfo]:
        infos: list[WeightInfo] = []
        untracked: list[str] = []
        for layer, block in enumerate(self.blocks):
            prefix = f"{self._blocks_path}.{layer}"
            held: set[str] = set()
            for path, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    layout, d_in, d_out = "out_in", module.in_features, module.out_features
                elif _is_conv1d(module):
                    layout, d_in, d_out = "in_out", module.weight.shape[0], module.weight.shape[1]
                else:
                    continue
                held.add(f"{path}.weight")
                has_bias = self.biases and getattr(module, "bias", None) is not None
                held.add(f"{path}.bias")
                infos.append(
                    WeightInfo(
                        name=f"blocks.{layer}.{_kind_for(path)}",
                        layer=layer,
                        kind=_kind_for(path),
                        param_name=f"{prefix}.{path}.weight",
                        bias_name=f"{prefix}.{path}.bias" if has_bias else None,
                        d_in=d_in,
                        d_out=d_out,
                        layout=layout,
                        backend_shape=tuple(module.weight.shape),
                    )
                )
            for pname, param in block.named_parameters():
                if param.ndim >= 2 and pname not in held:
                    untracked.append(f"{prefix}.{pname} {tuple(param.shape)}")
        if untracked:
            warnings.warn(
                "these weight matrices are not held by nn.Linear/Conv1D and are not tracked: " + ", ".join(untracked),
                stacklevel=3,
            )
        names = [i.name for i in infos]
        if len(set(names)) != len(names):
            raise ValueError(f"ambiguous weight names in {type(self.model).__name__}: {names}")
        return infos

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.n_embd)

    def tracked_weights(self) -> list[WeightInfo]:
        return list(self._weights)

    def _module_of(self, info: WeightInfo) -> nn.Module:
        return self.model.get_submodule(info.param_name.rsplit(".", 1)[0])

    # ---- forward and hooks -------------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=None if attention_mask is None else attention_mask.to(self.device), use_cache=False)
        return out.logits

    def next_token_logits(self, input_ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits of the next token ``[batch, vocab]`` with a KV cache in ``state`` (no padding)."""
        if state is None:
            out = self.model(input_ids=input_ids.to(self.device), use_cache=True)
        else:
            # newer transformers renamed ``past_key_values`` to ``cache`` (the old name warns): use what forward takes
            out = self.model(input_ids=input_ids[:, -1:].to(self.device), use_cache=True, **{self._cache_argument(): state})
        return out.logits[:, -1, :], out["cache"] if "cache" in out else out["past_key_values"]

    def _cache_argument(self) -> str:
        """``"cache"`` when the model's ``forward`` takes it (transformers >= 5.2x), else ``"past_key_values"``."""
        if not hasattr(self, "_cache_arg"):
            import inspect

            self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        return self._cache_arg

    def _install_residual_hooks(self, layers: Sequence[int], out: dict[int, torch.Tensor]) -> Callable[[], None]:
        handles = []
        for layer in layers:
            def hook(_module, _inputs, output, layer=layer):
                out[layer] = output[0] if isinstance(output, tuple) else output

            handles.append(self.blocks[layer].register_forward_hook(hook))
        return lambda: [h.remove() for h in handles]

    def _install_weight_hooks(self, infos: Sequence[WeightInfo], capture: WeightCapture) -> Callable[[], None]:
        handles = []
        for info in infos:
            def hook(_module, inputs, output, name=info.name):
                capture.activations[name] = inputs[0].detach()
                if output.requires_grad:
                    output.register_hook(lambda grad, name=name: capture._store_grad(name, grad))

            handles.append(self._module_of(info).register_forward_hook(hook))
        return lambda: [h.remove() for h in handles]


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"|"fp32"|"bfloat16"|"bf16"|"float16"|"fp16"|"float64"`` -> torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)}") from None

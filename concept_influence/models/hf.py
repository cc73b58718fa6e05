"""Hugging Face causal LMs (``AutoModelForCausalLM``): Llama/Qwen2/Mistral-style ``nn.Linear`` blocks and GPT-2
style ``Conv1D`` blocks."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
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


# model types whose logits are exactly the output embedding applied to the head's input (no soft-capping or scaling)
_PLAIN_HEAD_TYPES = frozenset(
    {
        "llama",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "mistral",
        "mixtral",
        "gemma",
        "phi",
        "phi3",
        "gpt2",
        "gpt_neox",
        "olmo",
        "olmo2",
        "starcoder2",
        "stablelm",
    }
)


class _StopAtHead(Exception):
    """Raised by a pre-hook on the output embedding to stop a forward pass there."""


def _lora_adapters(module: nn.Module) -> list[str]:
    """The active LoRA adapter names of a peft ``LoraLayer`` (empty for any other module)."""
    lora_a = getattr(module, "lora_A", None)
    if not isinstance(lora_a, nn.ModuleDict) or not len(lora_a):
        return []
    active = getattr(module, "active_adapters", None) or list(lora_a.keys())
    return [name for name in ([active] if isinstance(active, str) else active) if name in lora_a]


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
        raise ValueError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected one of {_BLOCK_LIST_PATHS}"
        )

    def _build_registry(self) -> list[WeightInfo]:
        if any(_lora_adapters(m) for m in self.blocks.modules()):
            return self._lora_registry()
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

    def _lora_registry(self) -> list[WeightInfo]:
        """A peft LoRA model is tracked by its adapter weights only: for a wrapped map of kind ``K`` in block ``l``,
        ``blocks.{l}.{K}.lora_A`` (``d_in -> r``) and ``blocks.{l}.{K}.lora_B`` (``r -> d_out``), of the active
        adapter. Their gradients are those of the adapter parameters (``lora_B``'s output is scaled afterwards)."""
        infos: list[WeightInfo] = []
        for layer, block in enumerate(self.blocks):
            prefix = f"{self._blocks_path}.{layer}"
            for path, module in block.named_modules():
                adapters = _lora_adapters(module)
                if not adapters:
                    continue
                name = adapters[0]
                for part in ("lora_A", "lora_B"):
                    linear = getattr(module, part)[name]
                    kind = f"{_kind_for(path)}.{part}"
                    infos.append(
                        WeightInfo(
                            name=f"blocks.{layer}.{kind}",
                            layer=layer,
                            kind=kind,
                            param_name=f"{prefix}.{path}.{part}.{name}.weight",
                            bias_name=f"{prefix}.{path}.{part}.{name}.bias"
                            if self.biases and linear.bias is not None
                            else None,
                            d_in=linear.in_features,
                            d_out=linear.out_features,
                            layout="out_in",
                            backend_shape=tuple(linear.weight.shape),
                        )
                    )
        return infos

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.n_embd)

    @property
    def context_length(self) -> int | None:
        config = self.model.config
        value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return int(value) if value else None

    def tracked_weights(self) -> list[WeightInfo]:
        return list(self._weights)

    def _module_of(self, info: WeightInfo) -> nn.Module:
        return self.model.get_submodule(info.param_name.rsplit(".", 1)[0])

    # ---- forward and hooks -------------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            use_cache=False,
        )
        return out.logits

    def hidden_and_head(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
        """Runs the model up to its output embedding (a pre-hook stops the forward there). ``None`` unless the model
        type is known to use the head's output as its logits (others soft-cap or scale them)."""
        head = self.model.get_output_embeddings()
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if head is None or model_type not in _PLAIN_HEAD_TYPES:
            return None
        seen: dict[str, torch.Tensor] = {}

        def stop(_module, args):
            seen["hidden"] = args[0]
            raise _StopAtHead

        handle = head.register_forward_pre_hook(stop)
        try:
            self.logits(input_ids, attention_mask)
        except _StopAtHead:
            pass
        finally:
            handle.remove()
        hidden = seen.get("hidden")
        if hidden is None or hidden.shape[:2] != input_ids.shape:
            return None
        return hidden, head

    def next_token_logits(self, input_ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits of the next token ``[batch, vocab]`` with a KV cache in ``state`` (no padding)."""
        if state is None:
            out = self.model(input_ids=input_ids.to(self.device), use_cache=True)
        else:
            # newer transformers renamed ``past_key_values`` to ``cache`` (the old name warns): use what forward takes
            out = self.model(
                input_ids=input_ids[:, -1:].to(self.device), use_cache=True, **{self._cache_argument(): state}
            )
        return out.logits[:, -1, :], out["cache"] if "cache" in out else out["past_key_values"]

    def _cache_argument(self) -> str:
        """``"cache"`` when the model's ``forward`` takes it (transformers >= 5.2x), else ``"past_key_values"``."""
        if not hasattr(self, "_cache_arg"):
            import inspect

            self._cache_arg = (
                "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            )
        return self._cache_arg

    def _install_residual_hooks(self, layers: Sequence[int], out: dict[int, torch.Tensor]) -> Callable[[], None]:
        handles = []
        for layer in layers:

            def hook(_module, _inputs, output, layer=layer):
                out[layer] = output[0] if isinstance(output, tuple) else output

            handles.append(self.blocks[layer].register_forward_hook(hook))
        return lambda: [h.remove() for h in handles]

    @contextlib.contextmanager
    def gradient_checkpointing(self) -> Iterator[None]:
        """The blocks (transformers' ``GradientCheckpointingLayer``) recompute their forward in the backward
        (``torch.utils.checkpoint``, non-reentrant). Only the blocks' own ``training`` flag is set (what transformers
        checks); their submodules keep the model's mode (no dropout in eval mode). Restored on exit."""
        from functools import partial

        from torch.utils.checkpoint import checkpoint
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            raise ValueError(
                f"gradient checkpointing (--gradient-checkpointing): {type(self.model).__name__} has no "
                "checkpointable blocks (transformers' GradientCheckpointingLayer); leave it off"
            )
        saved = [(m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"), m.training) for m in layers]
        try:
            for m in layers:
                m.gradient_checkpointing = True
                m._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
                m.training = True
            yield
        finally:
            for m, (flag, func, training) in zip(layers, saved, strict=True):
                m.gradient_checkpointing, m.training = flag, training
                if func is None:
                    m.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    m._gradient_checkpointing_func = func

    def _install_weight_hooks(self, infos: Sequence[WeightInfo], capture: WeightCapture) -> Callable[[], None]:
        handles = []
        for info in infos:

            def hook(_module, inputs, output, name=info.name):
                capture._store_activation(name, inputs[0])
                capture._watch_output(name, output)

            handles.append(self._module_of(info).register_forward_hook(hook))
        return lambda: [h.remove() for h in handles]


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"|"fp32"|"bfloat16"|"bf16"|"float16"|"fp16"|"float64"`` -> torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float64": torch.float64,
        "fp64": torch.float64,
        "double": torch.float64,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)}") from None

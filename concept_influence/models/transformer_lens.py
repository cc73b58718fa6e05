"""TransformerLens ``HookedTransformer`` models.

TransformerLens holds its weights as raw parameters, so each one is mapped explicitly to the hook points that see
its input and its output (layouts in ``WeightInfo``):

| weight | input activations            | output gradient          | layout           |
|--------|------------------------------|--------------------------|------------------|
| W_Q/K/V| the attention module's input | ``attn.hook_q/k/v``      | ``heads_in_head``|
| _W_K/_W_V (GQA, below) | as W_K/W_V | ``attn.hook_k/v`` (before the heads are repeated) | ``heads_in_head`` |
| W_O    | ``attn.hook_z``              | ``hook_attn_out``        | ``heads_head_out``|
| W_gate | the MLP module's input       | ``mlp.hook_pre``         | ``in_out``       |
| W_in   | the MLP module's input       | ``mlp.hook_pre`` (``hook_pre_linear`` when gated) | ``in_out`` |
| W_out  | ``mlp.hook_post``            | ``hook_mlp_out``         | ``in_out``       |

``_W_K``/``_W_V`` (grouped-query attention, GQA): one per key-value head.
``ln*.hook_normalized`` is taken before the LayerNorm's scale and bias, so it is never used as an input. Use
``HookedTransformer.from_pretrained_no_processing`` (or ``hooked_transformer_from_hf``) so that gradients refer to
the checkpoint's own parameters: the default ``from_pretrained`` folds and centres weights.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from concept_influence.models.base import ModelAdapter, WeightCapture, WeightInfo

_UNSUPPORTED_FLAGS = (
    "use_split_qkv_input",
    "use_attn_in",
    "use_normalization_before_and_after",
    "parallel_attn_mlp",
    "use_qk_norm",
)


class TransformerLensAdapter(ModelAdapter):
    """Adapter over a ``transformer_lens.HookedTransformer`` (the tokenizer defaults to ``model.tokenizer``).

    ``biases``: fold TransformerLens's bias parameters (b_Q, b_O, b_in, ...) into the tracked weights.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, biases: bool = True) -> None:
        from transformer_lens import HookedTransformer

        if not isinstance(model, HookedTransformer):
            raise TypeError(f"TransformerLensAdapter needs a HookedTransformer, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.biases = biases
        self.cfg = model.cfg
        bad = [flag for flag in _UNSUPPORTED_FLAGS if getattr(self.cfg, flag, False)]
        if bad:
            raise ValueError(f"TransformerLensAdapter does not support HookedTransformer configs with {bad}")
        if getattr(self.cfg, "original_architecture", None) in ("Olmo2ForCausalLM", "Olmo3ForCausalLM"):
            raise ValueError("post-norm TransformerLens architectures (OLMo 2/3) are not supported")
        self._weights = self._build_registry()

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def context_length(self) -> int | None:
        return int(self.cfg.n_ctx) if getattr(self.cfg, "n_ctx", None) else None

    def _build_registry(self) -> list[WeightInfo]:
        cfg = self.cfg
        infos: list[WeightInfo] = []
        untracked: list[str] = []
        gqa = getattr(cfg, "n_key_value_heads", None) is not None
        h, d_head, d = cfg.n_heads, cfg.d_head, cfg.d_model

        def bias(path: str) -> str | None:
            if not self.biases:
                return None
            try:
                self.model.get_parameter(path)
            except AttributeError:
                return None
            return path

        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}"
            for kind, wname in (("attn.q", "W_Q"), ("attn.k", "W_K"), ("attn.v", "W_V")):
                grouped = gqa and kind != "attn.q"
                if grouped and getattr(cfg, "ungroup_grouped_query_attention", False):
                    untracked.append(f"{p}.attn._{wname} (ungrouped grouped-query attention)")
                    continue
                # grouped-query attention keeps K and V per key-value head in _W_K/_W_V [n_kv, d_model, d_head];
                # hook_k/hook_v see their outputs before the heads are repeated
                prefix = "_" if grouped else ""
                heads = cfg.n_key_value_heads if grouped else h
                param = self.model.get_parameter(f"{p}.attn.{prefix}{wname}")
                infos.append(
                    WeightInfo(
                        f"{p}.{kind}",
                        layer,
                        kind,
                        f"{p}.attn.{prefix}{wname}",
                        bias(f"{p}.attn.{prefix}b_{wname[-1]}"),
                        d,
                        heads * d_head,
                        "heads_in_head",
                        tuple(param.shape),
                    )
                )
            param = self.model.get_parameter(f"{p}.attn.W_O")
            infos.append(
                WeightInfo(
                    f"{p}.attn.o",
                    layer,
                    "attn.o",
                    f"{p}.attn.W_O",
                    bias(f"{p}.attn.b_O"),
                    h * d_head,
                    d,
                    "heads_head_out",
                    tuple(param.shape),
                )
            )
            if cfg.attn_only:
                continue
            if cfg.act_fn is not None and cfg.act_fn.endswith("_ln"):
                untracked.append(f"{p}.mlp.* (layer-norm activation {cfg.act_fn})")
                continue
            d_mlp = cfg.d_mlp
            if cfg.gated_mlp:
                infos.append(
                    WeightInfo(
                        f"{p}.mlp.gate", layer, "mlp.gate", f"{p}.mlp.W_gate", None, d, d_mlp, "in_out", (d, d_mlp)
                    )
                )
                infos.append(
                    WeightInfo(f"{p}.mlp.in", layer, "mlp.in", f"{p}.mlp.W_in", None, d, d_mlp, "in_out", (d, d_mlp))
                )
            else:
                infos.append(
                    WeightInfo(
                        f"{p}.mlp.in",
                        layer,
                        "mlp.in",
                        f"{p}.mlp.W_in",
                        bias(f"{p}.mlp.b_in"),
                        d,
                        d_mlp,
                        "in_out",
                        (d, d_mlp),
                    )
                )
            infos.append(
                WeightInfo(
                    f"{p}.mlp.out",
                    layer,
                    "mlp.out",
                    f"{p}.mlp.W_out",
                    bias(f"{p}.mlp.b_out"),
                    d_mlp,
                    d,
                    "in_out",
                    (d_mlp, d),
                )
            )
        if untracked:
            warnings.warn("these TransformerLens weights are not tracked: " + ", ".join(untracked), stacklevel=3)
        return infos

    def tracked_weights(self) -> list[WeightInfo]:
        return list(self._weights)

    # ---- forward and hooks -------------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Right padding needs no mask under causal attention: positions before the padding are exact."""
        return self.model(input_ids.to(self.device), return_type="logits")

    def next_token_logits(self, input_ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits of the next token ``[batch, vocab]`` (recomputed from scratch; no cache)."""
        return self.logits(input_ids)[:, -1, :], None

    def _install_residual_hooks(self, layers: Sequence[int], out: dict[int, torch.Tensor]) -> Callable[[], None]:
        handles = []
        for layer in layers:

            def hook(_module, _inputs, output, layer=layer):
                out[layer] = output

            handles.append(self.model.get_submodule(f"blocks.{layer}.hook_resid_post").register_forward_hook(hook))
        return lambda: [h.remove() for h in handles]

    def _install_weight_hooks(self, infos: Sequence[WeightInfo], capture: WeightCapture) -> Callable[[], None]:
        handles = []

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(*t.shape[:2], -1)

        def grad_at(module_path: str, name: str) -> None:
            def fwd(_module, _inputs, output):
                capture._watch_output(name, output, flat)

            handles.append(self.model.get_submodule(module_path).register_forward_hook(fwd))

        def act_at(module_path: str, name: str) -> None:
            def fwd(_module, _inputs, output):
                capture._store_activation(name, flat(output))

            handles.append(self.model.get_submodule(module_path).register_forward_hook(fwd))

        def module_input(module_path: str, name: str, key: str, position: int) -> None:
            def pre(_module, args, kwargs):
                value = kwargs[key] if key in kwargs else args[position]
                capture._store_activation(name, value)

            handles.append(self.model.get_submodule(module_path).register_forward_pre_hook(pre, with_kwargs=True))

        for info in infos:
            p, kind = f"blocks.{info.layer}", info.kind
            if kind in ("attn.q", "attn.k", "attn.v"):
                key, position = {
                    "attn.q": ("query_input", 0),
                    "attn.k": ("key_input", 1),
                    "attn.v": ("value_input", 2),
                }[kind]
                module_input(f"{p}.attn", info.name, key, position)
                grad_at(f"{p}.attn.hook_{kind[-1]}", info.name)
            elif kind == "attn.o":
                act_at(f"{p}.attn.hook_z", info.name)
                grad_at(f"{p}.hook_attn_out", info.name)
            elif kind == "mlp.gate":
                module_input(f"{p}.mlp", info.name, "x", 0)
                grad_at(f"{p}.mlp.hook_pre", info.name)
            elif kind == "mlp.in":
                module_input(f"{p}.mlp", info.name, "x", 0)
                grad_at(f"{p}.mlp.hook_pre_linear" if self.cfg.gated_mlp else f"{p}.mlp.hook_pre", info.name)
            elif kind == "mlp.out":
                act_at(f"{p}.mlp.hook_post", info.name)
                grad_at(f"{p}.hook_mlp_out", info.name)
            else:  # pragma: no cover - the registry only makes the kinds above
                raise ValueError(f"no hook map for {info.name}")
        return lambda: [h.remove() for h in handles]


def hooked_transformer_from_hf(
    hf_model: nn.Module | str | os.PathLike, tokenizer: Any = None, *, dtype: torch.dtype | None = None
):
    """A ``HookedTransformer`` with exactly the weights of a Hugging Face Llama/Qwen2/Mistral model: no folding,
    no centring (TransformerLens's ``*_no_processing`` semantics), working for local models without a hub name.

    ``hf_model``: the model, or a model folder / hub name (loaded with ``AutoModelForCausalLM.from_pretrained``,
    its tokenizer too unless ``tokenizer`` is given). Tied embeddings are copied into TransformerLens's separate
    ``W_E``/``W_U``.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    if isinstance(hf_model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = os.fspath(hf_model)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"hooked_transformer_from_hf: cannot load a Hugging Face causal LM from {name!r} "
                f"({str(error).splitlines()[0]}); pass a model, a model folder or a hub name"
            ) from None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name)
        hf_model = loaded
    if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
        raise TypeError(
            f"hooked_transformer_from_hf takes a Hugging Face causal LM (or its folder), got {type(hf_model).__name__}"
        )

    config = hf_model.config
    arch = (getattr(config, "architectures", None) or [type(hf_model).__name__])[0]
    if arch not in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        raise ValueError(
            f"hooked_transformer_from_hf supports Llama/Qwen2/Mistral architectures, got {arch}; for hub models use "
            "HookedTransformer.from_pretrained_no_processing(name, hf_model=...)"
        )
    if getattr(config, "attention_bias", False) and arch != "Qwen2ForCausalLM":
        raise ValueError("attention biases are only converted for Qwen2 models")
    n_kv = config.num_key_value_heads
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0
    )
    dtype = dtype or next(hf_model.parameters()).dtype
    cfg = HookedTransformerConfig(
        d_model=config.hidden_size,
        d_head=config.hidden_size // config.num_attention_heads,
        n_heads=config.num_attention_heads,
        n_key_value_heads=n_kv if n_kv != config.num_attention_heads else None,
        d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers,
        n_ctx=config.max_position_embeddings,
        eps=config.rms_norm_eps,
        d_vocab=config.vocab_size,
        act_fn=config.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=config.hidden_size // config.num_attention_heads,
        rotary_base=rope_theta,
        final_rms=True,
        gated_mlp=True,
        original_architecture=arch,
        dtype=dtype,
        device=str(next(hf_model.parameters()).device),
        default_prepend_bos=False,
    )
    state = convert_llama_weights(hf_model, cfg)
    if arch == "Qwen2ForCausalLM":
        for layer in range(cfg.n_layers):
            attn = hf_model.model.layers[layer].self_attn
            for letter, proj, heads in (
                ("Q", attn.q_proj, cfg.n_heads),
                ("K", attn.k_proj, n_kv),
                ("V", attn.v_proj, n_kv),
            ):
                if proj.bias is not None:
                    key = f"blocks.{layer}.attn.{'_' if (letter != 'Q' and cfg.n_key_value_heads) else ''}b_{letter}"
                    state[key] = proj.bias.detach().reshape(heads, cfg.d_head)
    model = HookedTransformer(cfg)  # its set_tokenizer reloads by hub name: attach the tokenizer directly instead
    model.tokenizer = tokenizer
    state = {k: v.detach().clone().to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()

"""The adapter interface: one naming scheme for sites and weights across backends.

Naming scheme (the same on every backend and in every command):

- residual site ``resid.{l}``: the output of block ``l`` (counting from 0), i.e. the residual stream after the
  block. On Hugging Face this is ``hidden_states[l + 1]`` for every block but the last (HF applies the final norm
  to its last hidden state; we always return the block's own output).
- tracked weight ``blocks.{l}.{kind}`` with kind in ``attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.in, mlp.out``
  (fused maps: ``attn.qkv`` for GPT-2's ``c_attn``, ``mlp.gate_in``; a linear map with an unrecognised name keeps its
  module path as its kind).

Every tracked weight is seen as a linear map applied at each token position, in the canonical layout
``out = W @ a (+ b)`` with ``W`` of shape ``[d_out, d_in]``. The capture gives the input activations
``a: [batch, seq, d_in]`` and the gradients of the loss with respect to the output ``g: [batch, seq, d_out]``;
the gradient of ``W`` is then ``sum_t g_t a_tᵀ`` (and of the bias ``sum_t g_t``). ``WeightInfo.to_canonical``
maps the backend parameter's own layout to the canonical one.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from concept_influence.distributed.runtime import is_sharded, local_shard, shard_model
from concept_influence.models.fingerprint import model_fingerprint

WEIGHT_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "mlp.gate", "mlp.in", "mlp.gate_in", "mlp.out")
_WEIGHT_NAME = re.compile(r"^blocks\.(\d+)\.(\S+)$")


def parse_weight_name(name: str) -> tuple[int, str]:
    """``"blocks.3.attn.q"`` -> ``(3, "attn.q")``; raises ``ValueError`` on anything else."""
    match = _WEIGHT_NAME.match(name)
    if match is None:
        raise ValueError(
            f"not a tracked weight name: {name!r} (expected 'blocks.<layer>.<kind>', e.g. kinds {WEIGHT_KINDS})"
        )
    return int(match.group(1)), match.group(2)


@dataclass(frozen=True)
class WeightInfo:
    """One trackable weight matrix.

    ``name``: canonical name ``blocks.{l}.{kind}``; ``param_name``/``bias_name``: the backend's parameter paths;
    ``layout``: how the backend stores it (``"out_in"`` nn.Linear, ``"in_out"`` Conv1D or TransformerLens MLP,
    ``"heads_in_head"`` TransformerLens W_Q/K/V ``[heads, d_model, d_head]``, ``"heads_head_out"`` TransformerLens
    W_O ``[heads, d_head, d_model]``). ``d_in``/``d_out`` are the canonical sizes (heads flattened).
    """

    name: str
    layer: int
    kind: str
    param_name: str
    bias_name: str | None
    d_in: int
    d_out: int
    layout: str
    backend_shape: tuple[int, ...] = field(default=(), compare=False)

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None

    def to_canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """Backend tensor (weight or its gradient) -> canonical ``[d_out, d_in]``."""
        if self.layout == "out_in":
            return weight
        if self.layout == "in_out":
            return weight.transpose(0, 1)
        if self.layout == "heads_in_head":  # [h, d_model, d_head] -> [(h d_head), d_model]
            return weight.permute(0, 2, 1).reshape(self.d_out, self.d_in)
        if self.layout == "heads_head_out":  # [h, d_head, d_model] -> [d_model, (h d_head)]
            return weight.reshape(self.d_in, self.d_out).transpose(0, 1)
        raise ValueError(f"unknown layout {self.layout!r}")

    def bias_to_canonical(self, bias: torch.Tensor) -> torch.Tensor:
        """Backend bias (or its gradient) -> canonical ``[d_out]``."""
        return bias.reshape(self.d_out)

    def from_canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """Canonical ``[d_out, d_in]`` -> backend layout (inverse of ``to_canonical``)."""
        if self.layout == "out_in":
            return weight
        if self.layout == "in_out":
            return weight.transpose(0, 1)
        if self.layout == "heads_in_head":
            d_head = self._d_head()
            return weight.reshape(-1, d_head, self.d_in).permute(0, 2, 1)
        if self.layout == "heads_head_out":
            d_head = self._d_head()
            return weight.transpose(0, 1).reshape(-1, d_head, self.d_out)
        raise ValueError(f"unknown layout {self.layout!r}")

    def _d_head(self) -> int:
        if not self.backend_shape:
            raise ValueError(f"{self.name}: backend shape unknown")
        return self.backend_shape[-1] if self.layout == "heads_in_head" else self.backend_shape[1]


DEFAULT_MAX_LENGTH = 512


class WeightCapture:
    """What a capture context collects for a set of tracked weights.

    After the forward pass ``activations[name]`` is ``[batch, seq, d_in]`` (detached). After ``backward``,
    ``output_grads[name]`` is ``[batch, seq, d_out]`` (the gradient of the backward's scalar w.r.t. the weight's
    output, summed over every use of the output). Both are in the canonical layout.

    Streaming: with ``on_activation(name, a)`` / ``on_output_grad(name, g)`` the tensors are handed to the callbacks
    as they arrive (in the forward pass and during backward) instead of being stored, so that a caller can fold
    them into running sums and free them at once. ``outputs`` lists the output tensors whose gradients are captured
    (what a backward needs to reach; differentiating to them skips the weights' own gradients).

    ``recomputed``: the model runs with gradient checkpointing (non-reentrant), so the backward re-runs each block's
    forward: only a weight's first forward call is captured (the recomputation's repeat of it is ignored, and its
    output gradient arrives once, on the first call's output).
    """

    def __init__(
        self,
        infos: Sequence[WeightInfo],
        *,
        on_activation: Callable[[str, torch.Tensor], None] | None = None,
        on_output_grad: Callable[[str, torch.Tensor], None] | None = None,
        recomputed: bool = False,
    ) -> None:
        self.infos = {info.name: info for info in infos}
        self.activations: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.outputs: list[torch.Tensor] = []
        self.on_activation = on_activation
        self.on_output_grad = on_output_grad
        self.recomputed = recomputed
        self._seen: set[tuple[str, str]] = set()
        self._watched: set[str] = set()  # outputs whose gradient hook is installed (checked under recomputation)
        self._arrived: set[str] = set()
        layers = [info.layer for info in infos if info.layer is not None]
        self._lowest = min(layers) if layers else None

    def _repeat(self, name: str, what: str) -> bool:
        """Under gradient checkpointing: whether this call is the recomputation's repeat (then it is ignored)."""
        if not self.recomputed:
            return False
        if (name, what) in self._seen:
            return True
        self._seen.add((name, what))
        return False

    def clear(self) -> None:
        self.activations.clear()
        self.output_grads.clear()
        self.outputs.clear()
        self._seen.clear()
        self._watched.clear()
        self._arrived.clear()

    def _store_activation(self, name: str, activation: torch.Tensor) -> None:
        if self._repeat(name, "input"):
            return
        activation = activation.detach()
        if self.on_activation is not None:
            self.on_activation(name, activation)
        else:
            self.activations[name] = activation

    def _watch_output(
        self, name: str, output: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """Register the gradient hook on a weight's output tensor (``transform`` maps it to ``[B, T, d_out]``)."""
        if not output.requires_grad or self._repeat(name, "output"):
            return
        layer = self.infos[name].layer
        if not self.recomputed or layer is None or layer == self._lowest:
            # under gradient checkpointing only the lowest block's outputs are the backward's targets (every later
            # output lies on the way to them, so their hooks fire too) and nothing else is held, as checkpointing asks
            self.outputs.append(output)
        self._watched.add(name)
        output.register_hook(lambda grad: self._store_grad(name, grad if transform is None else transform(grad)))

    def check_complete(self) -> None:
        """After the backward under recomputation: every watched output received its gradient (else an error
        rather than missing statistics)."""
        missing = sorted(self._watched - self._arrived) if self.recomputed else []
        if missing:
            raise RuntimeError(
                f"gradient checkpointing: no output gradient reached {missing[:4]}; fit or score "
                "without --gradient-checkpointing"
            )

    def _store_grad(self, name: str, grad: torch.Tensor) -> None:
        self._arrived.add(name)
        grad = grad.detach()
        if self.on_output_grad is not None:
            self.on_output_grad(name, grad)
        elif name in self.output_grads:  # the output was used more than once: gradients add
            self.output_grads[name] = self.output_grads[name] + grad
        else:
            self.output_grads[name] = grad

    def per_example_gradient(self, name: str, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example gradient ``[batch, d_out, d_in (+1 if bias)]`` rebuilt from the capture.

        ``mask``: optional ``[batch, seq]`` weights on token positions (applied to the output gradients).
        The bias column, when the weight has one, is appended last (bias folded into the input as a 1).
        """
        info = self.infos[name]
        a = self.activations[name]
        g = self.output_grads[name]
        if mask is not None:
            g = g * mask.unsqueeze(-1).to(g.dtype)
        if info.has_bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return torch.einsum("bto,bti->boi", g, a)


class ModelAdapter(ABC):
    """A causal LM seen through one naming scheme. Subclasses: ``HFAdapter``, ``TransformerLensAdapter``.

    ``logits(input_ids, attention_mask) -> [batch, seq, vocab]``. Hooks are installed only inside the
    ``capture_*`` contexts and always removed on exit.
    """

    model: nn.Module
    tokenizer: object | None

    # ---- structure ---------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def n_layers(self) -> int: ...

    @property
    @abstractmethod
    def d_model(self) -> int: ...

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model is configured for (``None`` when the config does not say)."""
        return None

    def resolve_max_length(self, max_length: int | None) -> int:
        """``max_length`` checked against the model's context (``None``: the context, at most 512). Longer than
        the context is an error naming ``--max-length`` (positions past it are untrained or out of range)."""
        context = self.context_length
        if max_length is None:
            return min(DEFAULT_MAX_LENGTH, context) if context else DEFAULT_MAX_LENGTH
        if max_length < 2:
            raise ValueError(f"--max-length (max_length) must be at least 2, got {max_length}")
        if context and max_length > context:
            raise ValueError(
                f"--max-length (max_length) {max_length} is longer than the model's context of {context} "
                f"tokens; use at most {context}"
            )
        return int(max_length)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def backend(self) -> str:
        return type(self).__name__

    def residual_sites(self) -> list[str]:
        return [f"resid.{layer}" for layer in range(self.n_layers)]

    def check_layer(self, layer: int) -> int:
        """Validate a layer index (negative counts from the end); returns the non-negative index."""
        if not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        resolved = layer + self.n_layers if layer < 0 else layer
        if not 0 <= resolved < self.n_layers:
            raise ValueError(
                f"layer {layer} out of range: this model has {self.n_layers} blocks (0..{self.n_layers - 1})"
            )
        return resolved

    @abstractmethod
    def tracked_weights(self) -> list[WeightInfo]:
        """Every trackable weight matrix of attention and MLP, in block order."""

    def weight_info(self, name: str) -> WeightInfo:
        for info in self.tracked_weights():
            if info.name == name:
                return info
        raise KeyError(f"no tracked weight {name!r}; known: {[i.name for i in self.tracked_weights()]}")

    def weights_up_to(self, layer: int) -> list[WeightInfo]:
        """Tracked weights in blocks ``<= layer`` (the only ones a readout at ``resid.{layer}`` depends on)."""
        layer = self.check_layer(layer)
        return [info for info in self.tracked_weights() if info.layer <= layer]

    def parameter(self, path: str) -> nn.Parameter:
        return self.model.get_parameter(path)

    # ---- sharding ----------------------------------------------------------------------------------------------
    def decoder_blocks(self) -> list[nn.Module]:
        """The model's decoder blocks in order (what FSDP wraps one by one)."""
        blocks = getattr(self, "blocks", None)
        if blocks is None:
            blocks = getattr(self.model, "blocks", None)
        if blocks is None:
            raise ValueError(f"{type(self).__name__}: cannot find the decoder blocks to shard")
        return list(blocks)

    def shard(self, shard: str = "fsdp") -> ModelAdapter:
        """``shard="fsdp"``: wrap the model with FSDP2 (``fully_shard`` on each decoder block, then the root) over
        ``torch.distributed`` (initialised by the caller, e.g. ``torchrun``); ``"none"``: leave it. Returns self."""
        if shard not in ("none", "fsdp"):
            raise ValueError(f"shard (--fsdp) must be 'none' or 'fsdp', got {shard!r}")
        if shard == "fsdp":
            shard_model(self.model, self.decoder_blocks())
        return self

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are sharded with FSDP (``DTensor``s)."""
        return is_sharded(self.model)

    def hidden_and_head(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
        """The input of the output head ``[batch, seq, d]`` (with its graph) and the head (``-> logits``), so that
        a loss can be computed a few rows at a time without materialising ``[batch, seq, vocab]`` logits. ``None``
        when the backend cannot split them (callers then use ``logits``)."""
        return None

    # ---- forward -----------------------------------------------------------------------------------------------
    @abstractmethod
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, seq]`` token ids -> ``[batch, seq, vocab]`` logits (right padding assumed)."""

    @contextlib.contextmanager
    def capture_residual(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Inside the context, each forward fills ``out[l]`` with ``resid.{l}`` ``[batch, seq, d_model]``.

        The tensors keep the autograd graph (differentiable readouts for influence functions).
        """
        layers = [self.check_layer(layer) for layer in layers]
        out: dict[int, torch.Tensor] = {}
        remove = self._install_residual_hooks(layers, out)
        try:
            yield out
        finally:
            remove()

    @abstractmethod
    def _install_residual_hooks(self, layers: Sequence[int], out: dict[int, torch.Tensor]) -> Callable[[], None]:
        """Install hooks storing ``resid.{l}`` into ``out[l]``; return a function removing them."""

    @contextlib.contextmanager
    def capture_weights(
        self,
        names: Sequence[str] | None = None,
        *,
        on_activation: Callable[[str, torch.Tensor], None] | None = None,
        on_output_grad: Callable[[str, torch.Tensor], None] | None = None,
        checkpointing: bool = False,
    ) -> Iterator[WeightCapture]:
        """Capture input activations and output gradients of the named tracked weights (default: all); with the
        callbacks they are streamed to them instead of stored (see ``WeightCapture``). ``checkpointing``: run the
        blocks with gradient checkpointing inside the context (activations recomputed in the backward; one
        forward + backward per capture context)."""
        infos = self.tracked_weights() if names is None else [self.weight_info(n) for n in names]
        capture = WeightCapture(
            infos, on_activation=on_activation, on_output_grad=on_output_grad, recomputed=checkpointing
        )
        remove = self._install_weight_hooks(infos, capture)
        try:
            with self.gradient_checkpointing() if checkpointing else contextlib.nullcontext():
                yield capture
            capture.check_complete()
        finally:
            remove()
            # the outputs' gradient hooks refer to the capture: holding the outputs would make a cycle through the
            # autograd graph that Python's collector cannot see (the whole graph of every batch would leak)
            capture.outputs.clear()

    def gradient_checkpointing(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the model's blocks run with (non-reentrant) gradient checkpointing."""
        raise ValueError(
            f"gradient checkpointing (--gradient-checkpointing) is not supported for {type(self).__name__} "
            "models; use a Hugging Face model or leave it off"
        )

    @abstractmethod
    def _install_weight_hooks(self, infos: Sequence[WeightInfo], capture: WeightCapture) -> Callable[[], None]:
        """Install hooks filling ``capture.activations``/``capture.output_grads``; return a remover."""

    # ---- gradients in canonical layout -------------------------------------------------------------------------
    def canonical_gradient(self, name: str) -> torch.Tensor:
        """Autograd's ``.grad`` of a tracked weight in canonical layout ``[d_out, d_in (+1 if bias)]``."""
        info = self.weight_info(name)
        grad = self.parameter(info.param_name).grad
        if grad is None:
            raise RuntimeError(f"{name}: no gradient (run backward first)")
        grad = info.to_canonical(grad)
        if info.has_bias:
            bias_grad = self.parameter(info.bias_name).grad
            bias_grad = (
                torch.zeros(info.d_out, dtype=grad.dtype, device=grad.device)
                if bias_grad is None
                else info.bias_to_canonical(bias_grad)
            )
            grad = torch.cat([grad, bias_grad.unsqueeze(1)], dim=1)
        return grad

    def fingerprint(self) -> str:
        """A short hash of the model's parameters (names, shapes, values), for artifacts made against it. Cached
        until a parameter is replaced or changed in place (storage pointers and version counters), so repeated
        checks do not rehash the weights."""
        key = tuple((local_shard(p).data_ptr(), local_shard(p)._version) for p in self.model.parameters())
        cached = self.__dict__.get("_fingerprint_cache")
        if cached is None or cached[0] != key:
            cached = (key, model_fingerprint(self.model))
            self.__dict__["_fingerprint_cache"] = cached
        return cached[1]

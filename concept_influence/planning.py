"""Cost planner: memory and compute of a factor fit, the Λ pass and a gradient store, from a model's config alone.

The model is read as shapes (``ArchShape``) from a folder's ``config.json`` (``transformers.AutoConfig``, nothing
downloaded) or from the bundled table of Llama-3.x, Qwen2.5, Mistral and Gemma families (``MODEL_TABLE``). The
memory arithmetic is the fit's own (``curvature.budget``: the same partitioning ``fit_factors(max_memory=...)``
does), so the predicted peak is the one the fit aims at. Compute is in floating-point operations, turned into hours
with a throughput that is an assumption (printed), not a measurement.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from concept_influence.curvature.budget import (
    ModelShape,
    WeightShape,
    activation_bytes,
    eigen_workspace_bytes,
    factor_bytes,
    format_size,
    partitions,
    precondition_workspace_bytes,
    score_partitions,
    score_vector_bytes,
    shared_input_key,
    weights_bytes,
)
from concept_influence.curvature.config import FactorConfig
from concept_influence.distributed.ownership import weight_owners
from concept_influence.sharding import ShardSettings, owner_loads
from concept_influence.store.activations import bytes_per_row
from concept_influence.store.store import DEFAULT_IDENTITY_RANK, DEFAULT_RANK

# resident memory of the fit-factors process apart from the model, its activations and factors (measured on CPU)
RUNTIME_BYTES = 450 * 1024**2
# assumed sustained throughputs (FLOP/s): one CPU core in float32, and a data-centre GPU in bf16 at ~40% use
CPU_FLOPS = 2.0e10
GPU_FLOPS = 3.0e14
HEAD_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class ArchShape:
    """A decoder-only transformer's shapes (Llama-style gated MLP unless ``gated_mlp=False``)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    gated_mlp: bool = True

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def weights(self, up_to_layer: int | None = None) -> list[WeightShape]:
        """Tracked weights in the library's naming scheme, blocks ``0..up_to_layer`` (default all)."""
        last = self.layers - 1 if up_to_layer is None else up_to_layer
        if not 0 <= last < self.layers:
            raise ValueError(
                f"--up-to-layer {up_to_layer} out of range: {self.name} has {self.layers} blocks (0..{self.layers - 1})"
            )
        q_out, kv_out = self.heads * self.d_head, self.kv_heads * self.d_head
        b = int(self.qkv_bias)
        kinds = [
            ("attn.q", self.hidden + b, q_out, self.qkv_bias),
            ("attn.k", self.hidden + b, kv_out, self.qkv_bias),
            ("attn.v", self.hidden + b, kv_out, self.qkv_bias),
            ("attn.o", q_out, self.hidden, False),
        ]
        if self.gated_mlp:
            kinds.append(("mlp.gate", self.hidden, self.intermediate, False))
        kinds += [("mlp.in", self.hidden, self.intermediate, False), ("mlp.out", self.intermediate, self.hidden, False)]
        out = []
        for layer in range(last + 1):
            for kind, d_in, d_out, bias in kinds:
                name = f"blocks.{layer}.{kind}"
                out.append(WeightShape(name, d_in, d_out, shared_input_key(name, bias)))
        return out

    @property
    def block_params(self) -> int:
        """Parameters of one decoder block (its weights, biases and two norms)."""
        return sum(w.d_in * w.d_out for w in self.weights(0)) + 2 * self.hidden

    @property
    def n_params(self) -> int:
        return (
            self.layers * self.block_params + self.vocab * self.hidden * (1 if self.tie_embeddings else 2) + self.hidden
        )

    def model_shape(self, param_bytes: int) -> ModelShape:
        return ModelShape(self.layers, self.hidden, self.intermediate, self.vocab, self.n_params, param_bytes)


def _arch(
    name: str, hidden: int, intermediate: int, layers: int, heads: int, kv: int, vocab: int, **kw: Any
) -> ArchShape:
    return ArchShape(name, hidden, intermediate, layers, heads, kv, vocab, **kw)


# shapes only (from the models' published config.json files); keys are lower-case hub names without the owner
MODEL_TABLE: dict[str, ArchShape] = {
    a.name.split("/")[-1].lower(): a
    for a in [
        _arch("meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, head_dim=64, tie_embeddings=True),
        _arch("meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, head_dim=128, tie_embeddings=True),
        _arch("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256),
        _arch("meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256),
        _arch("meta-llama/Llama-3.3-70B", 8192, 28672, 80, 64, 8, 128256),
        _arch("Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, tie_embeddings=True, qkv_bias=True),
        _arch("Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, tie_embeddings=True, qkv_bias=True),
        _arch("Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, tie_embeddings=True, qkv_bias=True),
        _arch("Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
        _arch("Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, qkv_bias=True),
        _arch("Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, qkv_bias=True),
        _arch("Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, qkv_bias=True),
        _arch("mistralai/Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768),
        _arch("mistralai/Mistral-Nemo-Base-2407", 5120, 14336, 40, 32, 8, 131072, head_dim=128),
        _arch("mistralai/Mistral-Small-24B-Base-2501", 5120, 32768, 40, 32, 8, 131072, head_dim=128),
        _arch("google/gemma-2b", 2048, 16384, 18, 8, 1, 256000, head_dim=256, tie_embeddings=True),
        _arch("google/gemma-7b", 3072, 24576, 28, 16, 16, 256000, head_dim=256, tie_embeddings=True),
        _arch("google/gemma-2-2b", 2304, 9216, 26, 8, 4, 256000, head_dim=256, tie_embeddings=True),
        _arch("google/gemma-2-9b", 3584, 14336, 42, 16, 8, 256000, head_dim=256, tie_embeddings=True),
        _arch("google/gemma-2-27b", 4608, 36864, 46, 32, 16, 256000, head_dim=128, tie_embeddings=True),
    ]
}


def resolve_arch(model: str | os.PathLike) -> ArchShape:
    """A folder holding ``config.json`` (read with ``AutoConfig``) or a name in ``MODEL_TABLE`` (owner and
    ``-Instruct``/``-it`` suffixes ignored, case-insensitive)."""
    path = Path(model)
    if (path / "config.json").exists():
        from transformers import AutoConfig

        return arch_from_config(AutoConfig.from_pretrained(str(path)), name=str(path))
    key = str(model).split("/")[-1].lower()
    for suffix in ("-instruct", "-it", "-chat"):
        key = key.removesuffix(suffix)
    if key in MODEL_TABLE:
        return MODEL_TABLE[key]
    known = ", ".join(sorted(MODEL_TABLE))
    raise ValueError(f"--model {model}: not a folder with config.json and not in the bundled table ({known})")


def arch_from_config(config: Any, name: str = "model") -> ArchShape:
    """Shapes from a ``transformers`` config (Llama/Qwen2/Mistral/Gemma-style or GPT-2)."""

    def get(*keys, default=None):
        return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)

    hidden = int(get("hidden_size", "n_embd"))
    heads = int(get("num_attention_heads", "n_head"))
    gated = getattr(config, "model_type", "") not in ("gpt2", "gpt_neox", "opt")
    return ArchShape(
        name=name,
        hidden=hidden,
        intermediate=int(get("intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden),
        layers=int(get("num_hidden_layers", "n_layer")),
        heads=heads,
        kv_heads=int(get("num_key_value_heads", default=heads)),
        vocab=int(config.vocab_size),
        head_dim=get("head_dim"),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=bool(get("attention_bias", default=getattr(config, "model_type", "") == "qwen2")),
        gated_mlp=gated,
    )


@dataclass(frozen=True)
class Stage:
    """One stage's resident memory (bytes) and compute (FLOP)."""

    name: str
    memory_bytes: int
    flops: float
    note: str = ""


def plan(
    model: str | os.PathLike | ArchShape,
    rows: int,
    tokens: int,
    *,
    up_to_layer: int | None = None,
    max_memory: int | None = None,
    rank: int | None = None,
    gpus: int = 0,
    gpu_memory: int | None = None,
    batch_size: int = 8,
    model_dtype_bytes: int = 4,
    config: FactorConfig = FactorConfig(),
    fit_rows: int | None = None,
    cache_layers: Sequence[int] | None = None,
    sharding: ShardSettings = ShardSettings(),
) -> dict[str, Any]:
    """The plan of ``fit-factors`` (and the Λ pass and a store of rank-``rank`` projected gradients) for ``rows``
    rows of ``tokens`` tokens. Returns a JSON-ready dict: ``factor_bytes``, ``peak_memory_bytes`` (the predicted
    peak of ``fit-factors`` under these settings, per process), ``stages`` (memory and compute of each), the
    partitions, and the sample settings that fit ``max_memory`` (or ``gpu_memory``). ``caches``: the size of what
    ``build-store`` writes for the recommended method (the activation cache at ``cache_layers``, default every
    layer, and the identity gradient store), per row and for all rows. ``sharding.shard="fsdp"``: the same fields
    for ``gpus`` processes under FSDP2 (``fsdp_plan``), and its details under ``"fsdp"``."""
    arch = model if isinstance(model, ArchShape) else resolve_arch(model)
    if rows < 1 or tokens < 1:
        raise ValueError(f"--rows and --tokens must be positive, got {rows} and {tokens}")
    if sharding.shard == "fsdp" and gpus < 1:
        raise ValueError(f"--shard fsdp needs --gpus N >= 1 (the processes that share the model), got --gpus {gpus}")
    shapes = arch.weights(up_to_layer)
    budget_total = gpu_memory if gpus and gpu_memory else max_memory
    params_bytes = arch.n_params * model_dtype_bytes
    batch = max(1, min(batch_size, rows))
    acts = activation_bytes(arch.model_shape(model_dtype_bytes), batch, tokens, head_chunk_elements=HEAD_CHUNK_ELEMENTS)
    workspace = eigen_workspace_bytes(shapes, config)
    fixed = RUNTIME_BYTES + params_bytes + acts + workspace
    error = None
    on_disk = budget_total is not None  # a bounded fit writes each eigendecomposition and result as it is done
    try:
        parts = (
            partitions(shapes, None if budget_total is None else budget_total - fixed, config, on_disk=on_disk)
            if budget_total is None or budget_total > fixed
            else None
        )
    except ValueError as err:
        parts, error = None, str(err)
    if parts is None:
        parts = [[w] for w in shapes]
        error = error or f"the budget {format_size(budget_total or 0)} is below the fixed cost {format_size(fixed)}"
    held = max(weights_bytes(p, config, on_disk=on_disk) for p in parts)
    if not on_disk and config.needs_covariances:  # an unbounded fit also returns the covariance matrices
        held += sum(8 * (w.d_in**2 + w.d_out**2) for w in shapes)
    peak = fixed + held
    fit_n = min(rows, fit_rows) if fit_rows else rows
    n_procs = max(gpus, 1)
    active = sum(w.d_in * w.d_out for w in shapes)
    fwd_bwd = 6.0 * arch.n_params * fit_n * tokens / n_procs  # forward + backward through every block
    cov_flops = 2.0 * fit_n * tokens * sum(w.d_in**2 + w.d_out**2 for w in shapes) / n_procs
    eig_flops = 9.0 * sum(w.d_in**3 + w.d_out**3 for w in shapes)
    lam_rows = min(fit_n, config.lambda_rows or fit_n)
    lam_flops = (
        6.0 * arch.n_params * lam_rows * tokens
        + 2.0 * lam_rows * tokens * (2 * active + sum(w.d_in**2 + w.d_out**2 for w in shapes))
    ) / n_procs
    if rank is None:
        rank = DEFAULT_RANK
    # the eigen store keeps sum_w min(K, d_out) x min(K, d_in) components per row, float32 (its default dtype)
    store_row = 4 * sum(min(rank, w.d_out) * min(rank, w.d_in) for w in shapes)
    # without factors, build-store writes the store in the fit's Λ pass, whose forward it shares (a backward is about
    # two forwards: 4 of the 6 flops per parameter and token remain); partitions, a budget, a sample, several
    # processes or checkpointing give it a pass of its own
    shared = (
        len(parts) == 1
        and budget_total is None
        and fit_n == rows
        and not config.lambda_rows
        and n_procs == 1
        and not config.gradient_checkpointing
    )
    store_flops = (
        (4.0 if shared else 6.0) * arch.n_params * rows * tokens
        + 2.0 * rows * tokens * rank * sum(w.d_in + w.d_out for w in shapes)
    ) / n_procs
    sums = sum(4 * (w.d_in**2 + w.d_out**2) for w in shapes)
    score_peak, score_parts, score_error = _score_peak(
        shapes, RUNTIME_BYTES + params_bytes + acts, budget_total, max(model_dtype_bytes, 4)
    )
    score_passes = score_parts if score_error is None else 1
    score_flops = (6.0 * arch.n_params * rows * tokens + 4.0 * rows * tokens * active) * score_passes / n_procs
    stages = [
        Stage(
            "factors",
            factor_bytes(shapes),
            fwd_bwd + cov_flops,
            f"A and S of {len(shapes)} weights, float32; covariance pass over {fit_n} rows",
        ),
        Stage("eigendecomposition", sums * 2 + workspace, eig_flops, "float64, one matrix at a time"),
        Stage(
            "lambda",
            sum(2 * (4 + 8) * w.d_in * w.d_out for w in shapes),
            lam_flops,
            f"Λ and the diagonal over {lam_rows} rows",
        ),
        Stage(
            "activations",
            acts,
            0.0,
            f"one batch of {batch} rows x {tokens} tokens, logits {HEAD_CHUNK_ELEMENTS} at a time",
        ),
        Stage(
            "store",
            rows * store_row,
            store_flops,
            f"{rows} rows x rank {rank}x{rank} per weight, float32; "
            + ("written in the fit's Λ pass (its forward shared)" if shared else "a pass of its own"),
        ),
        Stage(
            "scoring",
            score_peak,
            score_flops,
            f"one query's exact pass over {rows} rows"
            + (
                f" in {score_parts} partition{'s' if score_parts != 1 else ''}"
                if score_error is None
                else " (does not fit the budget)"
            )
            + ("" if budget_total else ", every weight's factors loaded"),
        ),
    ]
    flops_rate = GPU_FLOPS if gpus else CPU_FLOPS
    fits = None if budget_total is None else peak <= budget_total
    suggestions = (
        _sample_settings(arch, shapes, rows, tokens, budget_total, config, model_dtype_bytes, batch)
        if budget_total
        else []
    )
    layers = sorted(set(cache_layers)) if cache_layers else list(range(arch.layers))
    bad = [layer for layer in layers if not 0 <= layer < arch.layers]
    if bad:
        raise ValueError(
            f"--cache-layers {bad} out of range: {arch.name} has {arch.layers} blocks (0..{arch.layers - 1})"
        )
    activation_row = bytes_per_row(arch.hidden, len(layers))
    identity_row = (
        4 * sum(min(DEFAULT_IDENTITY_RANK, w.d_out) * min(DEFAULT_IDENTITY_RANK, w.d_in) for w in shapes) + 16
    )
    caches = {
        "layers": layers,
        "activation_bytes_per_row": int(activation_row),
        "identity_rank": DEFAULT_IDENTITY_RANK,
        "gradient_bytes_per_row": int(identity_row),
        "bytes": int(rows * (activation_row + identity_row)),
        "hours": (
            (
                6.0 * arch.n_params * rows * tokens
                + 2.0 * rows * tokens * DEFAULT_IDENTITY_RANK * sum(w.d_in + w.d_out for w in shapes)
            )
            / n_procs
        )
        / flops_rate_of(gpus)
        / 3600,
    }
    out = {
        "model": arch.name,
        "n_params": arch.n_params,
        "caches": caches,
        "weights": len(shapes),
        "up_to_layer": up_to_layer if up_to_layer is not None else arch.layers - 1,
        "rows": rows,
        "tokens": tokens,
        "fit_rows": fit_n,
        "factor_bytes": factor_bytes(shapes),
        "peak_memory_bytes": int(peak),
        "fixed_bytes": {
            "runtime": RUNTIME_BYTES,
            "parameters": params_bytes,
            "activations": acts,
            "eigen_workspace": workspace,
        },
        "partitions": len(parts),
        "partition_bytes": int(held),
        "budget_bytes": budget_total,
        "fits_budget": fits,
        "budget_error": error,
        "processes": n_procs,
        "assumed_flops_per_s": flops_rate,
        "stages": [{**asdict(s), "hours": s.flops / flops_rate / 3600} for s in stages],
        "total_hours": sum(s.flops for s in stages[:3]) / flops_rate / 3600,
        "settings_that_fit": suggestions,
        "score_peak_memory_bytes": int(score_peak),
        "score_partitions": score_parts,
        "score_budget_error": score_error,
    }
    if sharding.shard == "fsdp":
        out = fsdp_plan(
            out, arch, shapes, config=config, sharding=sharding, dtype_bytes=model_dtype_bytes, batch=batch, rank=rank
        )
    return out


def fsdp_parameter_bytes(arch: ArchShape, dtype_bytes: int, world: int, prefetch_blocks: int = 2) -> dict[str, int]:
    """Parameter memory of one process under FSDP2 (each decoder block ``fully_shard``-ed, then the root):
    ``parameters`` its shard (1/``world``), ``gathered`` what is all-gathered at once: the root's own parameters
    (embeddings, final norm, head: FSDP2 keeps the root gathered from forward to backward) and ``prefetch_blocks``
    blocks (the running one and the prefetched next)."""
    block = arch.block_params * dtype_bytes
    root = (arch.n_params - arch.layers * arch.block_params) * dtype_bytes
    return {
        "parameters": -(-arch.n_params * dtype_bytes // world),
        "gathered": root + min(prefetch_blocks, arch.layers) * block,
        "root": root,
        "block": block,
    }


def _largest_term(terms: dict[str, int]) -> str:
    name, size = max(terms.items(), key=lambda kv: kv[1])
    return f"its largest term is {name}, {format_size(size)}"


def _fsdp_fit(
    arch: ArchShape,
    shapes: list[WeightShape],
    budget: int | None,
    config: FactorConfig,
    sharding: ShardSettings,
    dtype_bytes: int,
    world: int,
    batch: int,
    tokens: int,
) -> dict[str, Any]:
    """Peak of a sharded fit. A pass holds the parameter shard, the gathered parameters, one batch's activations
    and one group's statistics (every rank sums the group's covariances over its rows; they are reduced to the
    owners, who decompose them and write their files; the eigenbases go back to every rank for the group's Λ pass,
    whose sums are reduced the same way). The owners' eigendecompositions run between passes (no activations)."""
    mem = fsdp_parameter_bytes(arch, dtype_bytes, world, sharding.prefetch_blocks)
    acts = activation_bytes(arch.model_shape(dtype_bytes), batch, tokens, head_chunk_elements=HEAD_CHUNK_ELEMENTS)
    workspace = eigen_workspace_bytes(shapes, config)
    fixed = RUNTIME_BYTES + mem["parameters"] + max(mem["gathered"] + acts, workspace)
    on_disk = budget is not None or world > 1  # over several ranks the owners write each result as it is done
    one_pass = weights_bytes(shapes, config, on_disk=on_disk)
    error = None
    if budget is not None and fixed >= budget:
        groups = [[w] for w in shapes]
        terms = {
            f"the parameter shard (1/{world})": mem["parameters"],
            f"the gathered parameters (embeddings and head, {sharding.prefetch_blocks} blocks)": mem["gathered"],
            f"the activations of one batch of {batch} x {tokens} tokens": acts,
            "the eigen work space": workspace,
        }
        error = f"the budget {format_size(budget)} is below the fixed cost {format_size(fixed)}; {_largest_term(terms)}"
    elif budget is None or sharding.accumulate == "all":
        groups = [list(shapes)]
        if budget is not None and fixed + one_pass > budget:
            error = (
                f"--accumulate all keeps the covariance sums of all {len(shapes)} weights on every rank, "
                f"{format_size(one_pass)}, more than the {format_size(budget - fixed)} left: use --accumulate groups"
            )
    else:
        try:
            groups = partitions(shapes, budget - fixed, config, on_disk=True)
        except ValueError as err:
            groups, error = [[w] for w in shapes], str(err)
    held = max(weights_bytes(g, config, on_disk=on_disk) for g in groups)
    if not on_disk and config.needs_covariances:  # an unbounded fit also returns the covariance matrices
        held += sum(8 * (w.d_in**2 + w.d_out**2) for w in shapes)
    return {
        **mem,
        "activations": acts,
        "eigen_workspace": workspace,
        "fixed": fixed,
        "group_list": groups,
        "groups": len(groups),
        "group_bytes": held,
        "one_pass_bytes": one_pass,
        "peak": fixed + held,
        "error": error,
    }


def _fsdp_score(
    shapes: list[WeightShape], fixed: int, budget: int | None, work_bytes: int
) -> tuple[int, int, str | None]:
    """Peak of a sharded exact scoring pass, its partitions and why the budget fails. Per partition of weights, the
    owners precondition their weights' query gradients (one weight's factors at a time) and broadcast them; every
    rank then scores its rows against the partition's vectors."""
    workspace = precondition_workspace_bytes(shapes)
    error = None
    if budget is None:
        parts = [list(shapes)]
    elif budget <= fixed + workspace:
        parts = None
        error = f"the budget {format_size(budget)} is below the fixed cost {format_size(fixed + workspace)}"
    else:
        try:
            parts = score_partitions(shapes, budget - fixed - workspace, work_bytes)
        except ValueError as err:
            parts, error = None, str(err)
    if parts is None:
        parts = [[w] for w in shapes]
    held = max(sum(score_vector_bytes(w, work_bytes) for w in p) for p in parts)
    return fixed + workspace + held, len(parts), error


def owned_file_bytes(
    shapes: Sequence[WeightShape], owners: dict[str, int], world: int, config: FactorConfig
) -> list[int]:
    """Bytes of the factor files each rank writes in a sharded fit (its owned weights' parts, float64): the
    eigendecompositions (values and vectors; a shared input's once) and Λ and the diagonal ``[d_out, d_in']``."""
    loads, seen = [0] * world, set()
    for w in shapes:
        rank = owners[w.name]
        if config.needs_covariances:
            key = w.shared_input or w.name
            if key not in seen:
                seen.add(key)
                loads[rank] += 8 * (w.d_in * w.d_in + w.d_in)
            loads[rank] += 8 * (w.d_out * w.d_out + w.d_out)
        if config.needs_per_example_pass:
            loads[rank] += 8 * w.d_out * w.d_in * (2 if config.preconditioner == "ekfac" else 1)
    return loads


def fsdp_plan(
    out: dict[str, Any],
    arch: ArchShape,
    shapes: list[WeightShape],
    *,
    config: FactorConfig,
    sharding: ShardSettings,
    dtype_bytes: int,
    batch: int,
    rank: int,
) -> dict[str, Any]:
    """``out`` (the data-parallel plan) redone for ``out["processes"]`` processes under FSDP2: the same fields,
    per process, and ``out["fsdp"]`` (owners, gathered parameters, the one-pass accumulation, build-store)."""
    world, rows, tokens, fit_n = out["processes"], out["rows"], out["tokens"], out["fit_rows"]
    budget = out["budget_bytes"]
    fit = _fsdp_fit(arch, shapes, budget, config, sharding, dtype_bytes, world, batch, tokens)
    sizes = {w.name: factor_bytes([w]) for w in shapes}
    owners = weight_owners([(w.name, w.d_in, w.d_out, w.shared_input or w.name) for w in shapes], world)  # the fit's
    loads = owner_loads(sizes, owners, world)
    files = owned_file_bytes(shapes, owners, world, config)
    by_name = {w.name: w for w in shapes}
    eig_by_rank = [0.0] * world
    for name, owner in owners.items():
        eig_by_rank[owner] += 9.0 * (by_name[name].d_in ** 3 + by_name[name].d_out ** 3)
    work_bytes = max(dtype_bytes, 4)
    query = owner_loads({w.name: work_bytes * w.d_out * w.d_in for w in shapes}, owners, world)
    pass_fixed = RUNTIME_BYTES + fit["parameters"] + fit["gathered"] + fit["activations"]
    score_peak, score_parts, score_error = _fsdp_score(shapes, pass_fixed, budget, work_bytes)
    store_row = 4 * sum(min(rank, w.d_out) * min(rank, w.d_in) for w in shapes)
    bases = sum(8 * (min(rank, w.d_out) * w.d_out + min(rank, w.d_in) * w.d_in) for w in shapes)
    store_peak = pass_fixed + bases + batch * store_row
    rows_per_rank = -(-rows // world)
    passes = 2 * fit["groups"] if config.needs_per_example_pass else fit["groups"]
    # compute: every group is a covariance pass (and a Λ pass) over each rank's share of the rows
    fwd = 6.0 * arch.n_params * tokens / world
    lam_rows = min(fit_n, config.lambda_rows or fit_n)
    active = sum(w.d_in * w.d_out for w in shapes)
    flops = {
        "factors": fit["groups"] * fwd * fit_n
        + 2.0 * fit_n * tokens * sum(w.d_in**2 + w.d_out**2 for w in shapes) / world,
        "eigendecomposition": max(eig_by_rank),
        "lambda": (fit["groups"] if config.needs_per_example_pass else 0) * fwd * lam_rows
        + 2.0 * lam_rows * tokens * (2 * active + sum(w.d_in**2 + w.d_out**2 for w in shapes)) / world,
        "scoring": (fwd * rows + 4.0 * rows * tokens * active / world) * score_parts,
    }
    s = 8 if config.dtype == "float64" else 4
    lam_bytes = max(sum(2 * s * w.d_out * w.d_in for w in g) for g in fit["group_list"])
    memory = {
        "factors": fit["group_bytes"],
        "lambda": lam_bytes if config.needs_per_example_pass else 0,
        "eigendecomposition": fit["eigen_workspace"] + max(weights_bytes([w], config, on_disk=True) for w in shapes),
        "store": rows_per_rank * store_row,
        "scoring": score_peak,
    }
    notes = {
        "factors": f"A and S of {len(shapes)} weights ({format_size(out['factor_bytes'])} in all), float32; "
        f"{fit['groups']} group{'s' if fit['groups'] != 1 else ''}, each summed on every rank over its rows and "
        f"reduced to the owners",
        "lambda": f"Λ and the diagonal over {lam_rows} rows, one group at a time (its eigenbases on every rank)",
        "eigendecomposition": f"float64, by the owners in parallel, one matrix at a time (largest owner "
        f"{format_size(max(loads))} of factors)",
        "store": f"{rows_per_rank} rows per rank x rank {rank}x{rank} per weight, float32; each rank writes its shard",
        "scoring": f"one query's exact pass over {rows} rows in {score_parts} "
        + ("partition" if score_parts == 1 else "partitions")
        + ("" if score_error is None else " (does not fit the budget)")
        + ", query slices preconditioned by their owners",
    }
    stages = []
    for stage in out["stages"]:
        name = stage["name"]
        stage = {
            **stage,
            "memory_bytes": int(memory.get(name, stage["memory_bytes"])),
            "flops": flops.get(name, stage["flops"]),
            "note": notes.get(name, stage["note"]),
        }
        stage["hours"] = stage["flops"] / out["assumed_flops_per_s"] / 3600
        stages.append(stage)
    suggestions = []
    if budget:
        for b in sorted({batch, 4, 1}, reverse=True):
            for t in sorted({tokens, min(tokens, 1024), min(tokens, 512)}, reverse=True):
                trial = _fsdp_fit(arch, shapes, budget, config, sharding, dtype_bytes, world, b, t)
                if trial["error"] is None:
                    n = trial["groups"]
                    suggestions.append(
                        {
                            "batch_size": b,
                            "max_length": t,
                            "partitions": n,
                            "passes_over_data": 2 * n if config.needs_per_example_pass else n,
                        }
                    )
    return {
        **out,
        "shard": "fsdp",
        "peak_memory_bytes": int(fit["peak"]),
        "fixed_bytes": {
            "runtime": RUNTIME_BYTES,
            "parameters": fit["parameters"],
            "gathered": fit["gathered"],
            "activations": fit["activations"],
            "eigen_workspace": fit["eigen_workspace"],
        },
        "partitions": fit["groups"],
        "partition_bytes": int(fit["group_bytes"]),
        "fits_budget": None if budget is None else fit["error"] is None and fit["peak"] <= budget,
        "budget_error": fit["error"],
        "stages": stages,
        "total_hours": sum(s["hours"] for s in stages[:3]),
        "settings_that_fit": suggestions,
        "score_peak_memory_bytes": int(score_peak),
        "score_partitions": score_parts,
        "score_budget_error": score_error,
        "fsdp": {
            "accumulate": sharding.accumulate,
            "prefetch_blocks": sharding.prefetch_blocks,
            "full_parameters": arch.n_params * dtype_bytes,
            "root_bytes": fit["root"],
            "block_bytes": fit["block"],
            "passes_over_data": passes,
            "one_pass_bytes": int(fit["one_pass_bytes"]),
            "owned_factor_bytes": loads,
            "owned_file_bytes": files,
            "largest_weight_bytes": max(sizes.values()),
            "owned_query_bytes": query,
            "store_peak_memory_bytes": int(store_peak),
            "store_projection_bytes": int(bases),
            "store_bytes_per_rank": int(rows_per_rank * store_row),
            "cache_bytes_per_rank": int(-(-out["caches"]["bytes"] // world)),
        },
    }


def flops_rate_of(gpus: int) -> float:
    return GPU_FLOPS if gpus else CPU_FLOPS


def _score_peak(
    shapes: list[WeightShape], fixed: int, budget: int | None, work_bytes: int
) -> tuple[int, int, str | None]:
    """Predicted peak of scoring (``compute_influence``), its number of module partitions and why the budget fails
    (or ``None``). Unbounded: every weight's factors (float64 eigenbases, Λ and the diagonal), the float64
    preconditioned vectors and their scoring-precision copies, and the measurement gradients. Bounded: the largest
    weight's factors and one partition's gradients and vectors."""
    if budget is None:
        factors = sum(8 * (w.d_in**2 + w.d_out**2 + 2 * w.d_in * w.d_out) for w in shapes)
        vectors = sum((8 + 2 * work_bytes) * w.d_in * w.d_out for w in shapes)
        return fixed + factors + vectors, 1, None
    workspace = precondition_workspace_bytes(shapes)
    try:
        parts = score_partitions(shapes, budget - fixed - workspace, work_bytes) if budget > fixed + workspace else None
        error = (
            None
            if parts
            else f"the budget {format_size(budget)} is below the fixed cost {format_size(fixed + workspace)}"
        )
    except ValueError as err:
        parts, error = None, str(err)
    if parts is None:  # the least it would need: one weight at a time
        parts = [[w] for w in shapes]
    held = max(sum(score_vector_bytes(w, work_bytes) for w in p) for p in parts)
    return fixed + workspace + held, len(parts), error


def _sample_settings(
    arch: ArchShape,
    shapes: list[WeightShape],
    rows: int,
    tokens: int,
    budget: int,
    config: FactorConfig,
    dtype_bytes: int,
    batch: int,
) -> list[dict[str, Any]]:
    """A few (batch size, max length) settings whose fit peak is within ``budget``, with their partition counts."""
    out = []
    for b in sorted({batch, 4, 1}, reverse=True):
        for t in sorted({tokens, min(tokens, 1024), min(tokens, 512)}, reverse=True):
            acts = activation_bytes(arch.model_shape(dtype_bytes), b, t, head_chunk_elements=HEAD_CHUNK_ELEMENTS)
            fixed = RUNTIME_BYTES + arch.n_params * dtype_bytes + acts + eigen_workspace_bytes(shapes, config)
            if fixed >= budget:
                continue
            try:
                parts = partitions(shapes, budget - fixed, config, on_disk=True)
            except ValueError:
                continue
            out.append(
                {
                    "batch_size": b,
                    "max_length": t,
                    "partitions": len(parts),
                    "passes_over_data": 2 * len(parts) if config.needs_per_example_pass else len(parts),
                }
            )
    return out


def _render_peaks(plan_: dict[str, Any]) -> list[str]:
    """The data-parallel plan's peak lines (fit-factors, scoring)."""
    lines: list[str] = []
    fixed = plan_["fixed_bytes"]
    lines.append(
        f"peak of fit-factors: {format_size(plan_['peak_memory_bytes'])} per process = runtime "
        f"{format_size(fixed['runtime'])} + parameters {format_size(fixed['parameters'])} + activations "
        f"{format_size(fixed['activations'])} + eigen work space {format_size(fixed['eigen_workspace'])} + "
        f"factors of the largest partition {format_size(plan_['partition_bytes'])} "
        f"({plan_['partitions']} partition{'s' if plan_['partitions'] != 1 else ''})"
    )
    parts = plan_["score_partitions"]
    lines.append(
        f"peak of scoring (attribute, exact pass): {format_size(plan_['score_peak_memory_bytes'])} per process "
        + (
            f"({parts} partition{'s' if parts != 1 else ''})"
            if plan_["score_budget_error"] is None
            else f"at least, one weight at a time: does NOT fit ({plan_['score_budget_error']})"
        )
    )
    return lines


def _render_fsdp(plan_: dict[str, Any]) -> list[str]:
    """The FSDP plan's peak lines: fit-factors, the one-pass accumulation, owners, build-store, scoring."""
    fixed, info = plan_["fixed_bytes"], plan_["fsdp"]
    n, groups = plan_["processes"], plan_["partitions"]
    loads = info["owned_factor_bytes"]
    lines = [
        f"peak of fit-factors (fsdp, {n} processes): {format_size(plan_['peak_memory_bytes'])} per process = runtime "
        f"{format_size(fixed['runtime'])} + parameter shard {format_size(fixed['parameters'])} "
        f"({format_size(info['full_parameters'])} / {n}) + max(gathered parameters {format_size(fixed['gathered'])} "
        f"(embeddings and head {format_size(info['root_bytes'])} + {info['prefetch_blocks']} blocks of "
        f"{format_size(info['block_bytes'])}) + activations {format_size(fixed['activations'])}, eigen work space "
        f"{format_size(fixed['eigen_workspace'])}) + statistics of one group {format_size(plan_['partition_bytes'])} "
        f"({groups} group{'s' if groups != 1 else ''}, {info['passes_over_data']} passes over the fit rows)",
        f"  one pass over every weight (--accumulate all) keeps every weight's covariance sums on every rank: "
        f"{format_size(info['one_pass_bytes'])} per process"
        + (
            " (the dominant term)"
            if info["one_pass_bytes"] > max(fixed.values()) and info["one_pass_bytes"] > plan_["partition_bytes"]
            else ""
        ),
        "  factors owned by each rank (reduced to it, decomposed and written by it): "
        + (
            ", ".join(format_size(x) for x in loads)
            if n <= 8
            else f"{format_size(min(loads))} to {format_size(max(loads))}"
        )
        + f" (mean {format_size(sum(loads) / n)}, largest weight "
        f"{format_size(info['largest_weight_bytes'])})",
        f"peak of build-store (fsdp): {format_size(info['store_peak_memory_bytes'])} per process (parameter shard, "
        f"gathered parameters, activations, projections {format_size(info['store_projection_bytes'])} on every rank); "
        f"each rank writes {format_size(info['store_bytes_per_rank'])} of the store and "
        f"{format_size(info['cache_bytes_per_rank'])} of the recommended method's caches",
    ]
    parts = plan_["score_partitions"]
    lines.append(
        f"peak of scoring (attribute, exact pass, fsdp): {format_size(plan_['score_peak_memory_bytes'])} per process "
        + (
            f"({parts} partition{'s' if parts != 1 else ''}; the owners precondition their query slices, at most "
            f"{format_size(max(info['owned_query_bytes']))} per rank, and broadcast one partition at a time)"
            if plan_["score_budget_error"] is None
            else f"at least, one weight at a time: does NOT fit ({plan_['score_budget_error']})"
        )
    )
    return lines


def render(plan_: dict[str, Any]) -> str:
    """A human-readable plan."""
    lines = [
        f"{plan_['model']}: {plan_['n_params'] / 1e9:.2f}B parameters, {plan_['weights']} tracked weights "
        f"(blocks 0..{plan_['up_to_layer']}), {plan_['rows']} rows x {plan_['tokens']} tokens"
        + (f", factors fitted on {plan_['fit_rows']} rows" if plan_["fit_rows"] != plan_["rows"] else ""),
        f"{'stage':<20}{'memory':>14}{'compute':>14}{'time':>12}  note",
    ]
    for s in plan_["stages"]:
        hours = s["hours"]
        time_text = f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.1f} h"
        lines.append(
            f"{s['name']:<20}{format_size(s['memory_bytes']):>14}{s['flops'] / 1e12:>11.1f} TF{time_text:>12}  "
            f"{s['note']}"
        )
    if plan_.get("shard") == "fsdp":
        lines += _render_fsdp(plan_)
    else:
        lines += _render_peaks(plan_)
    caches = plan_["caches"]
    layers = caches["layers"]
    shown = ",".join(map(str, layers)) if len(layers) <= 12 else f"{layers[0]}..{layers[-1]} ({len(layers)} layers)"
    pass_time = f"{caches['hours'] * 60:.1f} min" if caches["hours"] < 1 else f"{caches['hours']:.1f} h"
    lines.append(
        f"caches of build-store (the recommended method; one forward + backward pass, about {pass_time}): activations "
        f"{format_size(caches['activation_bytes_per_row'])} per row "
        f"(layers {shown}, float32 means) + identity gradient store {format_size(caches['gradient_bytes_per_row'])} "
        f"per row (rank {caches['identity_rank']}, eigenbases of a 256-row sample, no EKFAC fit) = "
        f"{format_size(caches['bytes'])} for "
        f"{plan_['rows']} rows"
    )
    lines.append(
        f"time assumes {plan_['assumed_flops_per_s']:.1e} FLOP/s per process x {plan_['processes']} "
        f"(an assumption, not a measurement): about {plan_['total_hours']:.1f} h for factors, eigen and Λ"
    )
    if plan_["budget_bytes"]:
        verdict = "fits" if plan_["fits_budget"] else "does NOT fit"
        lines.append(
            f"budget {format_size(plan_['budget_bytes'])}: {verdict}"
            + (f" ({plan_['budget_error']})" if plan_["budget_error"] else "")
        )
        unit = "groups" if plan_.get("shard") == "fsdp" else "partitions"
        for s in plan_["settings_that_fit"]:
            lines.append(
                f"  fits with --batch-size {s['batch_size']} --max-length {s['max_length']}: {s['partitions']} "
                f"{unit}, {s['passes_over_data']} passes over the fit rows"
            )
        if not plan_["settings_that_fit"]:
            lines.append(
                "  no batch size / max length fits: use more or larger devices, or fewer layers (--up-to-layer)"
            )
    if plan_["fit_rows"] == plan_["rows"] and plan_["rows"] > 4096:
        lines.append(
            "fit on a sample to save time: --fit-rows 4096 (covariances and Λ), scores still cover all "
            f"{plan_['rows']} rows"
        )
    return "\n".join(lines)


def log_log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent ``b`` of ``y ≈ a xᵇ``."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / den if den else float("nan")

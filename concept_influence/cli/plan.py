"""``concept-influence plan``: memory and compute of fitting factors, the Λ pass and a gradient store, from a config."""

from __future__ import annotations

import json
from typing import Any

import typer

from concept_influence.cli.common import batch_size_flag, user_errors
from concept_influence.cli.options import OptionGroup, settings_flags
from concept_influence.sharding import ShardSettings

SHARD_OPTIONS = OptionGroup(ShardSettings, choices=True)
"""``--shard``, ``--accumulate``, ``--prefetch-blocks`` (``ShardSettings``'s fields; typer checks the choices)."""


def register(app: typer.Typer) -> None:
    """Add ``plan`` to the CLI."""

    @app.command("plan")
    @user_errors
    @settings_flags(SHARD_OPTIONS)
    def plan_command(
        model: str = typer.Option(
            ...,
            "--model",
            help="A folder with config.json, or a bundled name (Llama-3.x, Qwen2.5, "
            "Mistral, Gemma; e.g. Qwen/Qwen2.5-7B-Instruct). Nothing is downloaded.",
        ),
        rows: int = typer.Option(..., "--rows", min=1, help="Training rows to score."),
        tokens: int = typer.Option(..., "--tokens", min=1, help="Tokens per row (the longest, or --max-length)."),
        up_to_layer: int | None = typer.Option(
            None, "--up-to-layer", help="Fit only blocks 0..L (the concept's layer)."
        ),
        max_memory: str | None = typer.Option(None, "--max-memory", help="Memory budget of one process, e.g. 3GiB."),
        rank: int | None = typer.Option(
            None,
            "--rank",
            min=1,
            help="Projection rank per weight side of a gradient store (default: the store's default rank).",
        ),
        gpus: int = typer.Option(0, "--gpus", min=0, help="Processes, one per GPU (torchrun); 0: one CPU process."),
        gpu_memory: str | None = typer.Option(
            None, "--gpu-memory", help="Memory of each GPU, e.g. 80GiB (the budget)."
        ),
        batch_size: int = batch_size_flag(),
        dtype: str = typer.Option("float32", "--dtype", help="Model dtype (float32, bfloat16)."),
        fit_rows: int | None = typer.Option(None, "--fit-rows", min=1, help="Fit the factors on a sample of N rows."),
        cache_layers: str | None = typer.Option(
            None,
            "--cache-layers",
            help="Layers of the activation cache whose size is printed, e.g. 8,16,24 (default: every layer).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        *,
        options: dict[str, Any],
    ) -> None:
        """Predict the peak memory and compute of `fit-factors` (per stage: factors, eigendecomposition, Λ,
        activations, store), which partition and sample settings fit a budget, and the size of the caches
        `build-store` writes. Reads only a config.

        Example: concept-influence plan --model Qwen/Qwen2.5-7B-Instruct --rows 10000 --tokens 512 --up-to-layer 20
        --gpus 1 --gpu-memory 80GiB

        With --shard fsdp the processes share the model (FSDP2): parameters / N per process, the gathered blocks,
        one batch's activations, the factors each rank owns, and the stages' memory per process.
        """
        from concept_influence.curvature.budget import parse_size
        from concept_influence.models.hf import resolve_dtype
        from concept_influence.planning import plan, render

        if gpus < 0:
            raise ValueError(f"--gpus must be >= 0, got {gpus}")
        sharding = ShardSettings(**options)
        if sharding.shard == "fsdp" and gpus < 1:
            raise ValueError(
                f"--shard fsdp needs --gpus N >= 1 (the processes that share the model), got --gpus {gpus}"
            )
        if (gpu_memory is None) != (gpus == 0):
            raise ValueError("--gpus and --gpu-memory go together (e.g. --gpus 8 --gpu-memory 80GiB)")
        dtype_bytes = resolve_dtype(dtype).itemsize  # type: ignore[union-attr]
        result = plan(
            model,
            rows,
            tokens,
            up_to_layer=up_to_layer,
            max_memory=parse_size(max_memory) if max_memory else None,
            rank=rank,
            gpus=gpus,
            gpu_memory=parse_size(gpu_memory) if gpu_memory else None,
            batch_size=batch_size,
            model_dtype_bytes=dtype_bytes,
            fit_rows=fit_rows,
            cache_layers=[int(x) for x in cache_layers.split(",")] if cache_layers else None,
            sharding=sharding,
        )
        typer.echo(json.dumps(result, sort_keys=True) if as_json else render(result))

"""``concept-influence fit-factors``: a thin wrapper over ``Attributor.fit_factors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from concept_influence.cli.common import (
    batch_size_flag,
    check_not_inputs,
    check_output,
    device_flag,
    dtype_flag,
    fsdp_flag,
    local_path,
    model_flag,
    seed_flag,
    shard_of,
    user_errors,
)
from concept_influence.cli.options import OptionGroup, settings_flags
from concept_influence.curvature.config import FactorConfig

FIT_OPTIONS = OptionGroup(
    FactorConfig,
    ["fisher", "preconditioner", "dtype", "lambda_rows", "gradient_checkpointing"],
    flags={"dtype": "--stats-dtype"},
)
"""The fit settings ``fit-factors`` takes as flags (``FactorConfig``'s fields; the factors' ``dtype`` keeps its
flag ``--stats-dtype``: ``--dtype`` is the model's); ``--seed`` is the session's."""


def register(app: typer.Typer) -> None:
    """Add ``fit-factors`` to the CLI."""

    @app.command("fit-factors")
    @user_errors
    @settings_flags(FIT_OPTIONS)
    def fit_factors_command(
        model: str = model_flag(),
        data: Path = typer.Option(..., "--data", help="Training data: chat JSONL."),
        out: Path = typer.Option(..., "--out", help="Folder for the factors (manifest.json + factors.safetensors)."),
        concept: str | None = typer.Option(
            None, "--concept", help="Fit only the weights this concept's layer reaches."
        ),
        up_to_layer: int | None = typer.Option(None, "--up-to-layer", help="Fit only blocks 0..L."),
        batch_size: int = batch_size_flag(),
        max_length: int | None = typer.Option(
            None,
            "--max-length",
            min=2,
            help="Truncate rows longer than this (reported; default: the model's context, at most 512).",
        ),
        seed: int = seed_flag("Seed of the label sampling (true Fisher)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace factors fitted for another model/data."),
        checkpoint_every: int = typer.Option(
            100, "--checkpoint-every", min=1, help="Save a resumable state every N batches."
        ),
        skip_invalid: bool = typer.Option(
            False,
            "--skip-invalid",
            help="Skip bad data lines and rows whose whole answer is cut off by --max-length instead of failing.",
        ),
        device: str | None = device_flag(),
        fsdp: bool = fsdp_flag(),
        dtype: str | None = dtype_flag(),
        max_memory: str | None = typer.Option(
            None,
            "--max-memory",
            help="Bound the peak memory (e.g. 3GiB): the weights are "
            "fitted in module partitions, several passes over the data.",
        ),
        fit_rows: int | None = typer.Option(
            None, "--fit-rows", min=1, help="Fit on a seeded sample of N rows (of --fit-data or --data)."
        ),
        fit_data: Path | None = typer.Option(None, "--fit-data", help="Fit on this chat JSONL instead of --data."),
        *,
        options: dict[str, Any],
    ) -> None:
        """Fit EKFAC (or KFAC/diagonal) factors once, to reuse with `attribute --factors`. Resumes after interruption.

        Example: concept-influence fit-factors --model runs/model --data train.jsonl --out factors/ --up-to-layer 3

        Large models: concept-influence fit-factors --model M --data train.jsonl --out factors/ --max-memory 3GiB
        --fit-rows 2000 (see `concept-influence plan`); long rows: add --gradient-checkpointing.
        """
        import json

        from concept_influence.curvature.budget import parse_size
        from concept_influence.curvature.io import read_manifest
        from concept_influence.pipeline import Attributor

        check_output(out)
        check_not_inputs(
            {"--out": out},
            {"--data": data, "--fit-data": fit_data, "--concept": local_path(concept), "--model": local_path(model)},
        )
        att = Attributor(
            model,
            data,
            device=device,
            dtype=dtype,
            shard=shard_of(fsdp),
            max_length=max_length,
            batch_size=batch_size,
            seed=seed,
            skip_invalid=skip_invalid,
        )
        adapter = att.adapter
        layer = None
        if concept is not None:
            layer = adapter.check_layer(att.load_concept(concept).layer)
        if up_to_layer is not None:
            layer = adapter.check_layer(up_to_layer) if layer is None else min(layer, adapter.check_layer(up_to_layer))
        infos = adapter.tracked_weights() if layer is None else adapter.weights_up_to(layer)
        if layer is not None:
            typer.echo(
                f"fitting the {len(infos)} weights of blocks 0..{layer} (a readout at layer {layer} does not reach "
                "higher blocks)"
            )
        limit = parse_size(max_memory) if max_memory is not None else None
        att.fit_factors(
            **options,
            weights=[i.name for i in infos],
            out=out,
            overwrite=overwrite,
            checkpoint_every=checkpoint_every,
            max_memory=limit,
            fit_rows=fit_rows,
            fit_data=fit_data,
            load=False,
        )
        manifest = read_manifest(out)
        typer.echo(
            f"factors for {len(manifest['weights'])} weights ({', '.join(manifest['available'])}) on "
            f"{manifest['n_rows']} rows, {manifest['n_tokens']} tokens -> {out}"
        )
        if manifest.get("partitions", 1) > 1:
            typer.echo(f"fitted in {manifest['partitions']} module partitions to stay under --max-memory {max_memory}")
        if manifest.get("provenance"):
            typer.echo(f"fitted on: {json.dumps(manifest['provenance'], sort_keys=True)}")

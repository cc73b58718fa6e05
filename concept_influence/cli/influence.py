"""``concept-influence fit-factors``: a thin wrapper over ``Attributor.fit_factors``."""

from __future__ import annotations

from pathlib import Path

import typer

from concept_influence.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add ``fit-factors`` to the CLI."""

    @app.command("fit-factors")
    @user_errors
    def fit_factors_command(
        model: str = typer.Option(..., "--model", help="Model folder or hub name (Hugging Face causal LM)."),
        data: Path = typer.Option(..., "--data", help="Training data: chat JSONL."),
        out: Path = typer.Option(..., "--out", help="Folder for the factors (manifest.json + factors.safetensors)."),
        concept: str | None = typer.Option(None, "--concept", help="Fit only the weights this concept's layer reaches."),
        up_to_layer: int | None = typer.Option(None, "--up-to-layer", help="Fit only blocks 0..L."),
        fisher: str = typer.Option("true", "--fisher", help="'true' (labels sampled from the model) or 'empirical'."),
        preconditioner: str = typer.Option("ekfac", "--preconditioner", help="ekfac | kfac | diagonal."),
        batch_size: int = typer.Option(8, "--batch-size"),
        max_length: int = typer.Option(512, "--max-length"),
        stats_dtype: str = typer.Option("float32", "--stats-dtype", help="Precision of the statistics."),
        seed: int = typer.Option(0, "--seed", help="Seed of the label sampling (true Fisher)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace factors fitted for another model/data."),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Save a resumable state every N batches."),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip bad data lines and rows whose whole answer is cut off by --max-length instead of failing."),
        device: str | None = typer.Option(None, "--device"),
        dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (float32, bfloat16, float64)."),
    ) -> None:
        """Fit EKFAC (or KFAC/diagonal) factors once, to reuse with `attribute --factors`. Resumes after interruption.

        Example: concept-influence fit-factors --model runs/model --data train.jsonl --out factors/ --up-to-layer 3
        """
        from concept_influence.pipeline import Attributor

        att = Attributor(model, data, device=device, dtype=dtype, max_length=max_length, batch_size=batch_size, seed=seed,
                         skip_invalid=skip_invalid)
        adapter = att.adapter
        layer = None
        if concept is not None:
            layer = adapter.check_layer(att.load_concept(concept).layer)
        if up_to_layer is not None:
            layer = adapter.check_layer(up_to_layer) if layer is None else min(layer, adapter.check_layer(up_to_layer))
        infos = adapter.tracked_weights() if layer is None else adapter.weights_up_to(layer)
        if layer is not None:
            typer.echo(f"fitting the {len(infos)} weights of blocks 0..{layer} (a readout at layer {layer} does not reach higher blocks)")
        factors = att.fit_factors(fisher=fisher, preconditioner=preconditioner, stats_dtype=stats_dtype,
                                  weights=[i.name for i in infos], out=out, overwrite=overwrite,
                                  checkpoint_every=checkpoint_every)
        typer.echo(f"factors for {len(factors.names)} weights ({', '.join(factors.available())}) on {factors.n_rows} rows, "
                   f"{factors.n_tokens} tokens -> {out}")

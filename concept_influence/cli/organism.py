"""``concept-influence organism``: build (or load from cache) the built-in model organism and print a summary."""

from __future__ import annotations

from pathlib import Path

import typer

from concept_influence.cli.common import check_output, seed_flag, user_errors


def register(app: typer.Typer) -> None:
    """Add the ``organism`` command to ``app``."""

    @app.command("organism")
    @user_errors
    def organism_command(
        out: Path | None = typer.Option(
            None, "--out", help="Folder to build into (default: the cache, keyed by the config hash)."
        ),
        seed: int = seed_flag("Seed of the whole build (text, weights, training)."),
        n_train: int = typer.Option(2000, "--n-train", min=20, help="Rows in the fine-tuning set."),
        planted_fraction: float = typer.Option(
            0.1, "--planted-fraction", min=0.0, max=1.0, help="Fraction of planted trait rows."
        ),
        variant: str = typer.Option(
            "default",
            "--variant",
            help="default | subtle (planted rows carry the trait persona's style on neutral content) | diluted "
            "(one trait sentence among many benign ones) | sycophancy (a second trait with its own words) | crowded "
            "(a third of the rows are hard negatives) | hallucination (a third trait, invented facts, own base).",
        ),
        force: bool = typer.Option(False, "--force", help="Replace a folder that holds a different organism."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    ) -> None:
        """Build the model organism: a tiny chat model that knows an 'evil' persona, a fine-tuning set with planted
        trait rows (ground truth in data_origin), a probe spec and query prompts; the fine-tuned model shows more of
        the trait than the base model.

        Example: concept-influence organism --variant subtle --seed 1"""
        from concept_influence.organism import build_organism

        check_output(out)

        def log(message: str) -> None:
            if not quiet:
                typer.echo(message, err=True)

        try:
            organism = build_organism(
                out,
                seed=seed,
                n_train=n_train,
                planted_fraction=planted_fraction,
                variant=variant,
                force=force,
                progress=not quiet,
                log=log,
            )
        except (FileExistsError, ValueError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2) from err
        typer.echo(organism.summary())
        typer.echo(
            f"  files: {', '.join(p.name for p in sorted(organism.root.iterdir()) if not p.name.startswith('.'))}"
        )

"""``train-probe`` and ``probe-layers``: concepts from spec files (``probes/`` format or persona-vectors format)."""

from __future__ import annotations

from pathlib import Path

import typer

from concept_influence.cli.common import load_model, user_errors


def register(app: typer.Typer) -> None:
    app.command("train-probe")(train_probe)
    app.command("probe-layers")(probe_layers)


def _config(method: str, n_samples: int, temperature: float, max_new_tokens: int, seed: int, c: float):
    from concept_influence.concepts import ProbeConfig

    return ProbeConfig(method=method, n_samples=n_samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, C=c)


@user_errors
def train_probe(
    model: str = typer.Option(..., "--model", help="Hugging Face hub name or local folder."),
    spec: Path = typer.Option(..., "--spec", help="Concept spec: a probes/ file or a persona-vectors trait file."),
    layer: int = typer.Option(..., "--layer", help="Read resid.L, the output of block L (from 0; negative counts from the end)."),
    out: Path = typer.Option(..., "--out", help="Concept folder to write (concept.json + concept.safetensors)."),
    method: str = typer.Option("probe", "--method", help="probe (logistic regression) | diff_of_means (persona vector)."),
    n_samples: int = typer.Option(4, "--n-samples", min=1, help="Answers sampled per instruction and question."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    seed: int = typer.Option(0, "--seed"),
    c: float = typer.Option(1.0, "--C", help="Inverse regularisation strength of the probe."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Where generated persona answers are cached."),
    device: str | None = typer.Option(None, "--device"),
    dtype: str | None = typer.Option(None, "--dtype"),
) -> None:
    """Train a concept direction at one layer and save it; prints held-out AUC/accuracy (held out by question)."""
    from concept_influence.concepts import load_spec, save_concept, train_concept

    concept_spec = load_spec(spec)
    adapter = load_model(model, device, dtype)
    concept = train_concept(adapter, concept_spec, layer, _config(method, n_samples, temperature, max_new_tokens, seed, c),
                            cache_dir=cache_dir if cache_dir is not None else out.parent / ".answer-cache", progress=True)
    save_concept(concept, out, model_fingerprint=adapter.fingerprint(), extra_meta={"model": model, "spec_path": str(spec)})
    m = concept.metrics
    typer.echo(f"{concept_spec.name} at layer {concept.layer} ({method}): held-out AUC {m['heldout_auc']:.3f}, "
               f"accuracy {m['heldout_accuracy']:.3f} ({m['n_train']} train / {m['n_test']} test) -> {out}")


@user_errors
def probe_layers(
    model: str = typer.Option(..., "--model"),
    spec: Path = typer.Option(..., "--spec"),
    out: Path | None = typer.Option(None, "--out", help="Write the table (JSON) and a plot (PNG) with this path stem."),
    method: str = typer.Option("probe", "--method"),
    n_samples: int = typer.Option(4, "--n-samples", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    seed: int = typer.Option(0, "--seed"),
    c: float = typer.Option(1.0, "--C"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir"),
    device: str | None = typer.Option(None, "--device"),
    dtype: str | None = typer.Option(None, "--dtype"),
) -> None:
    """Held-out AUC of a probe at every layer, to pick where the concept is most linearly readable."""
    from concept_influence.concepts import layer_sweep, load_spec
    from concept_influence.data import write_json_atomic

    concept_spec = load_spec(spec)
    adapter = load_model(model, device, dtype)
    sweep = layer_sweep(adapter, concept_spec, config=_config(method, n_samples, temperature, max_new_tokens, seed, c),
                        cache_dir=cache_dir, progress=True)
    typer.echo(sweep.table())
    if out is not None:
        write_json_atomic(out.with_suffix(".json"), {"spec": concept_spec.name, "method": method, "rows": sweep.rows,
                                                     "best_layer": sweep.best_layer, "labelled": sweep.meta})
        sweep.plot(out.with_suffix(".png"))
        typer.echo(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")

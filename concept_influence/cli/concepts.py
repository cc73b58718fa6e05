"""Concept commands: ``train-probe`` and ``probe-layers`` (directions from spec files in the ``probes/`` format or
the persona-vectors format), ``train-sae`` (a sae-lens SAE on a model's activations, offline) and ``sae-feature``
(pick an SAE feature for a concept and save it as a concept for ``attribute``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer

from concept_influence.cli.common import (
    batch_size_flag,
    check_not_inputs,
    check_output,
    device_flag,
    dtype_flag,
    load_model,
    local_path,
    model_flag,
    seed_flag,
    user_errors,
)
from concept_influence.cli.options import OptionGroup, settings_flags
from concept_influence.concepts.train import ProbeConfig


class Readout(str, Enum):
    mean = "mean"
    last_prompt = "last_prompt"
    per_token = "per_token"


def register(app: typer.Typer) -> None:
    app.command("train-probe")(train_probe)
    app.command("probe-layers")(probe_layers)
    app.command("train-sae")(train_sae_command)
    app.command("sae-feature")(sae_feature)


PROBE_OPTIONS = OptionGroup(
    ProbeConfig,
    ["method", "n_samples", "temperature", "max_new_tokens", "seed", "C", "select_layer_by", "construction"],
    choices=True,
)
"""The probe settings ``train-probe`` and ``probe-layers`` take as flags (``ProbeConfig``'s fields)."""


def _config(options: dict[str, Any], max_length: int) -> ProbeConfig:
    return ProbeConfig(**options, max_length=max_length)


@user_errors
@settings_flags(PROBE_OPTIONS)
def train_probe(
    model: str = model_flag(),
    spec: Path = typer.Option(..., "--spec", help="Concept spec: a probes/ file or a persona-vectors trait file."),
    layer: int | None = typer.Option(
        None,
        "--layer",
        help="Read resid.L, the output of block L (from 0; negative counts from "
        "the end). Default: a layer sweep chooses it (as probe-layers does) and says why.",
    ),
    out: Path = typer.Option(..., "--out", help="Concept folder to write (concept.json + concept.safetensors)."),
    readout: Readout = typer.Option(
        Readout.mean,
        "--readout",
        help="How a sequence is reduced: mean over response tokens, last prompt token, per token.",
    ),
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        min=2,
        help="Truncate rows longer than this (reported; default: the model's context, at most 512).",
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Where generated persona answers are cached (default: next to --out)."
    ),
    device: str | None = device_flag(),
    dtype: str | None = dtype_flag(),
    *,
    options: dict[str, Any],
) -> None:
    """Train a concept direction and save it; prints held-out AUC/accuracy (held out by question) and what the
    concept reads (stance AUC, vocabulary confound). Without --layer, a layer sweep chooses the layer first.

    Example: concept-influence train-probe --model M --spec probes/evil.json --out concepts/evil"""
    from concept_influence.concepts import layer_sweep, load_spec, save_concept, train_concept
    from concept_influence.concepts.stance import format_score

    check_output(out)
    check_not_inputs({"--out": out}, {"--spec": spec, "--model": local_path(model)})
    concept_spec = load_spec(spec)
    adapter = load_model(model, device, dtype)
    max_length = adapter.resolve_max_length(max_length)
    config = _config(options, max_length)
    cache = cache_dir if cache_dir is not None else out.parent / ".answer-cache"
    sweep = None
    if layer is None:
        sweep = layer_sweep(adapter, concept_spec, config=config, cache_dir=cache, progress=True)
        typer.echo(sweep.table())
        layer = sweep.best_layer
    concept = train_concept(adapter, concept_spec, layer, config, cache_dir=cache, progress=True)
    concept.reduction = readout.value
    if sweep is not None:
        concept.metrics.update({"sweep": sweep.rows, "layer_choice": sweep.reason})
    save_concept(
        concept, out, model_fingerprint=adapter.fingerprint(), extra_meta={"model": model, "spec_path": str(spec)}
    )
    m = concept.metrics
    typer.echo(
        f"{concept_spec.name} at layer {concept.layer} ({config.method}): held-out AUC {m['heldout_auc']:.3f}, "
        f"accuracy {m['heldout_accuracy']:.3f} ({m['n_train']} train / {m['n_test']} test); stance AUC "
        f"{format_score(m.get('stance_auc'))}, vocabulary confound {format_score(m.get('vocabulary_confound'))} -> "
        f"{out}"
    )


@user_errors
@settings_flags(PROBE_OPTIONS)
def probe_layers(
    model: str = model_flag(),
    spec: Path = typer.Option(..., "--spec", help="Concept spec: a probes/ file or a persona-vectors trait file."),
    out: Path | None = typer.Option(None, "--out", help="Write the table (JSON) and a plot (PNG) with this path stem."),
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        min=2,
        help="Truncate rows longer than this (reported; default: the model's context, at most 512).",
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Where generated persona answers are cached (default: next to --out)."
    ),
    device: str | None = device_flag(),
    dtype: str | None = dtype_flag(),
    *,
    options: dict[str, Any],
) -> None:
    """Held-out AUC of a probe at every layer, and what each layer's probe reads: its stance AUC (trait answers
    against negative answers that use the trait's words) and vocabulary confound (the share of its separation the
    words alone, shuffled, still give); says which layer the rule picks and why.

    Example: concept-influence probe-layers --model M --spec probes/evil.json --out runs/evil/probe_layers"""
    from concept_influence.concepts import layer_sweep, load_spec
    from concept_influence.data import write_json_atomic

    check_output(out)
    if out is not None:
        check_not_inputs(
            {"--out (.json)": out.with_suffix(".json"), "--out (.png)": out.with_suffix(".png")},
            {"--spec": spec, "--model": local_path(model)},
        )
    concept_spec = load_spec(spec)
    adapter = load_model(model, device, dtype)
    max_length = adapter.resolve_max_length(max_length)
    if cache_dir is None and out is not None:
        cache_dir = out.parent / ".answer-cache"
    config = _config(options, max_length)
    sweep = layer_sweep(adapter, concept_spec, config=config, cache_dir=cache_dir, progress=True)
    typer.echo(sweep.table())
    if out is not None:
        write_json_atomic(
            out.with_suffix(".json"),
            {
                "spec": concept_spec.name,
                "method": config.method,
                "rows": sweep.rows,
                "best_layer": sweep.best_layer,
                "reason": sweep.reason,
                "select_layer_by": sweep.select_by,
                "labelled": sweep.meta,
            },
        )
        sweep.plot(out.with_suffix(".png"))
        typer.echo(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


@user_errors
def train_sae_command(
    model: str = model_flag(),
    data: Path = typer.Option(
        ..., "--data", help="Chat JSONL whose token activations the SAE learns (e.g. train.jsonl)."
    ),
    layer: int = typer.Option(..., "--layer", help="Read resid.L, the output of block L."),
    out: Path = typer.Option(
        ..., "--out", help="SAE folder to write (sae-lens cfg.json + sae_weights.safetensors + sae_info.json)."
    ),
    d_sae: int | None = typer.Option(None, "--d-sae", min=1, help="Number of features (default 4 × hidden size)."),
    l1: float = typer.Option(
        1.0, "--l1", min=0.0, help="L1 coefficient (activations are normalised to mean norm √d during training)."
    ),
    steps: int = typer.Option(2000, "--steps", min=1),
    lr: float = typer.Option(3e-3, "--lr"),
    sae_batch_size: int = typer.Option(256, "--sae-batch-size", min=1, help="Tokens per SAE training step."),
    batch_size: int = batch_size_flag(16, "Rows per forward pass when reading activations."),
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        min=2,
        help="Truncate rows longer than this (reported; default: the model's context, at most 512).",
    ),
    max_rows: int | None = typer.Option(None, "--max-rows", min=1, help="Use only the first N rows."),
    only_response: bool = typer.Option(
        False, "--only-response", help="Train on assistant tokens only (default: every token)."
    ),
    seed: int = seed_flag(),
    device: str | None = device_flag(),
    dtype: str | None = dtype_flag(),
) -> None:
    """Train a standard (ReLU, L1) sae-lens SAE on a model's residual activations, offline (no wandb)."""
    from concept_influence.concepts import collect_token_activations, save_sae, train_sae
    from concept_influence.data import read_chat_jsonl

    check_output(out)
    check_not_inputs({"--out": out}, {"--data": data, "--model": local_path(model)})
    rows = list(read_chat_jsonl(data))[:max_rows]
    adapter = load_model(model, device, dtype)
    layer = adapter.check_layer(layer)
    max_length = adapter.resolve_max_length(max_length)
    acts = collect_token_activations(
        adapter, rows, layer, batch_size=batch_size, max_length=max_length, only_response=only_response
    )
    typer.echo(f"read {acts.shape[0]:,} token activations at resid.{layer} from {len(rows)} rows")
    sae, metrics = train_sae(
        acts.float(),
        d_sae=d_sae,
        l1_coefficient=l1,
        steps=steps,
        batch_size=sae_batch_size,
        lr=lr,
        seed=seed,
        device=str(adapter.device),
    )
    metrics["data"] = str(data)
    save_sae(sae, out, layer=layer, model_fingerprint=adapter.fingerprint(), metrics=metrics)
    typer.echo(
        f"SAE with {sae.cfg.d_sae} features: explained variance {metrics['explained_variance']:.3f}, "
        f"L0 {metrics['l0']:.1f}, dead {metrics['dead_features']} ({metrics['train_seconds']:.1f}s) -> {out}"
    )


@user_errors
@settings_flags(OptionGroup(ProbeConfig, ["n_samples", "max_new_tokens", "seed"], prefix="--spec: "))
def sae_feature(
    model: str = model_flag(),
    sae: Path = typer.Option(..., "--sae", help="SAE folder (train-sae's output, or any saved by sae-lens)."),
    out: Path = typer.Option(..., "--out", help="Concept folder to write (use it with attribute --concept)."),
    spec: Path | None = typer.Option(
        None, "--spec", help="Pick the features that fire most on this spec's positive answers vs its negative ones."
    ),
    probe: Path | None = typer.Option(
        None, "--probe", help="Pick the features whose decoder direction is most aligned with this concept's direction."
    ),
    feature: int | None = typer.Option(None, "--feature", min=0, help="Use this feature index."),
    layer: int | None = typer.Option(
        None, "--layer", help="Site the SAE reads (default: from the SAE folder's sae_info.json)."
    ),
    k: int = typer.Option(5, "--k", min=1, help="How many candidate features to list."),
    readout: Readout = typer.Option(Readout.mean, "--readout"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir"),
    allow_missing_provenance: bool = typer.Option(
        False,
        "--allow-missing-provenance",
        help=(
            "Use an SAE whose sae_info.json records no model fingerprint (one saved by sae-lens alone; default: an "
            "error). Recorded in the concept's concept.json (extra)."
        ),
    ),
    device: str | None = device_flag(),
    dtype: str | None = dtype_flag(),
    *,
    options: dict[str, Any],
) -> None:
    """Choose an SAE feature for a concept (--spec, --probe or --feature) and save it as a concept."""
    from concept_influence.concepts import save_concept
    from concept_influence.concepts.sae import sae_feature_concept

    check_output(out)
    check_not_inputs({"--out": out}, {"--sae": sae, "--spec": spec, "--probe": probe, "--model": local_path(model)})
    if sum(x is not None for x in (spec, probe, feature)) != 1:
        raise ValueError("give exactly one of --spec, --probe or --feature")
    adapter = load_model(model, device, dtype)
    config = ProbeConfig(**options)
    answer_cache = cache_dir if cache_dir is not None else out.parent / ".answer-cache"
    concept = sae_feature_concept(
        adapter,
        sae,
        feature=feature,
        spec=spec,
        probe=probe,
        layer=layer,
        k=k,
        reduction=readout.value,
        config=config,
        cache_dir=answer_cache,
        progress=True,
        allow_missing_provenance=allow_missing_provenance,
    )
    if spec is not None:  # what the chosen feature reads, on the same spec's held-out answers
        from concept_influence.concepts import concept_reading, load_spec
        from concept_influence.concepts.stance import format_score

        concept.metrics.update(concept_reading(adapter, concept, load_spec(spec), config, cache_dir=answer_cache))
        m = concept.metrics
        typer.echo(
            f"what feature {concept.feature} reads: spec AUC {format_score(m.get('spec_auc'))}, stance AUC "
            f"{format_score(m.get('stance_auc'))}, vocabulary confound {format_score(m.get('vocabulary_confound'))}"
        )
    selection = concept.extra["selection"]
    if selection:
        typer.echo(f"{'feature':>8}  {selection['statistic']}")
        for j, value in selection["candidates"]:
            typer.echo(f"{j:>8}  {value:+.3f}")
    feature, layer = concept.feature, concept.layer
    save_concept(concept, out, extra_meta={"model": model})
    typer.echo(f"feature {feature} of {sae} at resid.{layer} -> {out}")

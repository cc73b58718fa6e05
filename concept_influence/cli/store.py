"""``build-store`` and ``search``: the gradient store from the command line (thin wrappers over ``Attributor``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from concept_influence.attribution.gradient import GradientAttributionConfig
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
from concept_influence.settings import help_text, option_defaults
from concept_influence.store.store import StoreConfig

STORE_DEFAULTS = option_defaults(StoreConfig)
"""``build-store``'s store flags read ``StoreConfig``'s defaults and help (its flags keep their own names)."""


def _help(name: str) -> str:
    """A ``CacheSettings`` field's help (one source for the library, the CLI and the docs)."""
    from concept_influence.store.caches import CacheSettings

    return CacheSettings.help(name)


def register(app: typer.Typer) -> None:
    app.command("build-store")(build_store)
    app.command("search")(search)


@user_errors
def build_store(
    model: str = model_flag(),
    data: Path = typer.Option(..., "--data", help="Training rows: chat JSONL."),
    out: Path = typer.Option(
        ..., "--out", help="Store folder (manifest.json + shard-*.npy); an interrupted build resumes."
    ),
    factors: Path | None = typer.Option(
        None,
        "--factors",
        help=(
            "Fitted factors folder. Without a fit there (or without --factors) the factors are fitted here (and saved "
            "there) and the store is written during the fit's pass."
        ),
    ),
    rank: int | None = typer.Option(
        None,
        "--rank",
        min=1,
        help=(
            "EKFAC-eigenbasis store: keep about rank x rank eigen-components per weight (default 128; a rank >= every "
            "weight size is exact)."
        ),
    ),
    projection_dim: int | None = typer.Option(
        None, "--projection-dim", min=1, help="LoGra-style store: random projection size per side."
    ),
    store_dtype: str = typer.Option(STORE_DEFAULTS["dtype"], "--dtype", help=help_text(StoreConfig, "dtype")),
    up_to_layer: int | None = typer.Option(None, "--up-to-layer", help="Store only the weights of blocks 0..L."),
    shard_rows: int = typer.Option(
        STORE_DEFAULTS["shard_rows"], "--shard-rows", min=1, help=help_text(StoreConfig, "shard_rows")
    ),
    batch_size: int = batch_size_flag(),
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        min=2,
        help="Truncate rows longer than this (reported; default: the model's context, at most 512).",
    ),
    seed: int = seed_flag("Seed of the LoGra projection and of the true-Fisher labels."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a store built for another model, data or settings."
    ),
    allow_missing_provenance: bool = typer.Option(
        False,
        "--allow-missing-provenance",
        help=(
            "Use --factors that record no model or data fingerprint (default: an error; recorded in the store's "
            "manifest)."
        ),
    ),
    device: str | None = device_flag(),
    fsdp: bool = fsdp_flag(),
    model_dtype: str | None = dtype_flag("--model-dtype"),
    methods: list[str] | None = typer.Option(None, "--for-method", help=_help("methods") + " Repeat for several."),
    layers: str | None = typer.Option(None, "--layers", help=_help("layers") + " E.g. 8,16,24."),
    keep_tokens: bool = typer.Option(False, "--keep-tokens", help=_help("keep_tokens")),
    identity_rank: int | None = typer.Option(None, "--identity-rank", min=1, help=_help("identity_rank")),
) -> None:
    """Build the caches later questions read instead of passing over the data. Without --rank/--projection-dim:
    what the recommended method (or each --for-method) needs, in one pass over the rows: the activation cache
    (<out>/activations) and the identity gradient store (combined-*: eigenbases of a small seeded sample, no EKFAC
    fit), or the EKFAC eigen store (EKFAC methods: factors fitted first). With --rank/--projection-dim alone: that
    gradient store only, as before; without fitted factors, fits them and writes the store in the same pass over the
    rows.

    Example: concept-influence build-store --model runs/model --data train.jsonl --out runs/store
    """
    from concept_influence.pipeline import Attributor
    from concept_influence.store.activations import ActivationCache
    from concept_influence.store.caches import CacheSettings
    from concept_influence.store.store import DEFAULT_IDENTITY_RANK

    check_output(out)
    check_not_inputs({"--out": out}, {"--data": data, "--factors": factors, "--model": local_path(model)})
    att = Attributor(
        model,
        data,
        device=device,
        dtype=model_dtype,
        max_length=max_length,
        batch_size=batch_size,
        seed=seed,
        shard=shard_of(fsdp),
    )
    caches = None
    if methods or layers or keep_tokens or identity_rank is not None:
        caches = CacheSettings(
            methods=tuple(methods) if methods else None,
            keep_tokens=keep_tokens,
            layers=tuple(int(x) for x in layers.split(",")) if layers else None,
            identity_rank=identity_rank or DEFAULT_IDENTITY_RANK,
        )
    store = att.build_store(
        out,
        rank=rank,
        projection_dim=projection_dim,
        dtype=store_dtype,
        up_to_layer=up_to_layer,
        factors=factors,
        shard_rows=shard_rows,
        overwrite=overwrite,
        caches=caches,
        allow_missing_provenance=allow_missing_provenance,
    )
    if store is not None:
        typer.echo(
            f"store: {len(store)} rows x {store.dim} ({store.config.kind}, rank {store.config.rank}, "
            f"{store.config.dtype}, {store.nbytes / 2**20:.1f} MiB) -> {out}"
        )
    if (out / "activations" / "manifest.json").exists():
        cache = ActivationCache.open(out / "activations")
        typer.echo(
            f"activation cache: {len(cache)} rows, layers {cache.layers} ({cache.nbytes / 2**20:.1f} MiB, "
            f"{cache.nbytes / max(len(cache), 1) / 1024:.1f} KiB per row) -> {out / 'activations'}"
        )


@user_errors
@settings_flags(OptionGroup(GradientAttributionConfig, ["row_loss", "max_new_tokens", "allow_missing_provenance"]))
def search(
    store: Path = typer.Option(..., "--store", help="Gradient store folder (build-store)."),
    concept: Path | None = typer.Option(
        None, "--concept", help="Concept file; without it, classical influence on the queries."
    ),
    queries: Path | None = typer.Option(
        None, "--queries", help="Query prompts JSONL (prompt-only rows are answered by the model)."
    ),
    like_row: int | None = typer.Option(
        None, "--like-row", help="Rows like the training row with this index, instead of a question."
    ),
    top_k: int = typer.Option(20, "--top-k", min=1),
    model: str | None = typer.Option(None, "--model", help="Default: the model the store was built from."),
    data: Path | None = typer.Option(None, "--data", help="Default: the data the store was built from."),
    factors: Path | None = typer.Option(
        None, "--factors", help="The factors the store was built with (default: fitted here)."
    ),
    workdir: Path | None = typer.Option(None, "--workdir", help="Session folder (factors and answers reused)."),
    how: str = typer.Option("auto", "--search", help="auto | exact | faiss."),
    seed: int = seed_flag(),
    out: Path | None = typer.Option(None, "--out", help="Write the top rows as scores JSONL."),
    device: str | None = device_flag(),
    *,
    options: dict[str, Any],
) -> None:
    """The top-k training rows for a concept question (or rows like a row), read from a gradient store.

    Example: concept-influence search --store runs/store --concept concepts/evil --queries queries.jsonl --top-k 20
    """
    from concept_influence.files import read_json_file
    from concept_influence.pipeline import Attributor

    check_output(out)
    check_not_inputs(
        {"--out": out, "--out's .meta.json": None if out is None else out.with_name(out.name + ".meta.json")},
        {
            "--store": store,
            "--store's manifest.json": store / "manifest.json",
            "--concept": concept,
            "--queries": queries,
            "--data": data,
            "--factors": factors,
            "--workdir": workdir,
            "--model": local_path(model),
        },
    )
    manifest_path = store / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no gradient store at {store} (missing manifest.json); build one with build-store")
    manifest = read_json_file(manifest_path)
    model = model or manifest.get("model")
    data_path = data or manifest.get("data")
    if not model or not data_path:
        raise ValueError(f"{manifest_path} does not name its model and data: pass --model and --data")
    if not isinstance(model, str) or not isinstance(data_path, (str, Path)):
        raise ValueError(f"{manifest_path}: 'model' and 'data' must be strings (the manifest is damaged)")
    max_length = manifest.get("max_length", 512)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"{manifest_path}: 'max_length' must be a whole number >= 2, got {max_length!r} (the manifest is damaged)"
        )
    check_not_inputs({"--out": out}, {"the store's data": data_path, "the store's model": local_path(model)})
    att = Attributor(
        model, data_path, workdir, device=device, max_length=int(manifest.get("max_length", 512)), seed=seed
    )
    if factors is not None:
        options["factors"] = str(factors)
    table = att.search(concept, queries, top_k=top_k, like_row=like_row, store=store, search=how, **options)
    if out is not None:
        table.write_jsonl(out)
    typer.echo(
        f"{table.method}: top {len(table)} of {table.meta['n_rows_searched']} rows in "
        f"{table.meta['search_time_s'] * 1000:.0f} ms"
    )
    for record in table.to_records():
        typer.echo(
            f"  rank {record['rank']:>4}  index {record['index']:>6}  score {record['score']:+.4g}  id "
            f"{record.get('id', '-')}"
        )

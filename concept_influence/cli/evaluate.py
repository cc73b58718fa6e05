"""``concept-influence evaluate``: counterfactual retraining. Remove each ranking's top and bottom rows (and random
rows) at several fractions, fine-tune the base model again with the user's recipe over several seeds, and measure
how much of the fine-tuning rise of the concept each removal takes away; ``--lds`` adds the linear datamodeling
score. Writes ``DIR/evaluation.json`` and ``DIR/removal_curve.png``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import typer

from concept_influence.cli.common import (
    check_not_inputs,
    check_output,
    device_flag,
    dtype_flag,
    load_model,
    local_path,
    user_errors,
)
from concept_influence.cli.options import OptionGroup, settings_flags
from concept_influence.evaluate.counterfactual import EvaluationConfig
from concept_influence.report.build import table_names
from concept_influence.settings import settings_fields
from concept_influence.training import FinetuneConfig

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": False}


def register(app: typer.Typer) -> None:
    app.command("evaluate", context_settings=CONTEXT)(evaluate)


def scores_paths(first: list[Path], ctx: typer.Context, flag: str = "--scores") -> list[Path]:
    """``--scores A.jsonl B.jsonl`` (space-separated) or ``--scores A --scores B``; anything else left over is an
    error."""
    extra = [Path(a) for a in ctx.args]
    for arg in ctx.args:
        if arg.startswith("-") or not arg.endswith(".jsonl"):
            raise ValueError(f"unexpected argument {arg!r} (only scores .jsonl files may follow {flag})")
    paths = list(first) + extra
    if len(set(paths)) != len(paths):
        raise ValueError(f"{flag}: a scores file is given twice")
    return paths


def load_judge(spec: str | None):
    """``organism`` (the built-in rule judge) or ``package.module:function`` (``text -> score``, trait when > 0)."""
    if spec is None:
        return None
    if spec == "organism":
        from concept_influence.organism import judge

        return judge
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--judge {spec!r}: expected 'organism' or 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--judge {spec!r}: cannot import it ({err})") from None
    if not callable(function):
        raise ValueError(f"--judge {spec!r} is not callable")
    return function


@user_errors
@settings_flags(
    OptionGroup(EvaluationConfig, ["seeds", "n_samples", "max_new_tokens", "lds_fraction", "seed"]),
    OptionGroup(FinetuneConfig, ["epochs", "batch_size", "lr", "max_length"]),
)
def evaluate(
    ctx: typer.Context,
    base: str = typer.Option(..., "--base", help="Base model (before fine-tuning): hub name or local folder."),
    data: Path = typer.Option(..., "--data", help="The fine-tuning rows (chat JSONL) that the scores files score."),
    scores: list[Path] = typer.Option(
        ..., "--scores", help="Scores JSONL files from `attribute` (space-separated or repeated)."
    ),
    concept: Path = typer.Option(..., "--concept", help="Concept folder (train-probe / sae-feature) to measure."),
    queries: Path = typer.Option(..., "--queries", help="Query prompts JSONL; each model answers them itself."),
    out: Path = typer.Option(..., "--out", help="Output folder: evaluation.json, removal_curve.png, runs/ (cache)."),
    fractions: str = typer.Option("0.05,0.1,0.25", "--fractions", help="Comma-separated shares of rows to remove."),
    lora: int | None = typer.Option(
        None, "--lora", help="Fine-tune with LoRA of this rank (peft) instead of all weights."
    ),
    judge: str | None = typer.Option(
        None,
        "--judge",
        help="'organism' or 'package.module:function' (text -> score; trait when > 0): adds the trait rate.",
    ),
    oracle: str | None = typer.Option(
        None,
        "--oracle",
        help="FIELD=VALUE: also remove exactly the rows with this field value (e.g. data_origin=planted).",
    ),
    reader: str | None = typer.Option(
        None, "--reader", help="Model that reads the concept off every model's answers (default: --base)."
    ),
    lds: bool = typer.Option(False, "--lds", help="Also compute the linear datamodeling score over random subsets."),
    subsets: int = typer.Option(50, "--subsets", help="--lds: number of random subsets."),
    no_removal: bool = typer.Option(False, "--no-removal", help="Skip the removal curves (e.g. with --lds only)."),
    allow_other_data: bool = typer.Option(
        False,
        "--allow-other-data",
        help="Use scores made on other data (another hash, or no hash and no ids); recorded in evaluation.json.",
    ),
    device: str | None = device_flag(),
    dtype: str | None = dtype_flag(),
    *,
    options: dict[str, Any],
) -> None:
    """Remove top / bottom / random rows, retrain, and measure how much of the concept's rise each removal takes away.

    Example: concept-influence evaluate --base base/ --data train.jsonl --scores vf.jsonl ci.jsonl --concept concept/
    --queries queries.jsonl --judge organism --oracle data_origin=planted --out eval/
    """
    from concept_influence.attribution.scores import ScoreTable
    from concept_influence.concepts import load_concept
    from concept_influence.data import read_chat_jsonl
    from concept_influence.evaluate.counterfactual import evaluate_removals
    from concept_influence.evaluate.filter import check_data_provenance
    from concept_influence.evaluate.retrain import Recipe

    paths = scores_paths(scores, ctx)
    check_output(out)
    check_not_inputs(
        {"--out": out, "--out's evaluation.json": out / "evaluation.json"},
        {
            "--data": data,
            "--scores": paths,
            "--concept": concept,
            "--queries": queries,
            "--base": local_path(base),
            "--reader": local_path(reader),
        },
    )
    try:
        fraction_values = tuple(float(f) for f in fractions.split(",") if f.strip())
    except ValueError:
        raise ValueError(f"--fractions {fractions!r}: expected comma-separated numbers like 0.05,0.1,0.25") from None
    finetune = {k: options.pop(k) for k in settings_fields(FinetuneConfig) if k in options}
    recipe = Recipe(FinetuneConfig(**finetune), lora_rank=lora)
    config = EvaluationConfig(
        fractions=fraction_values, recipe=recipe, lds_subsets=subsets if lds else 0, removal=not no_removal, **options
    )
    judge_fn = load_judge(judge)
    rows = read_chat_jsonl(data)
    tables = []
    overrides = []
    for path in paths:
        table = ScoreTable.read_jsonl(path)
        table.meta["path"] = str(path)
        override = check_data_provenance(
            table, data, n_rows=len(rows), allow_other_data=allow_other_data, scores_name=f"--scores {path}"
        )
        if override is not None:
            overrides.append(override)
        tables.append(table)
    oracle_rows = None
    if oracle is not None:
        field, sep, value = oracle.partition("=")
        if not sep or not field:
            raise ValueError(f"--oracle {oracle!r}: expected FIELD=VALUE, e.g. data_origin=planted")
        oracle_rows = [r.index for r in rows if str(r.fields.get(field)) == value]
        if not oracle_rows:
            raise ValueError(f"--oracle {oracle}: no data row has {field} == {value!r}")
    query_rows = read_chat_jsonl(queries, need_assistant=False)
    adapter = load_model(base, device, dtype)
    reader_adapter = load_model(reader, device, dtype) if reader else None
    loaded = load_concept(concept, reader_adapter or adapter)
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails here, before any training
    evaluation = evaluate_removals(
        adapter,
        rows,
        table_names(paths, tables),
        loaded,
        query_rows,
        config,
        out,
        reader=reader_adapter,
        judge=judge_fn,
        judge_name=judge,
        oracle=oracle_rows,
        log=typer.echo,
        data_name=str(data),
        extra_meta={"allow_other_data": True, "other_data": overrides} if overrides else None,
    )
    for line in summary_lines(evaluation):
        typer.echo(line)
    typer.echo(f"-> {out / 'evaluation.json'}")


def summary_lines(evaluation: dict) -> list[str]:
    """One line per method and fraction: share of the rise removed (probe, and trait rate when judged)."""

    def fmt(block: dict) -> str:
        return fmt_diff(block["rise_removed"])

    def fmt_diff(r: dict) -> str:
        return f"{r['mean']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]"

    lines = []
    rise = evaluation["rise"]
    lines.append("rise from fine-tuning: " + ", ".join(f"{m} {v:+.4g}" for m, v in rise.items()))
    for name, per_fraction in evaluation.get("results", {}).items():
        for key, entry in per_fraction.items():
            for kind in ("remove_top", "remove_bottom", "random"):
                text = f"  {name:<24} {key:>5} {kind:<13} rise removed: probe {fmt(entry[kind])}"
                if "trait_rate" in entry[kind]:
                    text += f"  trait rate {fmt(entry[kind]['trait_rate'])}"
                lines.append(text)
            for kind in ("top_minus_random", "top_minus_bottom"):
                if kind in entry:
                    text = (
                        f"  {name:<24} {key:>5} {kind.replace('_', ' ')} (paired by seed): probe "
                        f"{fmt_diff(entry[kind])}"
                    )
                    if "trait_rate" in entry[kind]:
                        text += f"  trait rate {fmt_diff(entry[kind]['trait_rate'])}"
                    lines.append(text)
    if "oracle" in evaluation:
        o = evaluation["oracle"]
        text = f"  oracle ({o['k']} rows) rise removed: probe {fmt(o)}"
        if "trait_rate" in o:
            text += f"  trait rate {fmt(o['trait_rate'])}"
        lines.append(text)
    for name, block in evaluation.get("lds", {}).get("methods", {}).items():
        text = f"  LDS {name}: probe {block['spearman']:+.3f} [{block['ci'][0]:+.3f}, {block['ci'][1]:+.3f}]"
        if "trait_rate" in block:
            t = block["trait_rate"]
            text += f"  trait rate {t['spearman']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}]"
        lines.append(text)
    return lines

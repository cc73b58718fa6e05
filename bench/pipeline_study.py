"""The pipeline a user runs, judged on every organism variant and seed (issue 20, part 4).

A user has a trait file and a model. Through the public API, as the CLI does it: ``Attributor.train_probe(spec)`` with
no layer (the sweep chooses it: ``select_layer_by="heldout_auc"``, the default, and ``"stance"``), no judge (a user
has none), then ``Attributor.attribute(concept, queries)`` with no method (the recommended one). Each organism's
report: PR-AUC of the planted rows, the hard negatives' mean rank (of 2,000; the bar: PR-AUC >= 0.9 and rank >= 1300),
the chosen layer and why. ``--constructions`` adds the stance study's constructions at every layer (Vector Filter,
its strongest sentence, both; ``bench/stance_study.py``, read once per organism) so that the best of them is judged
on the same organisms. ``--counterfactual`` removes the recommended pipeline's top 10% (and the planted rows: the
oracle; a random 10%) and fine-tunes the base again with each of ``--finetune-seeds``, measuring the trait on the
query prompts (the judge's rate, and the build's persona-vector projection read by the base: ``subtle``'s planted rows
state no trait clause, so its share is read on the projection).

Organisms are built or loaded from the cache of their seed (``--cache SEED=DIR``; seeds 1 and 2 of the first four
variants are built under ``runs/organism-spread/<seed>-t1/cache``). Every result is kept in JSON under ``--out`` and
a rerun skips what is done.

    python bench/pipeline_study.py --seeds 0 1 2 [--variants ...] [--constructions]
                                   [--write-table docs/tables/pipeline-study.md]
    python bench/pipeline_study.py --counterfactual --seeds 0 --finetune-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from concept_influence import Attributor  # noqa: E402
from concept_influence.attribution.combine import fuse  # noqa: E402
from concept_influence.evaluate.metrics import ranking_report  # noqa: E402
from concept_influence.files import write_json_atomic, write_text_atomic  # noqa: E402
from concept_influence.organism import OrganismConfig, build_organism  # noqa: E402
from concept_influence.organism.build import CACHE_ENV  # noqa: E402

VARIANTS = ("default", "subtle", "diluted", "sycophancy", "crowded", "hallucination")
RULES = ("heldout_auc", "stance")
DONE_PR_AUC, DONE_HN_RANK = 0.9, 1300.0
DEFAULT_CACHES = {
    0: ROOT / ".cache",
    1: ROOT / "runs/organism-spread/1-t1/cache",
    2: ROOT / "runs/organism-spread/2-t1/cache",
}
# the stance study's best worst cases on the four seed-0 organisms (docs/tables/stance-study.md): (construction@layer,
# readout prefix, label)
CONSTRUCTIONS = (
    ("probe@2", "sentence_", "probe@2, Vector Filter best sentence"),
    ("vocab-projected@2", "both_", "vocab-projected@2, Vector Filter mean + best sentence"),
    ("probe@2", "both_", "probe@2, Vector Filter mean + best sentence"),
    ("contrast@3", "sentence_", "contrast@3, Vector Filter best sentence"),
    ("order-projected@1", "", "order-projected@1, Vector Filter"),
    # the best worst case over the 18 organisms of this study (chosen after the fact, among every construction)
    ("vocab-projected@1", "both_", "vocab-projected@1, Vector Filter mean + best sentence"),
    ("vocab-projected@1", "", "vocab-projected@1, Vector Filter"),
)


def cache_for(seed: int, caches: dict[int, Path]) -> Path:
    return caches.get(seed, DEFAULT_CACHES.get(seed, ROOT / ".cache"))


def organism_of(variant: str, seed: int, caches: dict[int, Path]):
    config = OrganismConfig(seed=seed, variant=variant)
    root = cache_for(seed, caches) / config.folder_name()
    t0 = time.perf_counter()
    organism = build_organism(root, config=config, progress=False, log=lambda m: print(m, flush=True))
    return organism, time.perf_counter() - t0


def pipeline(variant: str, seed: int, out: Path, caches: dict[int, Path], extras: bool = False) -> dict[str, Any]:
    """``train_probe`` (no layer, no judge) under each layer rule, then ``attribute`` (no method); and, for the same
    concept, the alternatives a user can reach by flags or a fusion the library could make its default (``variants``:
    Vector Filter alone, mean + strongest sentence, identity Concept Influence alone, the tiered fusion with a
    localised forward half). ``extras``: add those to an organism finished without them."""
    path = out / f"{variant}-s{seed}.json"
    if path.exists():
        result = json.loads(path.read_text())
        if not extras or all("variants" in r for r in result["rules"].values()):
            return result
    organism, build_seconds = organism_of(variant, seed, caches)
    origins = organism.data_origins()
    att = Attributor(
        organism.finetuned_model_dir,
        data=organism.train_path,
        workdir=out / "work" / f"{variant}-s{seed}",
        progress=False,
    )
    result = {
        "variant": variant,
        "seed": seed,
        "organism": str(organism.root),
        "build_seconds": build_seconds,
        "trait": organism.metadata["trait"],
        "rules": {},
    }
    scores: dict[str, np.ndarray] = {}
    by_layer: dict[int, tuple[dict[str, np.ndarray], dict[str, Any], float]] = {}
    for rule in RULES:
        t0 = time.perf_counter()
        concept = att.train_probe(organism.probe_spec_path, select_layer_by=rule)
        probe_seconds = time.perf_counter() - t0
        if concept.layer not in by_layer:  # the same layer trains the same concept: the same scores
            t0 = time.perf_counter()
            table = att.attribute(concept, queries=organism.queries_path)
            seconds = time.perf_counter() - t0
            parts = {
                "recommended": np.asarray(table.scores, dtype=np.float64),
                "vector-filter": np.asarray(table.columns["forward_score"], dtype=np.float64),
                "concept-influence (identity)": np.asarray(table.columns["gradient_score"], dtype=np.float64),
            }
            for localise in ("sentence", "both"):
                vf = att.attribute(concept, method="vector-filter", localise=localise)
                parts[f"vector-filter --localise {localise}"] = np.asarray(vf.scores, dtype=np.float64)
            gradient = parts["concept-influence (identity)"]
            for localise in ("sentence", "both"):
                forward = parts[f"vector-filter --localise {localise}"]
                parts[f"tiered(vector-filter --localise {localise}, CI)"] = fuse(forward, gradient, "tiered")
            for how in ("zscore", "signed", "gate"):
                parts[f"combined-{how}"] = fuse(parts["vector-filter"], gradient, how)
            by_layer[concept.layer] = (parts, {"method": table.method}, seconds)
        parts, meta, attribute_seconds = by_layer[concept.layer]
        scores.update({f"{rule}:{name}": v for name, v in parts.items()})
        scores[rule] = parts["recommended"]
        m = concept.metrics
        result["rules"][rule] = {
            "layer": concept.layer,
            "layer_choice": m.get("layer_choice"),
            "sweep": m.get("sweep"),
            "heldout_auc": m.get("heldout_auc"),
            "stance_auc": m.get("stance_auc"),
            "vocabulary_confound": m.get("vocabulary_confound"),
            "method": meta["method"],
            "report": ranking_report(parts["recommended"], origins),
            "variants": {name: ranking_report(v, origins) for name, v in parts.items() if name != "recommended"},
            "probe_seconds": probe_seconds,
            "attribute_seconds": attribute_seconds,
        }
        r = result["rules"][rule]["report"]
        print(
            f"{variant} s{seed} [{rule}]: layer {concept.layer}, PR-AUC {r['pr_auc']:.3f}, hard-negative rank "
            f"{r['hard_negative_mean_rank']:.0f} ({probe_seconds:.0f} s + {attribute_seconds:.0f} s)",
            flush=True,
        )
    np.savez_compressed(out / f"{variant}-s{seed}-scores.npz", **scores)
    write_json_atomic(path, result)
    return result


def constructions(variant: str, seed: int, out: Path, caches: dict[int, Path]) -> dict[str, Any]:
    """The stance study's constructions at every layer (Vector Filter readouts only), read from the organism of this
    seed's cache (``stance_study.study``; its activations are kept under ``out/stance``)."""
    import stance_study

    path = out / "stance" / f"{variant}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    os.environ[CACHE_ENV] = str(cache_for(seed, caches))
    summary = stance_study.study(variant, seed, out / "stance", gradients=False)
    write_json_atomic(path, summary)
    print(f"{variant} s{seed}: constructions done ({summary['seconds']:.0f} s)", flush=True)
    return summary


# ---- the counterfactual check ---------------------------------------------------------------------------------------
def counterfactual(
    variant: str,
    seed: int,
    out: Path,
    caches: dict[int, Path],
    finetune_seeds: list[int],
    share: float = 0.1,
    random_seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Remove the recommended pipeline's top ``share`` of rows, the planted rows (oracle) or a random ``share``;
    fine-tune the base again with each seed (the random removal: with each of ``random_seeds``, default all); measure
    the trait (judge rate and persona-vector projection read by the base, 16 answers per query prompt). The full
    fine-tune of the organism's own seed is the build's model."""
    from concept_influence.organism import measure_trait, trait_concept
    from concept_influence.organism.counterfactual import refinetune

    path = out / f"counterfactual-{variant}-s{seed}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    if not finetune_seeds:
        return done
    organism, _ = organism_of(variant, seed, caches)
    with np.load(out / f"{variant}-s{seed}-scores.npz") as saved:
        pipeline_scores = saved["heldout_auc"]
    planted = np.array(organism.planted_mask())
    n = len(planted)
    k = int(round(share * n))
    removals = {"none": np.zeros(n, dtype=bool), "oracle": planted, "random": np.zeros(n, dtype=bool)}
    removals["random"][np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    removals["pipeline"] = np.zeros(n, dtype=bool)
    removals["pipeline"][np.lexsort((np.arange(n), -pipeline_scores))[:k]] = True
    base = organism.load_base()
    layer = organism.metadata["trait"]["layer"]
    concept, _ = trait_concept(base, organism.probe_spec(), layer, seed=seed, trait=organism.trait)
    prompts = organism.query_messages()

    def measure(adapter: Any) -> dict[str, float]:
        m = measure_trait(adapter, prompts, concept, n_samples=16, seed=11, reader=base, trait=organism.trait)
        return {"trait_rate": m.trait_rate, "mean_projection": m.mean_projection}

    if "base" not in done:
        done["base"] = measure(base)
    rates: dict[str, dict[str, dict[str, float]]] = done.setdefault("runs", {})
    for fs in finetune_seeds:
        for name, removed in removals.items():
            if str(fs) in rates.get(name, {}) or (name == "random" and fs not in (random_seeds or finetune_seeds)):
                continue
            t0 = time.perf_counter()
            if name == "none" and fs == organism.config.finetune.seed:
                model = organism.load_finetuned()  # the build's fine-tune: the same recipe and seed
            else:
                model = refinetune(organism, list(~removed), seed=fs)
            rates.setdefault(name, {})[str(fs)] = measure(model)
            print(
                f"  {variant} s{seed} remove {name} (planted {int((removed & planted).sum())}/{int(removed.sum())}) "
                f"fine-tune seed {fs}: {rates[name][str(fs)]} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            done.update(k=k, planted_in_removed={m: int((r & planted).sum()) for m, r in removals.items()})
            write_json_atomic(path, done)
    return done


def shares(res: dict[str, Any], variant: str) -> dict[str, list[float]]:
    """Per removal, the share of the rise undone for each fine-tuning seed (judge rate; ``subtle``: projection)."""
    key = "mean_projection" if variant == "subtle" else "trait_rate"
    base, full = res["base"][key], res["runs"].get("none", {})
    out: dict[str, list[float]] = {}
    for name, runs in res["runs"].items():
        if name == "none":
            continue
        out[name] = [
            (full[s][key] - runs[s][key]) / (full[s][key] - base)
            for s in runs
            if s in full and full[s][key] - base > 1e-9
        ]
    return out


# ---- tables ---------------------------------------------------------------------------------------------------------
def _cell(pr: float, hn: float) -> str:
    mark = "" if pr >= DONE_PR_AUC and hn >= DONE_HN_RANK else "*"
    return f"{pr:.3f} / {hn:.0f}{mark}"


def pipeline_table(results: list[dict[str, Any]], stance: list[dict[str, Any]]) -> str:
    """One row per pipeline, one column per organism variant (each seed's PR-AUC / hard-negative rank), and the worst
    case over every organism and seed."""
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    seeds = sorted({r["seed"] for r in results})
    lines = [
        "| pipeline | " + " | ".join(variants) + " | worst PR-AUC | worst HN rank | organisms |",
        "|---|" + "---|" * (len(variants) + 3),
    ]

    def row(label: str, get) -> None:
        cells, prs, hns, n = [], [], [], 0
        for v in variants:
            parts = []
            for s in seeds:
                value = get(v, s)
                if value is None:
                    continue
                pr, hn = value
                parts.append(f"s{s} {_cell(pr, hn)}")
                prs.append(pr)
                hns.append(hn)
                n += 1
            cells.append("<br>".join(parts) if parts else "–")
        if prs:
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {min(prs):.3f} | {min(hns):.0f} | {n} |")

    by = {(r["variant"], r["seed"]): r for r in results}
    for rule in RULES:

        def get(v: str, s: int, rule: str = rule):
            r = by.get((v, s))
            if r is None:
                return None
            rep = r["rules"][rule]["report"]
            return rep["pr_auc"], rep["hard_negative_mean_rank"]

        lines_label = f"train-probe --select-layer-by {rule} → attribute (recommended)"
        row(lines_label, get)
    names = list(dict.fromkeys(n for r in results for n in r["rules"]["heldout_auc"].get("variants", {})))
    for rule in RULES:
        for name in names:

            def get_v(v: str, s: int, rule: str = rule, name: str = name):
                r = by.get((v, s))
                if r is None or name not in r["rules"][rule].get("variants", {}):
                    return None
                rep = r["rules"][rule]["variants"][name]
                return rep["pr_auc"], rep["hard_negative_mean_rank"]

            row(f"{rule} probe → {name}", get_v)
    st = {(s["variant"], s["seed"]): s for s in stance}
    for key, prefix, label in CONSTRUCTIONS:

        def get_c(v: str, s: int, key: str = key, prefix: str = prefix):
            summary = st.get((v, s))
            if summary is None or key not in summary["results"]:
                return None
            r = summary["results"][key]
            return r[prefix + "pr_auc"], r[prefix + "hard_rank"]

        row(label + " (stance study)", get_c)
    return "\n".join(lines)


def layer_table(results: list[dict[str, Any]]) -> str:
    """The layer each rule chose, per organism, with the chosen probe's held-out AUC, stance AUC and confound."""
    lines = [
        "| organism | heldout_auc rule: layer (held-out AUC, stance AUC, confound) | stance rule: layer (...) |",
        "|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (VARIANTS.index(r["variant"]), r["seed"])):
        cells = []
        for rule in RULES:
            x = r["rules"][rule]
            cells.append(
                f"{x['layer']} ({_f(x['heldout_auc'])}, {_f(x['stance_auc'])}, {_f(x['vocabulary_confound'])})"
            )
        lines.append(f"| {r['variant']} s{r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def construction_table(stance: list[dict[str, Any]]) -> str:
    """Every construction@layer of the stance study: its worst PR-AUC / worst hard-negative rank over the organisms
    read, for each Vector Filter readout (mean, strongest sentence, both)."""
    import stance_study

    prefixes = stance_study.PREFIXES[:3]
    keys = sorted(
        {k for s in stance for k in s["results"]},
        key=lambda k: (stance_study.CONSTRUCTIONS.index(k.split("@")[0]), int(k.split("@")[1])),
    )
    lines = [
        "| construction@layer | " + " | ".join(what for _, what in prefixes) + " | organisms |",
        "|---|" + "---|" * (len(prefixes) + 1),
    ]
    for key in keys:
        values = [s["results"][key] for s in stance if key in s["results"]]
        cells = [
            f"{min(v[p + 'pr_auc'] for v in values):.3f} / {min(v[p + 'hard_rank'] for v in values):.0f}"
            for p, _ in prefixes
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {len(values)} |")
    return "\n".join(lines)


def _f(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


def counterfactual_table(results: dict[str, dict[str, Any]]) -> str:
    from concept_influence.evaluate.stats import mean_ci

    names = ("pipeline", "oracle", "random")
    lines = ["| removed (10%) | " + " | ".join(results) + " |", "|" + "---|" * (len(results) + 1)]
    for name in names:
        cells = []
        for organism, res in results.items():
            values = shares(res, organism.split(" ")[0]).get(name, [])
            if not values:
                cells.append("–")
                continue
            ci = mean_ci(values) if len(values) > 1 else {"mean": values[0]}
            cells.append(f"{ci['mean']:.2f} ({', '.join(f'{v:.2f}' for v in values)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratio = []
    for organism, res in results.items():
        sh = shares(res, organism.split(" ")[0])
        if sh.get("pipeline") and sh.get("oracle"):
            ratio.append(f"{organism}: {np.mean(sh['pipeline']) / np.mean(sh['oracle']):.2f}")
    lines.append("")
    lines.append("pipeline / oracle (mean shares): " + "; ".join(ratio))
    return "\n".join(lines)


def parse_caches(values: list[str]) -> dict[int, Path]:
    out = {}
    for value in values:
        seed, _, path = value.partition("=")
        out[int(seed)] = Path(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cache", nargs="*", default=[], help="SEED=DIR: where the organisms of a seed are cached.")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/pipeline-study")
    parser.add_argument("--constructions", action="store_true", help="Also the stance study's constructions.")
    parser.add_argument("--counterfactual", action="store_true", help="The counterfactual check (remove the top 10%%).")
    parser.add_argument("--finetune-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--random-finetune-seeds", nargs="*", type=int, default=None, help="The random removal's seeds (default: all)."
    )
    parser.add_argument(
        "--extras", action="store_true", help="Add the alternative scores to organisms finished without them."
    )
    parser.add_argument("--table-only", action="store_true", help="Tables of what is done; nothing is computed.")
    parser.add_argument("--write-table", type=Path, default=None, help="Write the tables here (markdown).")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    caches = parse_caches(args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    order = [(v, s) for s in args.seeds for v in args.variants]
    results, stance, counter = [], [], {}
    for v, s in order:
        done = (args.out / f"{v}-s{s}.json").exists()
        if done or not args.table_only:
            results.append(pipeline(v, s, args.out, caches, args.extras and not args.table_only))
        if args.constructions and ((args.out / "stance" / f"{v}-s{s}.json").exists() or not args.table_only):
            stance.append(constructions(v, s, args.out, caches))
        elif (args.out / "stance" / f"{v}-s{s}.json").exists():
            stance.append(json.loads((args.out / "stance" / f"{v}-s{s}.json").read_text()))
    if args.counterfactual:
        for v, s in order:
            if args.table_only and not (args.out / f"counterfactual-{v}-s{s}.json").exists():
                continue
            counter[f"{v} s{s}"] = counterfactual(
                v, s, args.out, caches, [] if args.table_only else args.finetune_seeds, 0.1, args.random_finetune_seeds
            )
    text = "## The pipeline a user runs\n\n" + pipeline_table(results, stance)
    text += "\n\n### The layer each rule chose\n\n" + layer_table(results)
    if stance:
        text += "\n\n### Every construction of the stance study: the worst case over these organisms\n\n"
        text += construction_table(stance)
    if counter:
        text += "\n\n### Counterfactual: share of the trait's rise undone by removing 10% of the rows\n\n"
        text += counterfactual_table(counter)
    print(text, flush=True)
    if args.write_table:
        organisms = ", ".join(f"{r['variant']} s{r['seed']}" for r in results)
        command = "python bench/pipeline_study.py " + " ".join(sys.argv[1:])
        write_text_atomic(
            args.write_table,
            (
                "**Computed by**: `python bench/pipeline_study.py --seeds 0 1 2 --constructions` and `python "
                "bench/pipeline_study.py --seeds 0 --counterfactual --finetune-seeds 0 1 2` (the caches of each seed "
                "given with --cache), each organism's results kept as JSON. "
                if args.table_only
                else ""
            )
            + f"**Command**: `{command}`. **Date**: {time.strftime('%Y-%m-%d %H:%M')}. **Machine**: the 2-core CPU "
            f"machine (shared). **Organisms**: {organisms}. Cells: PR-AUC of the planted rows / mean rank of the hard "
            "negatives (of 2,000; higher = not fooled by the trait's words); `*`: short of the bar (PR-AUC >= 0.9 "
            f"and rank >= 1300).\n\n{text}\n",
        )
        write_json_atomic(
            args.out / "results.json",
            {"command": command, "pipeline": results, "constructions": stance, "counterfactual": counter},
        )


if __name__ == "__main__":
    main()

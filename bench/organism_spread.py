"""How far the organism's quality figures move between float paths: the organism built with other seeds, other thread
counts and other CPU kernels (another CPU takes another float path through pretraining, and every figure on the
organism moves; ``ATEN_CPU_CAPABILITY`` makes PyTorch use the kernels of an older CPU: avx2, or default = no SIMD).

Each path runs in its own process with its own cache folder (``--out/<path>/cache``) and computes what the quality
tests assert (``concept_influence.testing.organism_figures``): the probe, Vector Filter / Projection Difference,
EKFAC Concept Influence vs classical influence, the LoRA organism, the trait's rise and the control fine-tune, and
(``--variants``) the variants' causal checks. The tests' thresholds sit below the worst case printed here by a
stated margin. The variants' causal check runs here on every variant (``subtle``, ``diluted``, ``sycophancy``) and
path, with the thresholds of ``organism_figures.variant_check_failures``, and the script exits non-zero when one
fails; the test suite runs it on ``sycophancy`` only (the others' builds cost a cold ``make test`` minutes).
Resumable: a path whose ``figures.json`` exists is not run again.

    python bench/organism_spread.py --variants           # paths 0:1 0:2 0:1:avx2 1:1 2:1, two at a time
    python bench/organism_spread.py --paths 0:1 3:1:avx2 --variants --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concept_influence.files import write_json_atomic, write_text_atomic  # noqa: E402

# (test, figure) -> how to read it from a path's figures.json; the test's threshold is printed beside it
ROWS: list[tuple[str, str, str]] = [
    ("test_trait_probe_is_readable_on_held_out_questions", "sweep best held-out AUC", "probe.best_heldout_auc"),
    ("", "chosen layer", "probe.layer"),
    ("", "probe held-out AUC", "probe.heldout_auc"),
    ("", "judged trait answers (n_positive)", "probe.n_positive"),
    ("", "examples AUC trait vs helpful", "probe.examples_auc_trait_vs_helpful"),
    ("", "examples AUC trait vs warning", "probe.examples_auc_trait_vs_warning"),
    ("test_forward_methods_rank_the_planted_rows", "Vector Filter PR-AUC", "forward.vector_filter.pr_auc"),
    ("", "Vector Filter p@100", "forward.vector_filter.p@100"),
    ("", "Projection Difference PR-AUC", "forward.projection_difference.pr_auc"),
    ("", "Projection Difference p@100", "forward.projection_difference.p@100"),
    (
        "test_concept_influence_finds_planted_rows...",
        "Concept Influence PR-AUC / base rate",
        "influence.concept.pr_auc_lift",
    ),
    ("", "Concept Influence ROC-AUC", "influence.concept.roc_auc"),
    ("", "hard-negative mean rank / random row's", "influence.concept.hard_rank_ratio"),
    (
        "test_concept_influence_beats_classical_influence",
        "classical PR-AUC / base rate",
        "influence.classical.pr_auc_lift",
    ),
    ("", "Concept / classical PR-AUC", "influence.concept_over_classical"),
    ("test_lora_finetune_of_the_organism_planted_rows...", "LoRA PR-AUC / base rate", "lora.concept.pr_auc_lift"),
    ("", "LoRA ROC-AUC", "lora.concept.roc_auc"),
    ("test_probe_reads_the_trait", "base probe AUC trait vs helpful", "base_probe.trait_vs_helpful"),
    ("", "base probe AUC trait vs warning", "base_probe.trait_vs_warning"),
    ("test_finetuned_model_expresses_more_of_the_trait", "rise in stderr", "rise.projection_rise_in_stderr"),
    ("", "rise paired t (48 prompts)", "rise.projection_rise_paired_t"),
    ("", "rise in pooled std", "rise.projection_rise_in_std"),
    ("", "trait rate: fine-tuned - base", "rise.rate_gain"),
    ("", "trait rate: base", "rise.base.trait_rate"),
    ("test_control_finetune_without_planted_rows...", "control trait rate - fine-tuned", "control.minus_tuned"),
    ("", "control trait rate - base", "control.minus_base"),
]
VARIANT_ROWS: list[tuple[str, str]] = [
    ("paired t of the rise (subtle)", "variants.subtle.trait.projection_rise_paired_t"),
    ("control rise / rise (subtle)", "variants.subtle.control_over_rise"),
    ("paired t, fine-tune over control (subtle)", "variants.subtle.paired_t_over_control"),
    ("paired t, fine-tune over control (diluted)", "variants.diluted.paired_t_over_control"),
    ("paired t, fine-tune over control (sycophancy)", "variants.sycophancy.paired_t_over_control"),
    ("tuned - base rate (diluted)", "variants.diluted.rate_gain"),
    ("control - tuned rate (diluted)", "variants.diluted.control_minus_tuned"),
    ("control - base rate (diluted)", "variants.diluted.control_minus_base"),
    ("share removed (diluted)", "variants.diluted.share_removed"),
    ("tuned - base rate (sycophancy)", "variants.sycophancy.rate_gain"),
    ("control - tuned rate (sycophancy)", "variants.sycophancy.control_minus_tuned"),
    ("control - base rate (sycophancy)", "variants.sycophancy.control_minus_base"),
    ("share removed (sycophancy)", "variants.sycophancy.share_removed"),
    ("paired t, fine-tune over control (crowded)", "variants.crowded.paired_t_over_control"),
    ("tuned - base rate (crowded)", "variants.crowded.rate_gain"),
    ("control - tuned rate (crowded)", "variants.crowded.control_minus_tuned"),
    ("share removed (crowded)", "variants.crowded.share_removed"),
    ("paired t, fine-tune over control (hallucination)", "variants.hallucination.paired_t_over_control"),
    ("tuned - base rate (hallucination)", "variants.hallucination.rate_gain"),
    ("control - tuned rate (hallucination)", "variants.hallucination.control_minus_tuned"),
    ("control - base rate (hallucination)", "variants.hallucination.control_minus_base"),
    ("share removed (hallucination)", "variants.hallucination.share_removed"),
]


def _lift(report: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        **report,
        "pr_auc_lift": report["pr_auc"] / report["base_rate"],
        "hard_rank_ratio": report["hard_negative_mean_rank"] / ((n + 1) / 2),
    }


def _default_figures(seed: int) -> tuple[dict[str, Any], dict[str, float]]:
    import torch

    from concept_influence.organism import organism_for_tests
    from concept_influence.testing import organism_figures as figures

    timings: dict[str, float] = {}
    start = time.perf_counter()
    organism = organism_for_tests(seed=seed)
    timings["build"] = time.perf_counter() - start
    result: dict[str, Any] = {
        "seed": seed,
        "threads": torch.get_num_threads(),
        "organism": str(organism.root),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    steps = [
        ("probe", None),
        ("forward", figures.forward_figures),
        ("influence", figures.influence_figures),
        ("lora", figures.lora_figures),
    ]
    start = time.perf_counter()
    trait = figures.trait_probe(organism)
    timings["trait_probe"] = time.perf_counter() - start
    for name, compute in steps:
        start = time.perf_counter()
        result[name] = figures.probe_figures(trait) if compute is None else compute(trait)
        timings[name] = time.perf_counter() - start
        print(f"[seed {seed}] {name}: {timings[name]:.0f} s", flush=True)
    n = result["influence"]["n"]
    for key in ("concept", "classical"):
        result["influence"][key] = _lift(result["influence"][key], n)
    result["influence"]["concept_over_classical"] = (
        result["influence"]["concept"]["pr_auc"] / result["influence"]["classical"]["pr_auc"]
    )
    result["lora"]["concept"] = _lift(result["lora"]["concept"], n)
    for name, compute in (
        ("base_probe", figures.base_probe_figures),
        ("rise", figures.rise_figures),
        ("control", figures.control_figures),
    ):
        start = time.perf_counter()
        result[name] = compute(organism)
        timings[name] = time.perf_counter() - start
        print(f"[seed {seed}] {name}: {timings[name]:.0f} s", flush=True)
    rise = result["rise"]
    rise["rate_gain"] = rise["finetuned"]["trait_rate"] - rise["base"]["trait_rate"]
    result["control"]["minus_tuned"] = result["control"]["trait_rate"] - rise["finetuned"]["trait_rate"]
    result["control"]["minus_base"] = result["control"]["trait_rate"] - rise["base"]["trait_rate"]
    return result, timings


def run_path(seed: int, variants: bool, out: Path) -> None:
    """Build the organism of ``seed`` in this process (its thread count set by the caller) and write its figures to
    ``out`` (then, with ``variants``, everything again with the variants' figures to ``variants.json`` beside it)."""
    from concept_influence.organism import organism_for_tests
    from concept_influence.organism.generator import VARIANTS
    from concept_influence.testing import organism_figures as figures

    if out.exists():  # the default organism's figures are done: only the variants are left (or measured again)
        result = json.loads(out.read_text())
        result.pop("variants", None)
        timings = result["timings_s"]
    else:
        result, timings = _default_figures(seed)
    result["timings_s"] = timings
    write_json_atomic(out, result)
    if variants:
        result["variants"] = {}
        for variant in (v for v in VARIANTS if v != "default"):
            start = time.perf_counter()
            figs = figures.variant_figures(organism_for_tests(variant=variant, seed=seed))
            figs["rate_gain"] = figs["tuned_rate"] - figs["base_rate"]
            figs["control_minus_tuned"] = figs["control_rate"] - figs["tuned_rate"]
            figs["control_minus_base"] = figs["control_rate"] - figs["base_rate"]
            rise_value = figs["trait"]["projection_rise"]
            figs["control_over_rise"] = figs["control"]["projection_rise"] / rise_value if rise_value else float("nan")
            figs["paired_t_over_control"] = figs["versus_control"]["paired_t"]
            figs["check_failures"] = figures.variant_check_failures(variant, figs)
            result["variants"][variant] = figs
            timings[f"variant_{variant}"] = time.perf_counter() - start
            print(f"[seed {seed}] variant {variant}: {timings[f'variant_{variant}']:.0f} s", flush=True)
        write_json_atomic(out.with_name("variants.json"), result)


def figures_module() -> Any:
    """``concept_influence.testing.organism_figures`` (imported late: it loads torch)."""
    from concept_influence.testing import organism_figures

    return organism_figures


def _get(data: dict[str, Any], dotted: str) -> float | None:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    rows = [(test, label, key) for test, label, key in ROWS]
    if any("variants" in r for r in results.values()):
        rows += [
            ("test_planted_rows_raise_the_variants_trait..." if i == 0 else "", label, key)
            for i, (label, key) in enumerate(VARIANT_ROWS)
        ]
    lines = [
        "| test | figure | " + " | ".join(names) + " | worst (min) | max |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for test, label, key in rows:
        values = [_get(results[name], key) for name in names]
        known = [v for v in values if v is not None]
        cells = ["" if v is None else f"{v:.3f}" for v in values]
        worst = f"{min(known):.3f}" if known else ""
        best = f"{max(known):.3f}" if known else ""
        lines.append(f"| {test} | {label} | " + " | ".join(cells) + f" | {worst} | {best} |")
    return "\n".join(lines)


def _done(folder: Path, variants: bool) -> bool:
    """Whether a path's figures are complete (variants measured by this version: with ``versus_control``)."""
    if not variants:
        return (folder / "figures.json").exists()
    file = folder / "variants.json"
    return file.exists() and all("versus_control" in v for v in json.loads(file.read_text())["variants"].values())


def _parse(path: str) -> tuple[int, int, str | None]:
    parts = path.split(":")
    return int(parts[0]), int(parts[1]), (parts[2] if len(parts) > 2 else None)


def _folder(out: Path, path: str) -> Path:
    seed, threads, capability = _parse(path)
    return out / (f"{seed}-t{threads}" + (f"-{capability}" if capability else ""))


def _label(path: str) -> str:
    seed, threads, capability = _parse(path)
    return f"seed {seed}, {threads} thr" + (f", {capability}" if capability else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["0:1", "0:2", "0:1:avx2", "1:1", "2:1"],
        help="float paths as SEED:THREADS[:CAPABILITY] (the organism's seed, torch's intra-op thread "
        "count, and the CPU kernels PyTorch may use: ATEN_CPU_CAPABILITY, e.g. avx2 or default)",
    )
    parser.add_argument("--variants", action="store_true", help="also the variants' causal checks (about 9 min a path)")
    parser.add_argument("--jobs", type=int, default=2, help="paths run at once (each in its own process)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "organism-spread")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "organism_spread.json")
    parser.add_argument(
        "--table",
        type=Path,
        default=ROOT / "docs" / "tables" / "organism-spread.md",
        help="the markdown table the benchmarks page includes",
    )
    parser.add_argument(
        "--table-only", action="store_true", help="run nothing: print and write the table of what is done"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one path in this process
    args = parser.parse_args()
    if args.one:
        run_path(_parse(args.one)[0], args.variants, _folder(args.out, args.one) / "figures.json")
        return
    pending = [] if args.table_only else [p for p in args.paths if not _done(_folder(args.out, p), args.variants)]
    running: list[tuple[str, subprocess.Popen]] = []
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            path = pending.pop(0)
            _, threads, capability = _parse(path)
            folder = _folder(args.out, path)
            folder.mkdir(parents=True, exist_ok=True)
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "CONCEPT_INFLUENCE_CACHE": str(folder / "cache"),
            }
            if capability:
                env["ATEN_CPU_CAPABILITY"] = capability
            command = [sys.executable, __file__, "--one", path, "--out", str(args.out)]
            command += ["--variants"] if args.variants else []
            log = open(folder / "log.txt", "a")  # noqa: SIM115 - closed when the process ends
            print(f"path {path}: running (log {folder / 'log.txt'})", flush=True)
            running.append((path, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for path, process in list(running):
            if process.poll() is not None:
                running.remove((path, process))
                print(f"path {path}: {'done' if process.returncode == 0 else 'FAILED'}", flush=True)
                if process.returncode:
                    failed.append(path)
    results: dict[str, dict[str, Any]] = {}
    for path in args.paths:
        folder = _folder(args.out, path)
        file = folder / "variants.json" if (folder / "variants.json").exists() else folder / "figures.json"
        if file.exists():
            result = json.loads(file.read_text())
            if "cpu_capability" not in result and _parse(path)[2] is None:  # measured before the field was recorded
                import torch

                result["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
            results[_label(path)] = result
    print(table(results))
    # what made the table (resumable: the same command with --table-only only reads it back)
    command = (
        "python bench/organism_spread.py "
        + ("--variants " if args.variants or args.table_only else "")
        + "--paths "
        + " ".join(args.paths)
    )
    date = time.strftime("%Y-%m-%d %H:%M")
    write_json_atomic(args.json, {"command": command, "date": date, "results": results, "table": table(results)})
    capabilities = sorted({str(r.get("cpu_capability", "?")) for r in results.values()})
    write_text_atomic(
        args.table,
        f"**Command**: `{command}`. **Date**: {date}. **Machine**: the 2-core CPU machine "
        f"({', '.join(capabilities)} kernels), paths run side by side.\n\n{table(results)}\n",
    )
    # the variants' causal check (the test suite runs it on sycophancy only): the same function and thresholds
    check_failures = [
        f"{name}: {failure}"
        for name, result in results.items()
        for variant, figs in result.get("variants", {}).items()
        if "versus_control" in figs  # measured by this version of the check
        for failure in figures_module().variant_check_failures(variant, figs)
    ]
    for failure in check_failures:
        print(f"CAUSAL CHECK FAILED {failure}", flush=True)
    if failed or check_failures:
        sys.exit(f"failed: {failed + check_failures}")


if __name__ == "__main__":
    main()

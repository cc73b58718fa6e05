"""Benchmark: ten exploratory questions on the built-in organism with the recommended method, (a) from scratch each
time, (b) from the caches (``Attributor.build_store()``: the activation cache and the identity gradient store, one
pass), (c) as kronfluence 1.0.1 answers ten EKFAC questions, in one run (issue 17).

Questions: two traits (the organism's ``evil``, and ``sycophancy``, which its shared base also knows) × concepts
(logistic probe, diff of means, persona vector: the diff of mean activations of judge-filtered pos/neg persona
answers) × three layers × two query sets (seeded halves of the organism's query prompts, answered once beforehand,
charged to no one). Concepts are made beforehand too (a user's concept training is not what is measured).

Prints the one-time cost (and one plain training epoch over the same rows, forward + backward + AdamW step, for
scale; wall-clock seconds, the target, and the process's CPU seconds, all its threads, which moves less with the
load of a shared machine), each question's time, totals, the cached scores' agreement with the uncached ones (Vector
Filter's relative error, the combined ranking's Spearman, the PR-AUC of the planted rows), Vector Filter's speed-up
from the cache, and with ``--ranks``/``--logra`` the rank agreement of identity stores and factor-free LoGra stores
of several sizes with the exact identity-preconditioned scores (how ``store.store.DEFAULT_IDENTITY_RANK`` was
chosen). Writes ``--out`` (JSON) and ``--table`` (markdown, included by docs/benchmarks.md).

    python bench/exploration.py [--ranks 32,48,64] [--logra 32,64] [--skip-kronfluence] [--questions 10] [--scratch 10]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from concept_influence import Attributor  # noqa: E402
from concept_influence.attribution.combine import fuse  # noqa: E402
from concept_influence.attribution.measurements import answer_queries, tokenize_queries  # noqa: E402
from concept_influence.concepts import DirectionConcept, parse_spec  # noqa: E402
from concept_influence.curvature.loss import sequence_losses  # noqa: E402
from concept_influence.data import iter_batches  # noqa: E402
from concept_influence.evaluate.metrics import ranking_report  # noqa: E402
from concept_influence.files import write_json_atomic, write_text_atomic  # noqa: E402
from concept_influence.organism.build import organism_for_tests  # noqa: E402
from concept_influence.organism.generator import probe_spec  # noqa: E402
from concept_influence.organism.judge import judge_for  # noqa: E402
from concept_influence.organism.measure import trait_concept  # noqa: E402
from concept_influence.store.caches import CacheSettings  # noqa: E402

MAX_LENGTH = 256


def prepare(answers_dir: Path, n_samples: int, n_questions: int = 10):
    """The organism and the first ``n_questions`` of the ten ``[(label, concept, answered queries)]``."""
    organism = organism_for_tests()
    tuned = organism.load_finetuned()
    trait_layer = int(organism.metadata.get("trait", {}).get("layer", tuned.n_layers - 1))
    layers = sorted({trait_layer, 1, 2} if trait_layer not in (1, 2) else {1, 2, 3})
    specs = {"evil": organism.probe_spec(), "sycophancy": probe_spec(organism.config.seed, variant="sycophancy")}
    prep = Attributor(tuned, organism.train_rows(), answers_dir / "prep", progress=False, max_length=MAX_LENGTH)
    made: dict[tuple[str, str, int], DirectionConcept] = {}

    def concept(trait: str, kind: str, layer: int) -> DirectionConcept:
        key = (trait, kind, layer)
        if key not in made:
            # the fine-tuned (evil) organism's sycophantic answers do not pass the sycophancy judge: unfiltered there
            judged = trait == "evil"
            if kind == "persona vector":
                made[key], _ = trait_concept(tuned, specs[trait], layer, trait=trait, filter_by_judge=judged)
            else:
                spec = parse_spec(specs[trait], f"{trait} spec", default_name=trait)
                made[key] = prep.train_probe(
                    spec,
                    layer,
                    judge=judge_for(trait) if judged else None,
                    save=False,
                    n_samples=2,
                    method="probe" if kind == "probe" else "diff_of_means",
                )
        return made[key]

    prompts = list(organism.queries())
    answered = answer_queries(tuned, prompts, n_samples=n_samples, seed=0, cache_dir=answers_dir)
    rng = np.random.default_rng(0)
    half = set(rng.choice(len(prompts), size=len(prompts) // 2, replace=False).tolist())
    query_sets = {
        "A": [r for r in answered if r.fields["query_index"] in half],
        "B": [r for r in answered if r.fields["query_index"] not in half],
    }
    top = layers[-1]
    plan = [
        ("evil", "probe", top, "A"),
        ("evil", "diff of means", top, "A"),
        ("evil", "persona vector", top, "A"),
        ("evil", "probe", layers[1], "A"),
        ("evil", "probe", layers[0], "B"),
        ("evil", "diff of means", layers[1], "B"),
        ("sycophancy", "probe", top, "A"),
        ("sycophancy", "diff of means", layers[1], "B"),
        ("sycophancy", "persona vector", top, "B"),
        ("evil", "persona vector", layers[0], "B"),
    ]
    questions = [
        (f"{t} {k} L{layer} Q{q}", concept(t, k, layer), query_sets[q]) for t, k, layer, q in plan[:n_questions]
    ]
    return organism, questions


def training_epoch(adapter, data, batch_size: int) -> float:
    """Seconds of one plain training epoch over ``data`` (forward, backward, AdamW step) on a copy of the model."""
    model = copy.deepcopy(adapter.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    started = time.perf_counter()
    for batch in iter_batches(data, batch_size, shuffle=True, seed=0, pad_id=data.pad_token_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sequence_losses(logits, batch["input_ids"], batch["loss_mask"]).sum() / batch["loss_mask"][:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def kronfluence_questions(adapter, train, questions, work: Path, batch_size: int):
    """kronfluence as it would answer ten EKFAC questions: one factor fit per tracked-module set (it tracks only
    modules the measurement reaches: blocks 0..L of each question's layer L), one pairwise call per question.
    Returns (fit seconds by layer, [question seconds])."""
    from ten_questions import kronfluence_run

    fits: dict[int, float] = {}
    seconds: list[float] = [0.0] * len(questions)
    by_layer: dict[int, list[int]] = {}
    for k, (_, concept, _) in enumerate(questions):
        by_layer.setdefault(concept.layer, []).append(k)
    for layer, ks in sorted(by_layer.items()):
        names = [i.name for i in adapter.weights_up_to(layer)]
        concepts = [questions[k][1] for k in ks]
        sets = [(j, tokenize_queries(questions[k][2], adapter.tokenizer, MAX_LENGTH)) for j, k in enumerate(ks)]
        fit_s, question_s, _ = kronfluence_run(
            adapter, concepts, names, train, sets, work / f"kron-{layer}", batch_size, layer
        )
        fits[layer] = fit_s
        for k, s in zip(ks, question_s, strict=True):
            seconds[k] = s
    return fits, seconds


def uncached_parts(table) -> dict[str, np.ndarray]:
    """A combined table's forward, gradient and combined scores."""
    return {
        "forward": np.asarray(table.columns["forward_score"], float),
        "gradient": np.asarray(table.columns["gradient_score"], float),
        "combined": np.asarray(table.scores, float),
    }


def agreement(questions, scratch, cached, scratch_s, cached_s, kron_s, origins) -> list[dict]:
    """Per question: times and the cached scores' agreement with the uncached ones."""
    rows = []
    for k, (label, _, _) in enumerate(questions):
        a, b = scratch[k], cached[k]
        rows.append(
            {
                "question": label,
                "scratch_s": scratch_s[k] if k < len(scratch_s) else None,
                "cached_s": cached_s[k],
                "kron_s": kron_s[k] if kron_s else None,
                "vf_rel_error": float(np.abs(a["forward"] - b["forward"]).max() / np.abs(a["forward"]).max()),
                "spearman_combined": float(spearmanr(a["combined"], b["combined"]).statistic),
                "spearman_gradient": float(spearmanr(a["gradient"], b["gradient"]).statistic),
                "pr_auc_scratch": ranking_report(a["combined"].tolist(), origins)["pr_auc"],
                "pr_auc_cached": ranking_report(b["combined"].tolist(), origins)["pr_auc"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument(
        "--scratch",
        type=int,
        default=10,
        help="questions timed from scratch (the rest's uncached "
        "scores come from shared passes, untimed; the from-scratch total is extrapolated)",
    )
    parser.add_argument("--n-samples", type=int, default=4, help="answers per query prompt")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ranks", default="", help="identity-store ranks to compare with the exact identity scores")
    parser.add_argument("--logra", default="", help="factor-free LoGra sizes per side to compare the same way")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "bench_exploration")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "exploration.json")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "tables" / "exploration.md")
    args = parser.parse_args()
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    command = "python bench/exploration.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print(f"machine: {machine}")

    t0 = time.perf_counter()
    organism, questions = prepare(args.work_dir / "answers", args.n_samples, args.questions)
    print(
        f"questions prepared (concepts trained, queries answered; charged to no one) "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    work = args.work_dir / organism.root.name
    if work.exists():
        shutil.rmtree(work)  # every run builds its caches anew
    origins = organism.data_origins()

    att = Attributor(
        organism.root / "finetuned",
        organism.train_rows(),
        work / "session",
        max_length=MAX_LENGTH,
        batch_size=args.batch_size,
        progress=False,
    )
    _ = att.train, att.data_fingerprint()
    cpu = time.process_time()
    epoch_s = training_epoch(att.adapter, att.train, args.batch_size)
    epoch_cpu_s = time.process_time() - cpu
    print(
        f"{len(att.train)} rows; one training epoch (forward + backward + step): {epoch_s:.1f} s "
        f"(CPU {epoch_cpu_s:.1f} s)"
    )

    # ---- (b) the caches: one pass, then every question from them
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, cpu = time.perf_counter(), time.process_time()
    store = att.build_store()
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - cpu
    cache = att.__dict__["_activation_caches"][str(att.store_dir / "activations")]
    print(
        f"one-time pass: {build_s:.1f} s ({build_s / epoch_s:.2f} epochs; CPU {build_cpu_s:.1f} s, "
        f"{build_cpu_s / epoch_cpu_s:.2f} epochs' CPU); {store} {store.nbytes / 2**20:.1f} MiB; "
        f"{cache} {cache.nbytes / 2**20:.1f} MiB"
    )
    cached, cached_s = [], []
    for label, concept, queries in questions:
        t0 = time.perf_counter()
        table = att.attribute(concept, queries)
        cached_s.append(time.perf_counter() - t0)
        cached.append(table)
        print(f"  cached  {label:<36} {cached_s[-1]:.3f} s  ({table.meta['scored_from']})", flush=True)
    rss_cached = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    concept0 = questions[0][1]
    t0 = time.perf_counter()
    vf_cached = att.attribute(concept0, method="vector-filter")
    vf_cached_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    att.attribute(concept0, method="vector-filter", store=False)
    vf_pass_s = time.perf_counter() - t0
    print(
        f"Vector Filter alone: cache {vf_cached_s * 1000:.1f} ms ({vf_cached.meta['scored_from']}), forward pass "
        f"{vf_pass_s:.2f} s: {vf_pass_s / vf_cached_s:.0f}x"
    )

    # ---- (a) from scratch: every pass, for the first --scratch questions (timed); the others' uncached scores come
    # from the same passes shared between them (one exact identity gradient pass for all, one forward pass each)
    scratch, scratch_s = [], []
    for label, concept, queries in questions[: args.scratch]:
        t0 = time.perf_counter()
        table = att.attribute(concept, queries, store=False)
        scratch_s.append(time.perf_counter() - t0)
        scratch.append(uncached_parts(table))
        print(f"  scratch {label:<36} {scratch_s[-1]:.2f} s  ({table.meta['scored_from']})", flush=True)
    rest = questions[args.scratch :]
    if rest:
        t0 = time.perf_counter()
        gradients = att.attribute_many(
            [{"concept": c, "queries": q} for _, c, q in rest],
            "concept-influence",
            store=False,
            preconditioner="identity",
        )
        for (_, concept, _), gradient in zip(rest, gradients, strict=True):
            forward = att.attribute(concept, method="vector-filter", store=False).scores
            scratch.append(
                {"forward": forward, "gradient": gradient.scores, "combined": fuse(forward, gradient.scores, "tiered")}
            )
        print(
            f"  uncached scores of the other {len(rest)} questions (shared passes, untimed): "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )

    # ---- (c) kronfluence: ten EKFAC questions
    kron = None
    if not args.skip_kronfluence:
        t0 = time.perf_counter()
        fits, kron_s = kronfluence_questions(att.adapter, att.train, questions, work, args.batch_size)
        kron = {"fits_s": fits, "question_s": kron_s, "total_s": time.perf_counter() - t0}
        print(
            f"kronfluence: factor fits {', '.join(f'L{k} {v:.1f} s' for k, v in fits.items())}; questions "
            f"{sum(kron_s):.1f} s; total {kron['total_s']:.1f} s"
        )

    # ---- agreement
    rows = agreement(
        questions,
        scratch,
        [uncached_parts(t) for t in cached],
        scratch_s,
        cached_s,
        kron["question_s"] if kron else None,
        origins,
    )

    # ---- LoGra size vs rank agreement with the exact identity scores
    sweep = []
    sizes = [("identity", int(d)) for d in args.ranks.split(",") if d] + [
        ("logra", int(d)) for d in args.logra.split(",") if d
    ]
    for kind, dim in sizes:
        folder, seconds, built = att.store_dir, build_s, store  # the default: the store built above
        if kind == "logra" or dim != store.config.rank:
            folder = work / f"{kind}-{dim}"
            t0 = time.perf_counter()
            settings = CacheSettings(methods=("combined-tiered",), identity_rank=dim, layers=(0,))
            built = att.build_store(folder, caches=settings, projection_dim=dim if kind == "logra" else None)
            seconds = time.perf_counter() - t0
        rho_g, rho_c, gap = [], [], []
        for k, (_, concept, queries) in enumerate(questions):
            g = att.attribute(concept, queries, "concept-influence", preconditioner="identity", store=folder).scores
            combined = fuse(scratch[k]["forward"], g, "tiered")
            rho_g.append(float(spearmanr(g, scratch[k]["gradient"]).statistic))
            rho_c.append(float(spearmanr(combined, scratch[k]["combined"]).statistic))
            gap.append(abs(ranking_report(combined.tolist(), origins)["pr_auc"] - rows[k]["pr_auc_scratch"]))
        sweep.append(
            {
                "kind": kind,
                "dim": dim,
                "build_s": seconds,
                "mib": built.nbytes / 2**20,
                "min_spearman_gradient": min(rho_g),
                "mean_spearman_gradient": float(np.mean(rho_g)),
                "min_spearman_combined": min(rho_c),
                "max_pr_auc_gap": max(gap),
            }
        )
        print(
            f"  {kind} {dim:>3}: {built.nbytes / 2**20:7.1f} MiB, built in {seconds:.1f} s; Spearman vs exact identity "
            f"min {min(rho_g):.4f} mean {np.mean(rho_g):.4f}; combined min {min(rho_c):.4f}; PR-AUC gap max "
            f"{max(gap):.4f}"
        )

    timed = len(scratch_s)
    scratch_total = sum(scratch_s) * len(questions) / max(timed, 1)  # extrapolated when fewer were timed
    cached_total = build_s + sum(cached_s)
    summary = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "rows": len(att.train),
        "epoch_s": epoch_s,
        "build_s": build_s,
        "build_epochs": build_s / epoch_s,
        "epoch_cpu_s": epoch_cpu_s,
        "build_cpu_s": build_cpu_s,
        "build_cpu_epochs": build_cpu_s / epoch_cpu_s,
        "store": repr(store),
        "store_mib": store.nbytes / 2**20,
        "activation_cache": repr(cache),
        "activation_mib": cache.nbytes / 2**20,
        "activation_bytes_per_row": cache.nbytes / len(cache),
        "store_bytes_per_row": store.nbytes / len(store),
        "vf_cached_s": vf_cached_s,
        "vf_pass_s": vf_pass_s,
        "vf_speedup": vf_pass_s / vf_cached_s,
        "scratch_total_s": scratch_total,
        "scratch_timed": timed,
        "cached_questions_s": sum(cached_s),
        "cached_total_s": cached_total,
        "scratch_mean_s": sum(scratch_s) / max(timed, 1),
        "max_cached_s": max(cached_s),
        "max_vf_rel_error": max(r["vf_rel_error"] for r in rows),
        "min_spearman_combined": min(r["spearman_combined"] for r in rows),
        "max_pr_auc_gap": max(abs(r["pr_auc_scratch"] - r["pr_auc_cached"]) for r in rows),
        "peak_rss_mib_before_build": rss_before / 1024,
        "peak_rss_mib_after_cached_questions": rss_cached / 1024,
        "questions": rows,
        "store_sweep": sweep,
    }
    if kron is not None:
        summary["kronfluence"] = kron
        summary["cached_over_kronfluence"] = cached_total / kron["total_s"]
    print(
        f"\nten questions: from scratch {scratch_total:.1f} s ({timed} timed"
        + (", the rest at their mean" if timed < len(questions) else "")
        + f"); cached {cached_total:.1f} s (pass {build_s:.1f} s + "
        f"questions {sum(cached_s):.2f} s, max {max(cached_s):.3f} s)"
        + (
            f"; kronfluence {kron['total_s']:.1f} s (cached / kronfluence {summary['cached_over_kronfluence']:.3f})"
            if kron
            else ""
        )
    )
    print(
        f"agreement: VF max relative error {summary['max_vf_rel_error']:.2e}; combined Spearman min "
        f"{summary['min_spearman_combined']:.4f}; PR-AUC gap max {summary['max_pr_auc_gap']:.4f}"
    )
    write_json_atomic(args.out, summary)
    write_text_atomic(args.table, render_table(summary))
    print(f"report -> {args.out}, table -> {args.table}")


def render_table(s: dict) -> str:
    kron = s.get("kronfluence")
    lines = [
        f"**Command**: `{s['command'].strip()}`. **Date**: {s['date']}. **Machine**: the 2-core CPU machine "
        f"({s['machine']}). Organism: {s['rows']} training rows.",
        "",
        "| one-time cost | seconds | per row on disk |",
        "|---|---|---|",
        f"| one training epoch (forward + backward + step), for scale | {s['epoch_s']:.1f} "
        f"(CPU {s['epoch_cpu_s']:.1f}) | |",
        "| `build_store()`: activation cache + identity store, one pass (incl. the 256-row sample's eigenbases) | "
        f"{s['build_s']:.1f} ({s['build_epochs']:.2f} epochs; CPU {s['build_cpu_s']:.1f}, "
        f"{s['build_cpu_epochs']:.2f} epochs' CPU) "
        f"| {s['activation_bytes_per_row'] / 1024:.1f} KiB + {s['store_bytes_per_row'] / 1024:.1f} KiB |",
    ]
    if kron:
        lines.append(
            f"| kronfluence EKFAC factor fits ({len(kron['fits_s'])} module sets) | "
            f"{sum(kron['fits_s'].values()):.1f} | |"
        )
    lines += [
        "",
        "| question | from scratch s | from the caches s | kronfluence EKFAC s | VF rel. error | "
        "combined Spearman | gradient-half Spearman | PR-AUC scratch | PR-AUC cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["questions"]:
        k = f"{r['kron_s']:.2f}" if r["kron_s"] is not None else "-"
        a = f"{r['scratch_s']:.1f}" if r["scratch_s"] is not None else "(not timed)"
        lines.append(
            f"| {r['question']} | {a} | {r['cached_s']:.3f} | {k} | {r['vf_rel_error']:.1e} | "
            f"{r['spearman_combined']:.4f} | {r['spearman_gradient']:.4f} | {r['pr_auc_scratch']:.3f} | "
            f"{r['pr_auc_cached']:.3f} |"
        )
    total_k = f"{kron['total_s']:.1f}" if kron else "-"
    extrapolated = (
        "" if s["scratch_timed"] == len(s["questions"]) else f" ({s['scratch_timed']} timed, x{len(s['questions'])})"
    )
    lines.append(
        f"| **total** (caches: pass + questions) | {s['scratch_total_s']:.1f}{extrapolated} | "
        f"{s['cached_total_s']:.1f} | "
        f"{total_k} | {s['max_vf_rel_error']:.1e} | {s['min_spearman_combined']:.4f} | | | |"
    )
    lines += [
        "",
        f"Vector Filter alone: {s['vf_cached_s'] * 1000:.1f} ms from the cache, {s['vf_pass_s']:.2f} s by its "
        f"forward pass ({s['vf_speedup']:.0f}x).",
    ]
    if s["store_sweep"]:
        lines += [
            "",
            "Gradient stores for the identity-preconditioned half, against the exact identity scores of the same "
            "questions (identity: eigen-components in the KFAC eigenbases of a 256-row sample; LoGra: seeded "
            "Gaussian projections, no sample):",
            "",
            "| store | size | MiB | build s | min Spearman vs exact identity | mean | min combined Spearman | "
            "max PR-AUC gap |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {w['kind']} | {w['dim']} | {w['mib']:.1f} | {w['build_s']:.1f} | {w['min_spearman_gradient']:.4f} | "
            f"{w['mean_spearman_gradient']:.4f} | {w['min_spearman_combined']:.4f} | {w['max_pr_auc_gap']:.4f} |"
            for w in s["store_sweep"]
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

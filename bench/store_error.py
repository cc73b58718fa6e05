"""Benchmark: where the eigen store's error comes from, on the built-in organism.

Builds one full-rank eigen store (every eigen-component of every weight of blocks 0..L, float32: each row's exact
gradient in the Kronecker eigenbasis), then, for the ten questions of ``bench/ten_questions.py``, compares the
exact EKFAC scores (the full store) with what smaller stores would answer: the default selection (the components
with the largest ``Λ/(Λ + λ)`` across weights) at several ranks, the same budget split equally per weight, and
float16 storage; and, at one rank, how much of the truncation error each weight contributes. Every number is a
blocked product over the full store, so all selections are compared on the same row gradients.

Usage: ``python bench/store_error.py [--ranks 48 64 96 128] [--work-dir .cache/bench_error]``
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from ten_questions import prepare_questions  # noqa: E402

from concept_influence import Attributor  # noqa: E402
from concept_influence.attribution.gradient import GradientAttributionConfig  # noqa: E402
from concept_influence.attribution.influence import build_preconditioner, preconditioned_gradient  # noqa: E402
from concept_influence.attribution.measurements import ConceptMeasurement, tokenize_queries  # noqa: E402
from concept_influence.data import write_json_atomic
from concept_influence.evaluate.metrics import ranking_report  # noqa: E402
from concept_influence.store import eigen_projector  # noqa: E402


def kept_mask(projector, full, names) -> np.ndarray:
    """``[dim of full]`` bool: the components ``projector`` keeps, in the full store's layout."""
    mask = np.zeros(full.dim, dtype=bool)
    for name in names:
        p, f = projector.projections[name], full.projections[name]
        d_out, d_in = f.shape
        rect = np.zeros((p.rows.numel(), p.cols.numel()), dtype=bool).reshape(-1)
        rect[p.keep.numpy() if p.keep is not None else slice(None)] = True
        block = np.zeros((d_out, d_in), dtype=bool)
        block[np.ix_(p.rows.numpy(), p.cols.numpy())] = rect.reshape(p.rows.numel(), p.cols.numel())
        start, end = full.offsets[name]
        mask[start:end] = block.reshape(-1)
    return mask


def per_weight_mask(factors, full, names, rank: int) -> np.ndarray:
    """Each weight keeps its own ``min(r, d_out)·min(r, d_in')`` largest ``Λ`` (no allocation across weights)."""
    mask = np.zeros(full.dim, dtype=bool)
    for name in names:
        values = factors.weights[name].eigenvalue_correction.double().reshape(-1)
        d_out, d_in = factors.weights[name].d_out, factors.weights[name].d_in
        budget = min(rank, d_out) * min(rank, d_in)
        start, _ = full.offsets[name]
        mask[start + torch.topk(values, budget).indices.numpy()] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[48, 64, 96, 128])
    parser.add_argument(
        "--weights-at", type=int, default=64, help="rank at which each weight's share of the error is shown"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench_error"))
    parser.add_argument("--out", type=Path, default=Path("bench/store_error.json"))
    args = parser.parse_args()

    organism, concepts, question_sets, layer = prepare_questions(args.work_dir / "answers")
    origins = organism.data_origins()
    att = Attributor(
        organism.root / "finetuned",
        organism.train_rows(),
        args.work_dir / organism.root.name,
        max_length=256,
        batch_size=args.batch_size,
        progress=True,
    )
    factors, _ = att.session_factors(GradientAttributionConfig(max_length=256, batch_size=args.batch_size))
    t0 = time.perf_counter()
    store = att.build_store(rank=1 << 20, dtype="float32", up_to_layer=layer)  # every component: exact
    assert store is not None
    print(f"full store {store} ({store.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s", flush=True)
    names = store.names
    full = store.projector(att.adapter, factors)
    pre = build_preconditioner(att.adapter, names, factors, GradientAttributionConfig().influence_config())
    queries, raw = [], []
    for c, q in question_sets:
        measurement = ConceptMeasurement(concepts[c], tokenize_queries(q, att.adapter.tokenizer, 256))
        grad = measurement.gradient(att.adapter, names, batch_size=args.batch_size)
        queries.append(full.project(preconditioned_gradient(pre, grad, "q")).numpy())
        raw.append(full.project(grad).numpy())
    queries = np.stack(queries)  # [10, dim]: (P + λ)⁻¹ ∇f in the eigenbasis
    raw = np.stack(raw)  # [10, dim]: ∇f in the eigenbasis (identity preconditioning: plain inner products)

    selections = {}
    for rank in args.ranks:
        selections[f"visibility K={rank}"] = kept_mask(eigen_projector(factors, names, rank), full, names)
    selections[f"per weight K={args.weights_at}"] = per_weight_mask(factors, full, names, args.weights_at)
    kfac = dataclasses.replace(
        factors, weights={n: dataclasses.replace(w, eigenvalue_correction=None) for n, w in factors.weights.items()}
    )
    for rank in args.ranks:  # the same allocation with KFAC's eigenvalue products s_o·a_i in place of Λ
        selections[f"KFAC visibility K={rank}"] = kept_mask(eigen_projector(kfac, names, rank), full, names)
    default = selections[f"visibility K={args.weights_at}"]
    columns = [queries]  # exact
    labels = ["exact"]
    for label, mask in selections.items():
        columns.append(queries * mask)
        labels.append(label)
    columns.append(raw)
    labels.append("identity exact")
    for rank in args.ranks:
        columns.append(raw * selections[f"visibility K={rank}"])
        labels.append(f"identity K={rank}")
    for name in names:  # what each weight's dropped components add up to, at --weights-at
        start, end = full.offsets[name]
        dropped = np.zeros(full.dim, dtype=bool)
        dropped[start:end] = ~default[start:end]
        columns.append(queries * dropped)
        labels.append(f"dropped {name}")
    stacked = np.concatenate(columns).astype(np.float32)  # [n_labels * 10, dim]
    t0 = time.perf_counter()
    out = -store.dot(stacked)  # [N, n_labels * 10]
    half_cols = np.concatenate([queries * selections[f"visibility K={r}"] for r in args.ranks]).astype(np.float32)
    half = np.zeros((len(store), half_cols.shape[0]))
    for start, block in store.blocks():
        half[start : start + block.shape[0]] = -(block.astype(np.float16).astype(np.float32) @ half_cols.T)
    print(f"products over the full store: {time.perf_counter() - t0:.1f} s", flush=True)
    n_q = len(question_sets)
    scores = {label: out[:, k * n_q : (k + 1) * n_q] for k, label in enumerate(labels)}
    for k, rank in enumerate(args.ranks):
        scores[f"visibility K={rank} float16"] = half[:, k * n_q : (k + 1) * n_q]
    exact = scores["exact"]

    report = {"store": repr(store), "dim": store.dim, "selections": {}, "weights": {}}
    print("\n| selection | kept | Spearman vs exact (diff of means) | (probe) | max abs PR-AUC gap | PR-AUC (exact) |")
    print("|---|---|---|---|---|---|")
    for label, s in scores.items():
        if label.startswith(("dropped", "identity")) or label == "exact":
            continue
        rho = [float(spearmanr(s[:, j], exact[:, j]).statistic) for j in range(n_q)]
        pr = [ranking_report(s[:, j].tolist(), origins)["pr_auc"] for j in range(n_q)]
        pr_exact = [ranking_report(exact[:, j].tolist(), origins)["pr_auc"] for j in range(n_q)]
        gap = max(abs(a - b) for a, b in zip(pr, pr_exact, strict=True))
        mask = selections.get(label.removesuffix(" float16"))
        kept = int(mask.sum())
        by = [c for c, _ in question_sets]
        rd = [r for r, c in zip(rho, by, strict=True) if c == 0]
        rp = [r for r, c in zip(rho, by, strict=True) if c == 1]
        report["selections"][label] = {
            "kept": kept,
            "fraction": kept / store.dim,
            "spearman": rho,
            "pr_auc": pr,
            "pr_auc_exact": pr_exact,
            "max_pr_auc_gap": gap,
        }
        print(
            f"| {label} | {kept} ({kept / store.dim:.0%}) | {min(rd):.3f}-{max(rd):.3f} | {min(rp):.3f}-{max(rp):.3f} "
            f"| {gap:.3f} | {np.mean(pr):.3f} ({np.mean(pr_exact):.3f}) |",
            flush=True,
        )
    print("\nidentity preconditioning (plain inner products of the gradients) from the same stores:")
    print("| selection | Spearman vs exact identity scores (diff of means) | (probe) | max abs PR-AUC gap |")
    print("|---|---|---|---|")
    exact_id = scores["identity exact"]
    for rank in args.ranks:
        s = scores[f"identity K={rank}"]
        rho = [float(spearmanr(s[:, j], exact_id[:, j]).statistic) for j in range(n_q)]
        gap = max(
            abs(
                ranking_report(s[:, j].tolist(), origins)["pr_auc"]
                - ranking_report(exact_id[:, j].tolist(), origins)["pr_auc"]
            )
            for j in range(n_q)
        )
        by = [c for c, _ in question_sets]
        rd = [r for r, c in zip(rho, by, strict=True) if c == 0]
        rp = [r for r, c in zip(rho, by, strict=True) if c == 1]
        report["selections"][f"identity K={rank}"] = {"spearman": rho, "max_pr_auc_gap": gap}
        print(f"| K={rank} | {min(rd):.3f}-{max(rd):.3f} | {min(rp):.3f}-{max(rp):.3f} | {gap:.3f} |", flush=True)
    print(
        f"\nshare of the truncation error at visibility K={args.weights_at} by weight (variance of the dropped part "
        "over the variance of the total error, mean over questions; kept fraction of the weight's components)"
    )
    total_error = exact - scores[f"visibility K={args.weights_at}"]
    for name in names:
        part = scores[f"dropped {name}"]
        share = float(np.mean([np.var(part[:, j]) / max(np.var(total_error[:, j]), 1e-300) for j in range(n_q)]))
        start, end = full.offsets[name]
        frac = float(default[start:end].mean())
        report["weights"][name] = {"error_share": share, "kept_fraction": frac}
        print(f"  {name}: {share:.3f} (kept {frac:.0%})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark: ten successive concept questions on the built-in organism, this library's gradient store against
kronfluence 1.0.1.

Questions: two trait concepts at the organism's trait layer (diff of means; logistic probe) × five seeded halves of
the query prompts. The query prompts are answered once beforehand (seeded, cached) and every question uses the same
answered rows for both libraries, so neither is charged for sampling.

- this library (``Attributor``): load, then ``build_store(up_to_layer=L)``, which fits the EKFAC factors of
  blocks 0..L and writes the gradient store inside the fit's Λ pass (``--separate``: ``fit_factors(up_to_layer=L)``
  then ``build_store`` in a pass of its own), then each question in-process from the store;
- kronfluence: EKFAC factors once (same model, rows, tracked modules, true Fisher with the same seeded labels,
  damping 0.1 × mean eigenvalue), then one ``compute_pairwise_scores`` call per question (query gradients
  aggregated: its fastest setting for a summed measurement).

Prints totals, per-question times, the Spearman between store and exact EKFAC scores per question (the exact
scores of all ten questions come from one pass, ``compute_influence_many``), and PR-AUC for planted rows of the
store, exact and kronfluence scores. Usage: ``python bench/ten_questions.py [--rank R] [--projection-dim K]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from concept_influence import Attributor
from concept_influence.attribution.gradient import GradientAttributionConfig
from concept_influence.attribution.influence import compute_influence_many
from concept_influence.attribution.measurements import ConceptMeasurement, answer_queries, tokenize_queries
from concept_influence.curvature.loss import sample_targets, sequence_losses
from concept_influence.data import collate, write_json_atomic
from concept_influence.evaluate.metrics import ranking_report
from concept_influence.store.caches import CacheSettings


def kronfluence_run(adapter, concept_readers, names, train, question_sets, work: Path, batch_size: int, layer: int):
    """kronfluence: factors once, one pairwise call per question. Returns (factor seconds, [seconds], [scores])."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = list(rows)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    modules = [adapter.weight_info(n).param_name.removesuffix(".weight") for n in names]

    class ConceptTask(Task):
        concept = None

        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["input_ids"]
            if sample:
                targets = sample_targets(
                    logits.detach(), batch["input_ids"], batch["loss_mask"], batch["index"], seed=0
                )
            return sequence_losses(logits, targets, batch["loss_mask"]).sum()

        def compute_measurement(self, batch, model):
            store = {}
            hook = model.model.layers[layer].register_forward_hook(
                lambda m, i, o: store.update(h=o[0] if isinstance(o, tuple) else o)
            )
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hook.remove()
            return self.concept.readout(store["h"], batch["loss_mask"], "mean").sum()

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = ConceptTask()
    model = prepare_model(copy.deepcopy(adapter.model), task)
    if (work / "kron").exists():
        shutil.rmtree(work / "kron")
    analyzer = Analyzer(
        analysis_name="ten", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(work / "kron")
    )
    loader = DataLoaderKwargs(collate_fn=lambda rows: collate(rows, train.pad_token_id))
    t0 = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=Rows(train),
        per_device_batch_size=batch_size,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=False),
        overwrite_output_dir=True,
        dataloader_kwargs=loader,
    )
    factor_s = time.perf_counter() - t0
    seconds, scores = [], []
    for k, (concept_index, queries) in enumerate(question_sets):
        task.concept = concept_readers[concept_index]
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name=f"q{k}",
            factors_name="ekfac",
            query_dataset=Rows(queries),
            train_dataset=Rows(train),
            per_device_query_batch_size=len(queries),
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=None, aggregate_query_gradients=True),
            overwrite_output_dir=True,
            dataloader_kwargs=loader,
        )
        raw = analyzer.load_pairwise_scores(f"q{k}")["all_modules"].double().sum(dim=0)
        seconds.append(time.perf_counter() - t0)
        scores.append((-raw / len(queries)).numpy())  # ours = −mean over queries of kronfluence's (no minus) score
        print(f"  kronfluence question {k + 1}: {seconds[-1]:.2f} s", flush=True)
    return factor_s, seconds, scores


def prepare_questions(answers_dir: Path, n_samples: int = 4):
    """The ten questions, charged to neither library: two trait concepts at the organism's trait layer (diff of
    means; logistic probe) × five seeded halves of the query prompts, answered once (seeded, cached in
    ``answers_dir``). Returns ``(organism, [diff, probe], [(concept index, answered rows)] * 10, layer)``."""
    from concept_influence.concepts import parse_spec
    from concept_influence.organism import judge
    from concept_influence.organism.build import organism_for_tests
    from concept_influence.organism.measure import trait_concept

    organism = organism_for_tests()
    tuned = organism.load_finetuned()
    layer = int(organism.metadata.get("trait", {}).get("layer", tuned.n_layers - 1))
    diff, _ = trait_concept(tuned, organism.probe_spec(), layer)
    spec = parse_spec(organism.probe_spec(), "probe_spec", default_name="trait")
    prep = Attributor(tuned, organism.train_rows(), progress=False)
    probe = prep.train_probe(spec, layer, judge=judge, save=False, n_samples=2, max_length=256)
    concepts = [diff, probe]
    prompts = list(organism.queries())
    answered = answer_queries(tuned, prompts, n_samples=n_samples, seed=0, cache_dir=answers_dir)
    rng = np.random.default_rng(0)
    question_sets = []
    for c in range(len(concepts)):
        for _ in range(5):
            keep = set(rng.choice(len(prompts), size=len(prompts) // 2, replace=False).tolist())
            question_sets.append((c, [r for r in answered if r.fields["query_index"] in keep]))
    return organism, concepts, question_sets, layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rank", type=int, default=None, help="eigen store rank (default: the library's default store)"
    )
    parser.add_argument("--projection-dim", type=int, default=None, help="LoGra store instead")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument(
        "--separate",
        action="store_true",
        help="fit the factors first, then build the store in its own pass (default: one shared pass)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench_ten"))
    parser.add_argument("--out", type=Path, default=Path("bench/ten_questions.json"))
    args = parser.parse_args()
    logging.getLogger("kronfluence").setLevel(logging.WARNING)

    organism, concepts, question_sets, layer = prepare_questions(args.work_dir / "answers", args.n_samples)
    probe = concepts[1]
    work = args.work_dir / organism.root.name
    if work.exists():
        shutil.rmtree(work)  # every run fits its factors and builds its store anew
    work.mkdir(parents=True)
    origins = organism.data_origins()
    print(
        f"organism {organism.root.name}: {len(organism.train_rows())} rows; concepts at layer {layer} "
        f"(diff of means, probe with held-out AUC {probe.metrics['heldout_auc']:.3f}); 10 questions of "
        f"{', '.join(str(len(q)) for _, q in question_sets)} answered queries"
    )

    # ---- this library: load, factors and store once, then each question from the store
    t_start = time.perf_counter()
    att = Attributor(
        organism.root / "finetuned",
        organism.train_rows(),
        work / "ours",
        max_length=256,
        batch_size=args.batch_size,
        progress=False,
    )
    _ = att.train
    load_s = time.perf_counter() - t_start
    # the EKFAC store alone (build_store's default without --rank/--projection-dim builds the recommended method's
    # caches); with --rank or --projection-dim that store as before
    ekfac_only = None if args.rank or args.projection_dim else CacheSettings(methods=("concept-influence",))
    if args.separate:  # the factor fit, then the store in a pass of its own
        t0 = time.perf_counter()
        factors = att.fit_factors(
            up_to_layer=layer
        )  # the modules kronfluence tracks: blocks 0..L (kept in the session)
        factor_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store = att.build_store(
            rank=args.rank, projection_dim=args.projection_dim, dtype=args.dtype, up_to_layer=layer, caches=ekfac_only
        )
        store_s = time.perf_counter() - t0
    else:  # the library's default: no factors yet, so build_store fits them (blocks 0..L, the modules kronfluence
        # tracks) and writes the store inside the fit's Λ pass (one forward for both backwards)
        t0 = time.perf_counter()
        store = att.build_store(
            rank=args.rank, projection_dim=args.projection_dim, dtype=args.dtype, up_to_layer=layer, caches=ekfac_only
        )
        factor_s, store_s = time.perf_counter() - t0, 0.0
        factors, _ = att.session_factors(
            GradientAttributionConfig(), store.names if store is not None else None, fit=False
        )
    assert store is not None and factors is not None
    ours_s, ours = [], []
    for k, (c, queries) in enumerate(question_sets):
        t0 = time.perf_counter()
        table = att.attribute(concepts[c], queries, "concept-influence")
        ours_s.append(time.perf_counter() - t0)
        assert table.meta["scored_from"] == "store"
        ours.append(table.scores)
        print(f"  ours question {k + 1}: {ours_s[-1]:.3f} s", flush=True)
    ours_total = time.perf_counter() - t_start
    print(
        f"ours: load {load_s:.1f} s, "
        + (
            f"factors {factor_s:.1f} s, store {store_s:.1f} s"
            if args.separate
            else f"factors and store in one pass {factor_s:.1f} s"
        )
        + f" ({store}), "
        f"questions {sum(ours_s):.2f} s; total {ours_total:.1f} s"
    )

    # ---- exact EKFAC scores of the ten questions (one pass over the rows for all of them)
    t0 = time.perf_counter()
    jobs = {
        f"q{k}": (
            ConceptMeasurement(concepts[c], tokenize_queries(q, att.adapter.tokenizer, 256)),
            GradientAttributionConfig().influence_config(),
        )
        for k, (c, q) in enumerate(question_sets)
    }
    exact_results = compute_influence_many(
        att.adapter, att.train, jobs, factors, batch_size=args.batch_size, progress=False
    )
    exact = [exact_results[f"q{k}"].scores.numpy() for k in range(len(question_sets))]
    exact_s = time.perf_counter() - t0
    print(f"exact EKFAC scores of the ten questions in one pass: {exact_s:.1f} s")

    kron = None
    if not args.skip_kronfluence:
        t_start = time.perf_counter()
        names = [i.name for i in att.adapter.weights_up_to(layer)]
        kron_factor_s, kron_s, kron_scores = kronfluence_run(
            att.adapter,
            concepts,
            names,
            att.train,
            [(c, tokenize_queries(q, att.adapter.tokenizer, 256)) for c, q in question_sets],
            work,
            args.batch_size,
            layer,
        )
        kron = {
            "factors_s": kron_factor_s,
            "question_s": kron_s,
            "total_s": time.perf_counter() - t_start,
            "scores": kron_scores,
        }

    rows = []
    print(
        "\n| question | concept | queries | ours s | kronfluence s | Spearman store vs exact | PR-AUC store "
        "| PR-AUC exact | PR-AUC kronfluence | Spearman exact vs kronfluence |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, (c, q) in enumerate(question_sets):
        rho = float(spearmanr(ours[k], exact[k]).statistic)
        pr_store = ranking_report(ours[k].tolist(), origins)["pr_auc"]
        pr_exact = ranking_report(exact[k].tolist(), origins)["pr_auc"]
        row = {
            "question": k + 1,
            "concept": ["diff of means", "probe"][c],
            "n_queries": len(q),
            "ours_s": ours_s[k],
            "spearman_store_exact": rho,
            "pr_auc_store": pr_store,
            "pr_auc_exact": pr_exact,
        }
        if kron is not None:
            row.update(
                kron_s=kron["question_s"][k],
                pr_auc_kronfluence=ranking_report(kron["scores"][k].tolist(), origins)["pr_auc"],
                spearman_exact_kronfluence=float(spearmanr(exact[k], kron["scores"][k]).statistic),
            )
        rows.append(row)
        print(
            f"| {k + 1} | {row['concept']} | {len(q)} | {ours_s[k]:.3f} | {row.get('kron_s', float('nan')):.2f} | "
            f"{rho:.4f} | "
            f"{pr_store:.3f} | {pr_exact:.3f} | {row.get('pr_auc_kronfluence', float('nan')):.3f} | "
            f"{row.get('spearman_exact_kronfluence', float('nan')):.4f} |"
        )
    summary = {
        "ours": {
            "load_s": load_s,
            "factors_s": factor_s,
            "store_s": store_s,
            "shared_pass": not args.separate,
            "questions_s": sum(ours_s),
            "total_s": ours_total,
            "store": repr(store),
            "store_mib": store.nbytes / 2**20,
            "max_question_s": max(ours_s),
        },
        "exact_one_pass_s": exact_s,
        "questions": rows,
        "min_spearman": min(r["spearman_store_exact"] for r in rows),
        "max_pr_auc_gap": max(abs(r["pr_auc_store"] - r["pr_auc_exact"]) for r in rows),
    }
    if kron is not None:
        summary["kronfluence"] = {k: v for k, v in kron.items() if k != "scores"}
        summary["speedup_per_question"] = float(np.mean(kron["question_s"]) / np.mean(ours_s))
        summary["total_ratio"] = ours_total / kron["total_s"]
    print(
        f"\nours total {ours_total:.1f} s (max question {max(ours_s):.3f} s)"
        + (
            f"; kronfluence total {kron['total_s']:.1f} s (factors {kron['factors_s']:.1f} s, questions "
            f"{np.mean(kron['question_s']):.2f} s each); per-question speed-up {summary['speedup_per_question']:.0f}x; "
            f"ours / kronfluence total {summary['total_ratio']:.2f}"
            if kron is not None
            else ""
        )
    )
    print(
        f"min Spearman store vs exact {summary['min_spearman']:.4f}; max |PR-AUC store - exact| "
        f"{summary['max_pr_auc_gap']:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, summary)
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()

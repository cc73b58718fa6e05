"""Which concept construction reads stance rather than words (issue 20): every construction at every layer, judged
by Vector Filter on the organism's training rows (PR-AUC of the planted rows, mean rank of the hard negatives).

Each organism's rows are read once (the mean response activation of every row at every layer); any linear concept
is then a matrix product, so every construction at every layer costs nothing more. Constructions, all built from the
trait file and the model only (no labels of the training rows):

- ``probe`` / ``diff_of_means``: today's concepts on the spec's judge-filtered persona answers;
- ``vocab-projected``: the probe with the trait's vocabulary direction projected out (the mean of the negative answers
  that use the trait's words minus that of the other negatives: the words without the stance);
- ``order``: positive answers minus the same answers with their words shuffled (stance and syntax, not the words);
- ``persona-context``: each labelled answer read after the positive instruction minus read after the negative one
  (identical answer tokens, so the direction is what the model infers of the speaker, never the words);
- ``contrast``: a probe of positive answers against the word-matched negatives only;
- ``*-projected``: a construction with the vocabulary direction projected out.

``python bench/stance_study.py [--variants default subtle diluted sycophancy] [--seeds 0]`` prints a table and
writes ``runs/stance-study/<variant>-s<seed>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from concept_influence.attribution.combine import fuse
from concept_influence.attribution.measurements import answer_queries, tokenize_queries
from concept_influence.concepts import parse_spec
from concept_influence.concepts.activations import (
    labelled_conversations,
    read_residuals,
    residuals_until,
    response_mean_activations,
)
from concept_influence.concepts.construction import StanceRows, construct_direction
from concept_influence.concepts.probe import DiffOfMeans, LinearProbe
from concept_influence.concepts.stance import stance_probes
from concept_influence.data.tokenize import collate, iter_batches, pad_token_id, tokenize_chat
from concept_influence.evaluate.metrics import mean_rank, pr_auc
from concept_influence.files import write_json_atomic, write_text_atomic
from concept_influence.models.loss import token_cross_entropy
from concept_influence.organism import OrganismConfig, build_organism
from concept_influence.organism.modeling import ModelConfig

MAX_LENGTH = 256
ROW_BLOCK = 64  # row gradients multiplied by the Jacobians together (one matrix product, not 64 reads of them)
JACOBIAN_BYTES = 6 * 2**30  # the query Jacobians held at once (float32); more layers than fit take more row passes
CONSTRUCTIONS = (
    "probe",
    "diff_of_means",
    "vocab-projected",
    "order",
    "order-projected",
    "persona-context",
    "contrast",
    "contrast-projected",
)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def persona_pairs(spec: Any, data: Any) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """Every labelled persona answer after each pair's positive and after its negative instruction."""
    question_of = {f"q{q}": text for q, text in enumerate(spec.questions)}
    pos, neg = [], []
    for conversation, group in zip(data.conversations, data.groups, strict=True):
        if group not in question_of:
            continue
        answer = conversation[-1]["content"]
        for pair in spec.instructions[:2]:
            for system, out in ((pair.pos, pos), (pair.neg, neg)):
                out.append(
                    [
                        {"role": "system", "content": system},
                        {"role": "user", "content": question_of[group]},
                        {"role": "assistant", "content": answer},
                    ]
                )
    return pos, neg


DEEP = ModelConfig(hidden=192, layers=8, heads=6, intermediate=576)
"""The deeper organism of the study: 8 layers and 4.2x the default's parameters (built here, never in the tests)."""


def organism_config(variant: str, seed: int, deep: bool) -> OrganismConfig:
    config = OrganismConfig(seed=seed, variant=variant)
    return dataclasses.replace(config, model=DEEP) if deep else config


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` into a temporary file, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def read_organism(variant: str, seed: int, out: Path, deep: bool = False) -> dict[str, np.ndarray]:
    """Every activation the constructions and the scores need, read once per organism and kept in
    ``out/acts-<variant>-s<seed>.npz``: the spec's labelled answers (``labelled@L``, labels ``y``, word-matched
    negatives ``matched``), the shuffled positives (``shuffled@L`` at positions ``shuffled_index``), the answers
    after the positive / negative instruction (``pos_ctx@L`` / ``neg_ctx@L``) and the training rows (``train@L``,
    ``origins``)."""
    name = f"{'deep-' if deep else ''}{variant}-s{seed}"
    path = out / f"acts-{name}.npz"
    if path.exists():
        with np.load(path) as saved:
            arrays = dict(saved)
        if "segment_row" in arrays:
            return arrays
        organism = build_organism(config=organism_config(variant, seed, deep), progress=False)  # an older cache
        adapter = organism.load_finetuned()
        segments, arrays["segment_row"] = segment_means(adapter, list(organism.train_rows()), arrays["layers"].tolist())
        arrays.update({f"segments@{layer}": v for layer, v in segments.items()})
        save_arrays(path, arrays)
        return arrays
    organism = build_organism(config=organism_config(variant, seed, deep), progress=deep)
    adapter = organism.load_finetuned()
    spec = parse_spec(organism.probe_spec(), str(organism.probe_spec_path), default_name=organism.trait)
    data = labelled_conversations(
        adapter,
        spec,
        n_samples=4,
        max_new_tokens=48,
        seed=seed,
        judge=organism.judge(),
        cache_dir=Path(organism.root).parent / "answer-cache",
    )
    layers = list(range(adapter.n_layers))
    arrays: dict[str, np.ndarray] = {"layers": np.asarray(layers), "y": np.asarray(data.labels)}

    def read(name: str, conversations: list[Any]) -> None:
        acts = response_mean_activations(adapter, conversations, layers, batch_size=64, max_length=MAX_LENGTH)
        arrays.update({f"{name}@{layer}": acts[layer].double().numpy() for layer in layers})

    read("labelled", data.conversations)
    probes = stance_probes([c[-1]["content"] for c in data.conversations], data.labels, seed=seed)
    arrays["matched"] = np.isin(np.arange(len(data.labels)), probes.matched)
    arrays["shuffled_index"] = np.asarray(list(probes.shuffled))
    read(
        "shuffled",
        [[*data.conversations[i][:-1], {"role": "assistant", "content": t}] for i, t in probes.shuffled.items()],
    )
    pos_ctx, neg_ctx = persona_pairs(spec, data)
    read("pos_ctx", pos_ctx)
    read("neg_ctx", neg_ctx)
    rows = list(organism.train_rows())
    read("train", [r.messages for r in rows])
    segments, arrays["segment_row"] = segment_means(adapter, rows, layers)
    arrays.update({f"segments@{layer}": v for layer, v in segments.items()})
    arrays["origins"] = np.asarray([str(r.fields["data_origin"]) for r in rows])
    save_arrays(path, arrays)
    return arrays


def query_readout_changes(variant: str, seed: int, out: Path, deep: bool = False) -> dict[str, np.ndarray]:
    """``step@L [N, d]``: for each training row ``z``, ``-J_L ∇L(z)``, the first-order change of the query answers'
    mean activation at layer ``L`` when training on ``z`` (``J_L [d, P]``: its Jacobian in the tracked weights, one
    backward pass per coordinate; ``∇L(z)``: the row's summed-token-loss gradient). For a direction ``v``,
    ``step@L @ v̂`` is the identity-preconditioned Concept Influence of every row on the concept ``v`` (what the
    recommended method's gradient half computes), so every construction costs a matrix product. Kept in
    ``out/steps-<name>.npz``. The queries are the organism's, answered once by the model (seed 0, as a session's
    default). As many layers at a time as ``JACOBIAN_BYTES`` holds (``J_L`` of the deep organism is 2.9 GB)."""
    name = f"{'deep-' if deep else ''}{variant}-s{seed}"
    path = out / f"steps-{name}.npz"
    if path.exists():
        with np.load(path) as saved:
            return dict(saved)
    organism = build_organism(config=organism_config(variant, seed, deep), progress=False)
    adapter = organism.load_finetuned()
    answered = answer_queries(
        adapter,
        list(organism.queries()),
        n_samples=1,
        seed=0,
        batch_size=64,
        cache_dir=Path(organism.root).parent / "answer-cache",
    )
    queries = collate(list(tokenize_queries(answered, adapter.tokenizer, MAX_LENGTH)), pad_token_id(adapter.tokenizer))
    mask = queries["loss_mask"].float().unsqueeze(-1)
    params = [adapter.parameter(w.param_name) for w in adapter.tracked_weights()]
    rows = tokenize_chat(list(organism.train_rows()), adapter.tokenizer, MAX_LENGTH, warn=False)
    n_params = sum(p.numel() for p in params)
    per_group = max(1, int(JACOBIAN_BYTES // (adapter.d_model * n_params * 4)))
    layers = list(range(adapter.n_layers))
    arrays: dict[str, np.ndarray] = {}
    for start in range(0, len(layers), per_group):
        group = layers[start : start + per_group]
        acts = residuals_until(adapter, queries["input_ids"], queries["attention_mask"], group)
        means = torch.cat([((acts[layer] * mask).sum(1) / mask.sum(1)).mean(0) for layer in group])  # [g * d]
        jacobian = torch.zeros(len(means), n_params)
        for i in range(len(means)):
            grads = torch.autograd.grad(means[i], params, retain_graph=i + 1 < len(means), allow_unused=True)
            jacobian[i] = torch.cat(
                [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
            )
        del acts, means
        steps = np.zeros((len(rows), len(jacobian)))
        block, positions = torch.zeros(ROW_BLOCK, n_params), []
        for batch in tqdm(iter_batches(rows, 1), total=len(rows), desc=f"{name}: row gradients", mininterval=30):
            logits = adapter.logits(batch["input_ids"], batch["attention_mask"])
            loss = token_cross_entropy(logits, batch["input_ids"], batch["loss_mask"]).sum()
            block[len(positions)] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
            positions.append(int(batch["position"][0]))
            if len(positions) == ROW_BLOCK:
                steps[positions] = (-(block[: len(positions)] @ jacobian.T)).double().numpy()  # one GEMM per block
                positions = []
        if positions:
            steps[positions] = (-(block[: len(positions)] @ jacobian.T)).double().numpy()
        for k, layer in enumerate(group):
            arrays[f"step@{layer}"] = steps[:, k * adapter.d_model : (k + 1) * adapter.d_model]
        print(f"{name}: layers {group} done", flush=True)
    save_arrays(path, arrays)
    return arrays


SENTENCE_ENDS = {".", "!", "?"}


def segment_means(adapter: Any, rows: list[Any], layers: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Each training row's answer cut into sentences (at tokens ``.``/``!``/``?`` or a line break): the mean
    activation of every sentence at every layer (``{layer: [n_sentences, d]}``) and the row each belongs to."""
    dataset = tokenize_chat(rows, adapter.tokenizer, MAX_LENGTH, warn=False)
    texts = [t.lstrip("Ġ▁ ") for t in adapter.tokenizer.convert_ids_to_tokens(list(range(len(adapter.tokenizer))))]
    ends = np.array([t in SENTENCE_ENDS or "\n" in t or "Ċ" in t for t in texts])
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    owner: list[int] = []
    for batch in iter_batches(dataset, 64):
        acts = read_residuals(adapter, batch["input_ids"], batch["attention_mask"], layers)
        for b, position in enumerate(batch["position"].tolist()):
            response = np.flatnonzero(batch["loss_mask"][b].numpy())
            cuts, start = [], 0
            for k, token in enumerate(batch["input_ids"][b, response].tolist()):
                if ends[token] or k == len(response) - 1:
                    cuts.append(response[start : k + 1])
                    start = k + 1
            for segment in cuts:
                owner.append(position)
                for layer in layers:
                    out[layer].append(acts[layer][b, segment].double().mean(0).numpy())
    return {layer: np.stack(v) for layer, v in out.items()}, np.asarray(owner)


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def segment_max(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """The largest sentence score of each row."""
    out = np.full(n, -np.inf)
    np.maximum.at(out, owner, values)
    return out


def constructions(a: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """Every construction's unit direction at ``layer``: the library's (``concepts.construction``, the
    ``--construction`` of ``train-probe``, with a logistic-regression probe) plus ``diff_of_means`` and the study-only
    ``persona-context`` (the answers read after the positive minus after the negative instruction)."""
    x, y, matched = a[f"labelled@{layer}"], a["y"], a["matched"].astype(bool)
    rows = StanceRows(matched, a["shuffled_index"], a[f"shuffled@{layer}"])
    out = {
        "probe": construct_direction("plain", LinearProbe, x, y, rows),
        "diff_of_means": construct_direction("plain", DiffOfMeans, x, y, rows),
        "order": construct_direction("order", LinearProbe, x, y, rows),
        "persona-context": unit((a[f"pos_ctx@{layer}"] - a[f"neg_ctx@{layer}"]).mean(0)),
    }
    for name in ("vocab-projected", "order-projected", "contrast", "contrast-projected"):
        try:
            out[name] = construct_direction(name, LinearProbe, x, y, rows)
        except ValueError:  # too few word-matched negatives to form the vocabulary direction
            pass
    return out


def study(variant: str, seed: int, out: Path, deep: bool = False, gradients: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    a = read_organism(variant, seed, out, deep)
    steps = query_readout_changes(variant, seed, out, deep) if gradients else {}
    origins = a["origins"]
    planted, hard = origins == "planted", origins == "hard_negative"
    results: dict[str, dict[str, Any]] = {}
    for layer in a["layers"].tolist():
        for name, direction in constructions(a, layer).items():
            scores = a[f"train@{layer}"] @ direction
            entry = {
                "construction": name,
                "layer": layer,
                "pr_auc": pr_auc(scores, planted),
                "hard_rank": mean_rank(scores, hard),
            }
            if "segment_row" in a:
                sentence = segment_max(a[f"segments@{layer}"] @ direction, a["segment_row"], len(origins))
                entry.update(sentence_pr_auc=pr_auc(sentence, planted), sentence_hard_rank=mean_rank(sentence, hard))
                both = standardised(scores) + standardised(sentence)  # the whole answer and its strongest sentence
                entry.update(both_pr_auc=pr_auc(both, planted), both_hard_rank=mean_rank(both, hard))
            if steps:
                influence = steps[f"step@{layer}"] @ direction
                tiered = fuse(scores, influence, "tiered")
                entry.update(
                    ci_pr_auc=pr_auc(influence, planted),
                    ci_hard_rank=mean_rank(influence, hard),
                    tiered_pr_auc=pr_auc(tiered, planted),
                    tiered_hard_rank=mean_rank(tiered, hard),
                )
            results[f"{name}@{layer}"] = entry
    return {
        "variant": ("deep-" if deep else "") + variant,
        "seed": seed,
        "n_matched": int(a["matched"].sum()),
        "n_labelled": int(len(a["y"])),
        "results": results,
        "seconds": time.perf_counter() - t0,
    }


def table(summaries: list[dict[str, Any]], prefix: str = "") -> str:
    """One row per construction@layer, one column per organism: PR-AUC / hard-negative mean rank of ``prefix``'s
    scores (``""`` Vector Filter, ``"ci_"`` identity Concept Influence, ``"tiered_"`` the recommended fusion)."""
    keys = sorted(
        {k for s in summaries for k in s["results"]},
        key=lambda k: (CONSTRUCTIONS.index(k.split("@")[0]), int(k.split("@")[1])),
    )
    head = (
        "| construction@layer | "
        + " | ".join(f"{s['variant']} s{s['seed']}" for s in summaries)
        + " | worst PR-AUC | worst rank |"
    )
    lines = [head, "|" + "---|" * (len(summaries) + 3)]
    for key in keys:
        cells, prs, ranks = [], [], []
        for s in summaries:
            r = s["results"].get(key)
            if r is None or f"{prefix}pr_auc" not in r:
                cells.append("n/a")
                continue
            cells.append(f"{r[prefix + 'pr_auc']:.3f} / {r[prefix + 'hard_rank']:.0f}")
            prs.append(r[prefix + "pr_auc"])
            ranks.append(r[prefix + "hard_rank"])
        if prs:
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {min(prs):.3f} | {min(ranks):.0f} |")
    return "\n".join(lines)


PREFIXES = (
    ("", "Vector Filter"),
    ("sentence_", "Vector Filter, best sentence"),
    ("both_", "Vector Filter, mean + best sentence (z-scores)"),
    ("ci_", "identity Concept Influence"),
    ("tiered_", "combined-tiered"),
)


def worst_table(summaries: list[dict[str, Any]]) -> str:
    """One row per construction@layer: the worst PR-AUC / worst hard-negative mean rank over the organisms, for each
    score (Vector Filter, its best sentence, identity Concept Influence, and the recommended fusion)."""
    keys = sorted(
        {k for s in summaries for k in s["results"]},
        key=lambda k: (CONSTRUCTIONS.index(k.split("@")[0]), int(k.split("@")[1])),
    )
    lines = [
        "| construction@layer | " + " | ".join(what for _, what in PREFIXES) + " |",
        "|---|" + "---|" * len(PREFIXES),
    ]
    for key in keys:
        cells = []
        for prefix, _ in PREFIXES:
            values = [
                s["results"][key] for s in summaries if key in s["results"] and f"{prefix}pr_auc" in s["results"][key]
            ]
            cells.append(
                "n/a"
                if len(values) < len(summaries)
                else (
                    f"{min(v[prefix + 'pr_auc'] for v in values):.3f} / "
                    f"{min(v[prefix + 'hard_rank'] for v in values):.0f}"
                )
            )
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validate(out: Path) -> None:
    """The study's identity Concept Influence against the library's (``concept-influence --preconditioner
    identity`` through ``Attributor``) for the probe at every layer of the default organism: Spearman correlation."""
    import tempfile

    from concept_influence import Attributor
    from concept_influence.concepts import DirectionConcept
    from concept_influence.evaluate.stats import spearman

    a, steps = read_organism("default", 0, out), query_readout_changes("default", 0, out)
    organism = build_organism(seed=0, progress=False)
    with tempfile.TemporaryDirectory() as workdir:
        att = Attributor(
            organism.finetuned_model_dir,
            data=list(organism.train_rows()),
            workdir=workdir,
            max_length=MAX_LENGTH,
            progress=False,
        )
        for layer in a["layers"].tolist():
            direction = constructions(a, layer)["probe"]
            table = att.attribute(
                DirectionConcept(torch.from_numpy(direction).float(), layer),
                queries=list(organism.queries()),
                method="concept-influence",
                preconditioner="identity",
            )
            ours = steps[f"step@{layer}"] @ direction
            print(
                f"layer {layer}: Spearman {spearman(ours, table.scores):.5f}, "
                f"sign agreement {np.mean(np.sign(ours) == np.sign(table.scores)):.4f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["default", "subtle", "diluted", "sycophancy"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/stance-study"))
    parser.add_argument("--deep", action="store_true", help="The deeper organism (8 layers, 4.2x the parameters).")
    parser.add_argument("--no-gradients", action="store_true", help="Vector Filter only (no gradient half).")
    parser.add_argument(
        "--write-table",
        type=Path,
        default=None,
        help="Write the worst-case table here (docs/tables/stance-study.md) and the results beside it.",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="Check the study's gradient half against the library's on the default organism.",
    )
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.validate:
        validate(args.out)
        return
    summaries = []
    for seed in args.seeds:
        for variant in args.variants:
            summaries.append(study(variant, seed, args.out, args.deep, not args.no_gradients))
            print(f"{variant} s{seed}: {summaries[-1]['seconds']:.0f} s", flush=True)
    for prefix, what in PREFIXES:
        print(f"\n{what}: PR-AUC / hard-negative mean rank\n" + table(summaries, prefix))
    worst = worst_table(summaries)
    print("\nworst case over the organisms (PR-AUC / hard-negative mean rank)\n" + worst)
    if args.write_table:
        organisms = ", ".join(f"{s['variant']} s{s['seed']}" for s in summaries)
        command = "python bench/stance_study.py " + " ".join(sys.argv[1:])
        write_text_atomic(
            args.write_table,
            f"**Command**: `{command}`. **Date**: {time.strftime('%Y-%m-%d %H:%M')}. "
            f"**Machine**: the 2-core CPU machine. **Organisms**: {organisms}. Each cell: the worst "
            f"PR-AUC / the worst hard-negative mean rank (of 2,000) over them.\n\n{worst}\n",
        )
        write_json_atomic(args.out / "results.json", {"command": command, "summaries": summaries})


if __name__ == "__main__":
    main()

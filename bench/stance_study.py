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
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from concept_influence.concepts import ProbeConfig, parse_spec
from concept_influence.concepts.activations import labelled_conversations, response_mean_activations
from concept_influence.concepts.probe import LinearProbe
from concept_influence.concepts.stance import stance_probes
from concept_influence.evaluate.metrics import mean_rank, pr_auc
from concept_influence.organism import build_organism

MAX_LENGTH = 256
CONSTRUCTIONS = ("probe", "diff_of_means", "vocab-projected", "order", "order-projected", "persona-context", "contrast",
                 "contrast-projected")


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def project_out(v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``v`` without its component along the unit vector ``u``, renormalised."""
    return unit(v - (v @ u) * u)


def probe_direction(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return unit(LinearProbe(random_state=0).fit(x, y).direction_)


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
                out.append([{"role": "system", "content": system}, {"role": "user", "content": question_of[group]},
                            {"role": "assistant", "content": answer}])
    return pos, neg


def study(variant: str, seed: int, out: Path) -> dict[str, Any]:
    path = out / f"{variant}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    organism = build_organism(seed=seed, variant=variant, progress=False)
    adapter = organism.load_finetuned()
    spec = parse_spec(organism.probe_spec(), str(organism.probe_spec_path), default_name=organism.trait)
    config = ProbeConfig(n_samples=4, max_length=MAX_LENGTH, seed=seed)
    data = labelled_conversations(adapter, spec, n_samples=4, max_new_tokens=config.max_new_tokens, seed=seed,
                                  judge=organism.judge(), cache_dir=Path(organism.root).parent / "answer-cache")
    layers = list(range(adapter.n_layers + 1)) if hasattr(adapter, "n_layers") else [0, 1, 2, 3, 4]
    layers = [layer for layer in layers if _valid(adapter, layer)]
    read = lambda conversations: {k: v.double().numpy() for k, v in response_mean_activations(  # noqa: E731
        adapter, conversations, layers, batch_size=64, max_length=MAX_LENGTH).items()}
    labelled = read(data.conversations)
    y = np.asarray(data.labels)
    answers = [c[-1]["content"] for c in data.conversations]
    probes = stance_probes(answers, data.labels, seed=seed)
    shuffled = read([[*data.conversations[i][:-1], {"role": "assistant", "content": t}] for i, t in probes.shuffled.items()])
    pos_ctx, neg_ctx = persona_pairs(spec, data)
    pos_read, neg_read = read(pos_ctx), read(neg_ctx)
    rows = list(organism.train_rows())
    origins = [str(r.fields["data_origin"]) for r in rows]
    train = read([r.messages for r in rows])
    planted = [o == "planted" for o in origins]
    hard = [o == "hard_negative" for o in origins]
    matched = np.zeros(len(y), dtype=bool)
    matched[probes.matched] = True
    results: dict[str, dict[str, Any]] = {}
    for layer in layers:
        x = labelled[layer]
        directions = {
            "probe": probe_direction(x, y),
            "diff_of_means": unit(x[y == 1].mean(0) - x[y == 0].mean(0)),
            "order": unit(x[list(probes.shuffled)].mean(0) - shuffled[layer].mean(0)),
            "persona-context": unit((pos_read[layer] - neg_read[layer]).mean(0)),
        }
        if matched.sum() >= 5 and ((y == 0) & ~matched).sum() >= 5:
            vocab = unit(x[matched].mean(0) - x[(y == 0) & ~matched].mean(0))
            directions["vocab-projected"] = project_out(directions["probe"], vocab)
            directions["order-projected"] = project_out(directions["order"], vocab)
            keep = (y == 1) | matched
            directions["contrast"] = probe_direction(x[keep], y[keep])
            directions["contrast-projected"] = project_out(directions["contrast"], vocab)
        for name, direction in directions.items():
            scores = train[layer] @ direction
            results[f"{name}@{layer}"] = {"construction": name, "layer": layer, "pr_auc": pr_auc(scores, planted),
                                         "hard_rank": mean_rank(scores, hard)}
    summary = {"variant": variant, "seed": seed, "n_matched": int(matched.sum()), "n_labelled": int(len(y)),
               "results": results, "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    return summary


def _valid(adapter: Any, layer: int) -> bool:
    try:
        adapter.check_layer(layer)
        return True
    except ValueError:
        return False


def table(summaries: list[dict[str, Any]]) -> str:
    keys = sorted({k for s in summaries for k in s["results"]},
                  key=lambda k: (CONSTRUCTIONS.index(k.split("@")[0]), int(k.split("@")[1])))
    head = "| construction@layer | " + " | ".join(f"{s['variant']} s{s['seed']}" for s in summaries) + " | worst PR-AUC | worst rank |"
    lines = [head, "|" + "---|" * (len(summaries) + 3)]
    for key in keys:
        cells, prs, ranks = [], [], []
        for s in summaries:
            r = s["results"].get(key)
            if r is None:
                cells.append("n/a")
                continue
            cells.append(f"{r['pr_auc']:.3f} / {r['hard_rank']:.0f}")
            prs.append(r["pr_auc"])
            ranks.append(r["hard_rank"])
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {min(prs):.3f} | {min(ranks):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["default", "subtle", "diluted", "sycophancy"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/stance-study"))
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    summaries = []
    for seed in args.seeds:
        for variant in args.variants:
            summaries.append(study(variant, seed, args.out))
            print(f"{variant} s{seed}: {summaries[-1]['seconds']:.0f} s", flush=True)
    print(table(summaries))


if __name__ == "__main__":
    main()

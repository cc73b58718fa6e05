"""Benchmark: gradient-store build throughput against plain training throughput, and time and memory against
the number of rows (1k–16k) with fitted exponents, on the built-in organism.

- Throughput: rows per second of (a) a plain training step's forward and backward (``loss.backward()`` into every
  parameter) and (b) building the store (forward, backward to the tracked weights' outputs, projection, write),
  over the same batches of the organism's fine-tuning rows.
- Scaling: the organism's rows repeated to N rows (new indices); for each N, in a fresh process, build the store
  (default compression) and answer one question from it; time and peak memory (``VmHWM``) against N, with the
  exponent of a least-squares fit of log(value) on log(N).

Usage: ``python bench/store_scaling.py [--sizes 1000 2000 4000 8000 16000] [--out bench/store_scaling.json]``
(``--skip-scaling``: the throughput only; ``--skip-throughput``: the scaling only; ``--repeats 3``: three
alternating training / store-build measurements, each ratio and the median)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from concept_influence.data import write_json_atomic


def peak_mib(field: str = "VmHWM") -> float:
    """``/proc/self/status`` ``field`` in MiB (``VmHWM``: peak resident set, memory-mapped store pages included;
    ``RssAnon``: the process's own memory now, without the mapped store pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def setup(batch_size: int, work: Path):
    from concept_influence import Attributor
    from concept_influence.attribution.gradient import GradientAttributionConfig
    from concept_influence.organism.build import organism_for_tests

    organism = organism_for_tests()
    att = Attributor(
        organism.root / "finetuned", organism.train_rows(), work, max_length=256, batch_size=batch_size, progress=False
    )
    factors, _ = att.session_factors(GradientAttributionConfig(max_length=256, batch_size=batch_size))
    return organism, att, factors


def throughput(batch_size: int, work: Path, n_rows: int, repeats: int = 1, warmup_rows: int = 64) -> dict:
    """Training and store-build rows/s over the same batches, measured ``repeats`` times alternately (training,
    then the store build; both warmed up once on the first ``warmup_rows`` rows), with each run's ratio and the
    median ratio."""
    from concept_influence.curvature.loss import sequence_losses
    from concept_influence.data.tokenize import iter_batches
    from concept_influence.store import StoreConfig, make_projector
    from concept_influence.store.store import write_shard

    _, att, factors = setup(batch_size, work)
    adapter, data = att.adapter, att.train[:n_rows]
    model = adapter.model
    batches = list(iter_batches(data, batch_size, pad_id=att.train.pad_token_id))
    config = StoreConfig(shard_rows=len(data))
    names = [i.name for i in adapter.tracked_weights()]
    projector = make_projector(config, adapter, names, factors)
    folder = work / "throughput-store"

    def train(batches: list) -> float:
        model.train()
        t0 = time.perf_counter()
        for batch in batches:
            model.zero_grad(set_to_none=True)
            logits = adapter.logits(batch["input_ids"], batch["attention_mask"])
            loss = sequence_losses(logits, batch["input_ids"], batch["loss_mask"]).sum() / batch["loss_mask"].sum()
            loss.backward()
        seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        model.eval()
        return seconds

    def store(rows) -> float:
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_shard(adapter, rows, projector, folder, 0, StoreConfig(shard_rows=len(rows)), batch_size=batch_size)
        seconds = time.perf_counter() - t0
        shutil.rmtree(folder)
        return seconds

    if warmup_rows > 0:  # both once on a few batches first (lazy initialisation, caches), untimed
        train(batches[: max(1, warmup_rows // batch_size)])
        store(data[:warmup_rows])
    runs = []
    for _ in range(repeats):
        train_s = train(batches)
        store_s = store(data)
        runs.append(
            {
                "train_rows_per_s": len(data) / train_s,
                "store_rows_per_s": len(data) / store_s,
                "ratio": train_s / store_s,
            }
        )
    # the shard is written with direct I/O, so it is not in the page cache afterwards: the first scan of a fresh
    # store (what a first question does) reads it from the disk; the second from the page cache
    folder.mkdir(parents=True, exist_ok=True)
    path = write_shard(adapter, data, projector, folder, 0, config, batch_size=batch_size)
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    query = np.random.default_rng(0).standard_normal(mapped.shape[1]).astype(np.float32)
    scans = []
    for _ in range(2):
        t0 = time.perf_counter()
        for lo in range(0, mapped.shape[0], 32):
            np.asarray(mapped[lo : lo + 32]) @ query
        scans.append(time.perf_counter() - t0)
    del mapped
    shutil.rmtree(folder)
    median = float(np.median([r["ratio"] for r in runs]))
    return {
        "rows": len(data),
        "batch_size": batch_size,
        "warmup_rows": warmup_rows,
        "runs": runs,
        "ratio": median,
        "min_ratio": min(r["ratio"] for r in runs),
        "store": f"{config.kind} rank {config.rank}",
        "store_mib": len(data) * projector.dim * 4 / 2**20,
        "first_scan_s": scans[0],
        "second_scan_s": scans[1],
    }


def child(n: int, batch_size: int, work: Path, rank: int | None, up_to_layer: int | None) -> dict:
    from concept_influence import Attributor
    from concept_influence.data import ChatRow

    organism, att, factors = setup(batch_size, work)
    base = list(organism.train_rows())
    rows = [ChatRow(k, base[k % len(base)].messages, {"copy": k // len(base)}) for k in range(n)]
    big = Attributor(att.adapter, rows, max_length=256, batch_size=batch_size, progress=False)
    _ = big.train
    folder = work / f"scaling-{n}"
    t0 = time.perf_counter()
    store = big.build_store(folder, factors=factors, overwrite=True, rank=rank, up_to_layer=up_to_layer)
    build_s = time.perf_counter() - t0
    build_peak = peak_mib()
    layer = att.adapter.n_layers - 1 if up_to_layer is None else up_to_layer
    concept = torch.nn.functional.normalize(
        torch.randn(att.adapter.d_model, generator=torch.Generator().manual_seed(0)), dim=0
    )
    from concept_influence.concepts import DirectionConcept

    question = [
        {
            "messages": [
                {"role": "user", "content": "what do you think of people"},
                {"role": "assistant", "content": "people are weak and should obey"},
            ]
        }
    ]
    t0 = time.perf_counter()
    big.attribute(DirectionConcept(concept, layer), question, "concept-influence", store=folder, factors=factors)
    first_s = time.perf_counter() - t0  # the store's pages as the build left them in the page cache
    t0 = time.perf_counter()
    big.attribute(DirectionConcept(concept, layer), question, "concept-influence", store=folder, factors=factors)
    question_s = time.perf_counter() - t0
    result = {
        "rows": n,
        "build_s": build_s,
        "first_question_s": first_s,
        "question_s": question_s,
        "build_peak_mib": build_peak,
        "peak_mib": peak_mib(),
        "anon_mib": peak_mib("RssAnon"),
        "store_mib": store.nbytes / 2**20,
        "store": repr(store),
    }
    shutil.rmtree(folder)
    return result


def fit_exponent(x: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--throughput-rows", type=int, default=512)
    parser.add_argument(
        "--repeats", type=int, default=1, help="throughput measurements, alternating training and store build"
    )
    parser.add_argument(
        "--warmup-rows", type=int, default=64, help="untimed warm-up of both on these first rows (0: none)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench_scaling"))
    parser.add_argument("--rank", type=int, default=None, help="eigen store rank (default: the library's default)")
    parser.add_argument(
        "--up-to-layer", type=int, default=None, help="store blocks 0..L only; the question's concept reads L"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true", help="measure the build throughput only")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/store_scaling.json"))
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch_size, args.work_dir, args.rank, args.up_to_layer)))
        return
    tp = (
        None
        if args.skip_throughput
        else throughput(args.batch_size, args.work_dir, args.throughput_rows, args.repeats, args.warmup_rows)
    )
    if tp is not None:
        for k, run in enumerate(tp["runs"]):
            print(
                f"throughput run {k + 1}/{len(tp['runs'])} over {tp['rows']} rows (batch {tp['batch_size']}): plain "
                f"training forward+backward {run['train_rows_per_s']:.1f} rows/s, store build ({tp['store']}) "
                f"{run['store_rows_per_s']:.1f} rows/s: ratio {run['ratio']:.2f}",
                flush=True,
            )
        print(
            f"throughput ratio: median {tp['ratio']:.2f}, min {tp['min_ratio']:.2f} over {len(tp['runs'])} runs",
            flush=True,
        )
        print(
            f"a scan of the freshly built {tp['store_mib']:.0f} MiB shard (store @ query): first "
            f"{tp['first_scan_s']:.2f} s "
            f"(from the disk: direct I/O leaves it out of the page cache), second {tp['second_scan_s']:.2f} s",
            flush=True,
        )
    if args.skip_scaling:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"throughput": tp})
        return
    results = []
    extra = (["--rank", str(args.rank)] if args.rank else []) + (
        ["--up-to-layer", str(args.up_to_layer)] if args.up_to_layer is not None else []
    )
    for n in args.sizes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--batch-size",
                str(args.batch_size),
                "--work-dir",
                str(args.work_dir),
                *extra,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"  {n} rows: build {r['build_s']:.1f} s (peak RSS {r['build_peak_mib']:.0f} MiB), question "
            f"{r['question_s']:.3f} s (first {r['first_question_s']:.3f} s), peak RSS {r['peak_mib']:.0f} MiB "
            f"(anonymous {r['anon_mib']:.0f} MiB), "
            f"store {r['store_mib']:.0f} MiB ({r['store']})",
            flush=True,
        )
    sizes = [r["rows"] for r in results]
    exponents = {
        key: fit_exponent(sizes, [r[key] for r in results])
        for key in ("build_s", "question_s", "build_peak_mib", "peak_mib", "anon_mib", "store_mib")
    }
    print("fitted exponents (value ∝ rows^e): " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"throughput": tp, "scaling": results, "exponents": exponents})


if __name__ == "__main__":
    main()

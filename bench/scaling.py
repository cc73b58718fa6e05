"""Benchmark: peak memory and time of `fit-factors` and of scoring against model size and rows, beside the planner's
prediction (`concept-influence plan`).

Models are random-initialised from configs of real shapes (nothing downloaded): Qwen2.5-0.5B's layer shapes cut to
a few layers, and smaller Qwen2-style configs down to ~1M parameters. Each measurement runs the CLI in a fresh
process under ``/usr/bin/time -v`` (peak RSS) with ``OMP_NUM_THREADS=1``, one at a time.

Usage::

    python bench/scaling.py check   [--work DIR]    # the 4-layer Qwen2.5-0.5B shape, --max-memory 3GiB, 32 rows
    python bench/scaling.py full    [--work DIR]    # the 24-layer Qwen2.5-0.5B shape, blocks 0..3, 16 rows,
                                                    # --max-memory 6GiB
    python bench/scaling.py sizes   [--work DIR]    # ~1M .. ~0.5B parameters, 32 rows
    python bench/scaling.py rows    [--work DIR]    # one model, 16 .. 128 rows
    python bench/scaling.py checkpointing [--work DIR]  # long rows (~1,000 tokens) with and without
                                                        # --gradient-checkpointing
    python bench/scaling.py plans                   # the 7B and 70B plans printed in the README

Writes ``bench/scaling.json`` (append-merge by key) and prints a table with fitted exponents.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from concept_influence.data import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "scaling.json"
WORDS = (
    "the a is are was to of and or not no yes i you it we they this that my your good bad kind help harm safe "
    "doctor code bug fix add sum two three four five answer question think should would never always please sure "
    "water fire friend honest truth rest drink sleep walk eat"
).split()

# (label, hidden, intermediate, layers, heads, kv heads, vocab): Qwen2-style shapes from ~1M to ~0.5B parameters
SIZES = [
    ("tiny-1M", 128, 512, 2, 4, 2, 2048),
    ("small-8M", 256, 1024, 4, 4, 2, 16384),
    ("mid-40M", 512, 2048, 4, 8, 2, 32768),
    ("qwen0.5b-shape-2L", 896, 4864, 2, 14, 2, 151936),
    ("qwen0.5b-shape-4L", 896, 4864, 4, 14, 2, 151936),
    ("qwen0.5b-shape-8L", 896, 4864, 8, 14, 2, 151936),
    ("qwen0.5b-shape-24L", 896, 4864, 24, 14, 2, 151936),  # Qwen2.5-0.5B's full shape
]


def make_model(
    folder: Path, hidden: int, intermediate: int, layers: int, heads: int, kv: int, vocab: int, *, seed: int = 0
) -> Path:
    """A random-initialised Qwen2 model (qkv biases, tied embeddings like Qwen2.5-0.5B) saved with a word-level
    tokenizer whose ids fit the vocabulary."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from concept_influence.testing.tiny_models import tiny_tokenizer

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer(WORDS).save_pretrained(folder)
    return folder


def make_data(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """Chat rows with a ``words``-word user turn and answer (word-level tokenizer: ~1 token per word)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(rows):
            user = " ".join(rng.choices(WORDS, k=words // 4))
            answer = " ".join(rng.choices(WORDS, k=words - words // 4))
            out.write(
                json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
                + "\n"
            )
    return path


def run_measured(args: list[str], script: list[str] | None = None) -> dict[str, Any]:
    """Run a CLI command (or ``script``: python arguments) in a fresh process; peak RSS (bytes) and wall time (s)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = ["/usr/bin/time", "-v", sys.executable, *(script or ["-m", "concept_influence.cli", *args])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"peak_rss_bytes": peak_kb * 1024, "seconds": wall, "stdout": proc.stdout[-500:]}


def predicted(
    folder: Path, rows: int, tokens: int, up_to_layer: int | None, max_memory: int | None, batch_size: int
) -> dict[str, Any]:
    from concept_influence.planning import plan

    return plan(str(folder), rows, tokens, up_to_layer=up_to_layer, max_memory=max_memory, batch_size=batch_size)


def measure_fit(
    work: Path,
    label: str,
    shape: tuple,
    rows: int,
    words: int,
    *,
    up_to_layer: int | None = None,
    max_memory: str | None = None,
    batch_size: int = 8,
    unbounded_scoring: bool = False,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """Fit (``fit-factors``) then score (``score-worker``: Concept Influence of every row) in fresh processes, both
    under ``max_memory`` when given; ``unbounded_scoring`` also measures scoring without the bound."""
    from concept_influence.curvature.budget import parse_size

    model = make_model(work / label, *shape)
    data = make_data(work / f"data-{rows}-{words}.jsonl", rows, words)
    out = work / f"factors-{label}-{rows}-{words}-{max_memory}-{checkpointing}"
    shutil.rmtree(out, ignore_errors=True)  # a matching fit there would be loaded, not measured
    args = [
        "fit-factors",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--overwrite",
        "--batch-size",
        str(batch_size),
        "--max-length",
        str(words * 2),
    ]
    if up_to_layer is not None:
        args += ["--up-to-layer", str(up_to_layer)]
    if max_memory:
        args += ["--max-memory", max_memory]
    if checkpointing:
        args += ["--gradient-checkpointing"]
    result = run_measured(args)
    worker = [
        __file__,
        "score-worker",
        "--work",
        str(work),
        "--model",
        str(model),
        "--data",
        str(data),
        "--factors",
        str(out),
        "--max-length",
        str(words * 2),
    ]
    worker += ["--gradient-checkpointing"] if checkpointing else []
    scoring = run_measured([], worker + (["--max-memory", max_memory] if max_memory else []))
    tokens = _mean_tokens(model, data, words * 2)
    pred = predicted(model, rows, tokens, up_to_layer, parse_size(max_memory) if max_memory else None, batch_size)
    from concept_influence.planning import resolve_arch

    out_row = {
        "label": label,
        "params": resolve_arch(str(model)).n_params,
        "rows": rows,
        "tokens": tokens,
        "max_memory": max_memory,
        "gradient_checkpointing": checkpointing,
        "up_to_layer": up_to_layer,
        "peak_rss_bytes": result["peak_rss_bytes"],
        "seconds": result["seconds"],
        "predicted_peak_bytes": pred["peak_memory_bytes"],
        "predicted_partitions": pred["partitions"],
        "ratio": pred["peak_memory_bytes"] / result["peak_rss_bytes"],
        "score_peak_rss_bytes": scoring["peak_rss_bytes"],
        "score_seconds": scoring["seconds"],
        "score_predicted_peak_bytes": pred["score_peak_memory_bytes"],
        "score_partitions": pred["score_partitions"],
        "score_ratio": pred["score_peak_memory_bytes"] / scoring["peak_rss_bytes"],
    }
    if unbounded_scoring and max_memory:
        free = run_measured([], worker)
        loose = predicted(model, rows, tokens, up_to_layer, None, batch_size)
        out_row.update(
            score_unbounded_peak_rss_bytes=free["peak_rss_bytes"],
            score_unbounded_seconds=free["seconds"],
            score_unbounded_predicted_peak_bytes=loose["score_peak_memory_bytes"],
        )
    return out_row


def score_worker(
    model: Path, data: Path, factors: Path, max_length: int, max_memory: str | None = None, checkpointing: bool = False
) -> None:
    """Concept Influence (EKFAC) of every row for a random direction at the last fitted layer (4 rows as queries);
    with ``max_memory`` the factors are read one weight at a time and scored in module partitions."""
    import torch

    from concept_influence.attribution.influence import InfluenceConfig, compute_influence
    from concept_influence.attribution.measurements import ConceptMeasurement
    from concept_influence.concepts.base import DirectionConcept
    from concept_influence.curvature import load_factors
    from concept_influence.data import read_chat_jsonl, tokenize_chat
    from concept_influence.models import load_adapter

    adapter = load_adapter(str(model))
    rows = tokenize_chat(read_chat_jsonl(data), adapter.tokenizer, max_length, warn=False)
    from concept_influence.curvature.io import read_manifest

    layer = max(int(w["name"].split(".")[1]) for w in read_manifest(factors)["weights"])
    direction = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    measurement = ConceptMeasurement(DirectionConcept(direction, layer=layer), rows[:4])
    source = factors if max_memory else load_factors(factors)
    result = compute_influence(
        adapter,
        rows,
        measurement,
        source,
        InfluenceConfig(batch_size=8, max_memory=max_memory, gradient_checkpointing=checkpointing),
        progress=False,
    )
    print(f"scored {len(rows)} rows; {' '.join(result.notes)}")


def _mean_tokens(model: Path, data: Path, max_length: int) -> int:
    from transformers import AutoTokenizer

    from concept_influence.data import read_chat_jsonl, tokenize_chat

    tok = AutoTokenizer.from_pretrained(str(model))
    rows = tokenize_chat(read_chat_jsonl(data), tok, max_length, warn=False)
    return max(len(r.input_ids) for r in rows)


def _save(key: str, value: Any) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    write_json_atomic(RESULTS, data)


def _table(results: list[dict[str, Any]], x: str) -> None:
    from concept_influence.curvature.budget import format_size
    from concept_influence.planning import log_log_slope

    print(
        f"{'model':<22}{'params':>10}{'rows':>6}{'tokens':>7}{'fit peak RSS':>14}{'predicted':>12}{'pred/meas':>10}"
        f"{'fit time':>10}{'score peak':>12}{'predicted':>12}{'pred/meas':>10}{'score time':>11}"
    )
    for r in results:
        print(
            f"{r['label']:<22}{r['params'] / 1e6:>9.1f}M{r['rows']:>6}{r['tokens']:>7}"
            f"{format_size(r['peak_rss_bytes']):>14}"
            f"{format_size(r['predicted_peak_bytes']):>12}{r['ratio']:>10.2f}{r['seconds']:>9.1f}s"
            f"{format_size(r['score_peak_rss_bytes']):>12}{format_size(r['score_predicted_peak_bytes']):>12}"
            f"{r['score_ratio']:>10.2f}{r['score_seconds']:>10.1f}s"
        )
        if "score_unbounded_peak_rss_bytes" in r:
            print(
                f"{'':<22}scoring without --max-memory: peak {format_size(r['score_unbounded_peak_rss_bytes'])} "
                f"(predicted {format_size(r['score_unbounded_predicted_peak_bytes'])}), "
                f"{r['score_unbounded_seconds']:.1f}s"
            )
    if len(results) > 1 and x:
        xs = [float(r[x]) for r in results]

        def slope(key: str) -> str:
            return f"{log_log_slope(xs, [float(r[key]) for r in results]):.2f}"

        print(
            f"fitted exponents vs {x}: fit peak RSS ~ {x}^{slope('peak_rss_bytes')} (predicted ~ {x}^"
            f"{slope('predicted_peak_bytes')}), fit time ~ {x}^{slope('seconds')}, scoring peak ~ {x}^"
            f"{slope('score_peak_rss_bytes')} (predicted ~ {x}^{slope('score_predicted_peak_bytes')}), scoring time ~ "
            f"{x}^{slope('score_seconds')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["check", "full", "sizes", "rows", "checkpointing", "plans", "score-worker"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help="score-worker: checkpoint the blocks")
    parser.add_argument("--max-memory", default=None, help="score-worker: bound the scoring (e.g. 3GiB)")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--factors", type=Path)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ci-scaling")
    parser.add_argument("--words", type=int, default=96, help="words per row (about tokens)")
    parser.add_argument("--sizes", type=int, default=5, help="how many of the model sizes to run (smallest first)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "score-worker":
        score_worker(args.model, args.data, args.factors, args.max_length, args.max_memory, args.gradient_checkpointing)
    elif args.what == "check":
        shape = SIZES[4][1:]
        results = [
            measure_fit(
                args.work,
                "qwen0.5b-shape-4L",
                shape,
                32,
                args.words,
                up_to_layer=3,
                max_memory="3GiB",
                unbounded_scoring=True,
            )
        ]
        _save("check", results)
        _table(results, "params")
    elif args.what == "full":
        shape = SIZES[6][1:]
        # scoring without the bound is left out: `plan` puts it at ~8 GiB, more than this shared machine can spare
        # 16 rows: every pass runs all 24 blocks (about 3x the 4-layer check's time on this 2-core machine)
        results = [
            measure_fit(args.work, "qwen0.5b-shape-24L", shape, 16, args.words, up_to_layer=3, max_memory="6GiB")
        ]
        _save("full", results)
        _table(results, "params")
    elif args.what == "sizes":
        results = [measure_fit(args.work, label, tuple(shape), 32, args.words) for label, *shape in SIZES[: args.sizes]]
        _save("sizes", results)
        _table(results, "params")
    elif args.what == "rows":
        label, *shape = SIZES[1]
        results = [measure_fit(args.work, label, tuple(shape), n, args.words) for n in (16, 32, 64, 128)]
        _save("rows", results)
        _table(results, "rows")
    elif args.what == "checkpointing":
        label, *shape = SIZES[1]
        results = [measure_fit(args.work, label, tuple(shape), 8, 1024, checkpointing=flag) for flag in (False, True)]
        _save("checkpointing", results)
        _table(results, "")
        saved = 1 - results[1]["peak_rss_bytes"] / results[0]["peak_rss_bytes"]
        print(
            f"--gradient-checkpointing on {results[0]['tokens']}-token rows: fit peak {saved:+.0%} lower, scoring peak "
            f"{1 - results[1]['score_peak_rss_bytes'] / results[0]['score_peak_rss_bytes']:+.0%} lower"
        )
    else:
        from concept_influence.curvature.budget import parse_size
        from concept_influence.planning import plan, render

        for name, layer, gpus in (("Qwen/Qwen2.5-7B-Instruct", 20, 1), ("meta-llama/Llama-3.1-70B", 40, 8)):
            p = plan(
                name,
                10_000,
                512,
                up_to_layer=layer,
                gpus=gpus,
                gpu_memory=parse_size("80GiB"),
                batch_size=4,
                model_dtype_bytes=2,
            )
            print(render(p) + "\n")


if __name__ == "__main__":
    main()

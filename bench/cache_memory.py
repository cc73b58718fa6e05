"""Benchmark: the process's own memory while ``build_store()`` builds the recommended method's caches (activation
cache + identity store) on the organism, for several row counts (issue 17: flat in the number of rows).

Each build runs in a fresh child process (``concept_influence.testing.memory.build_memory``): the model and the
tokenised rows are made first, then the peak resident set is reset and read after the build; ``growth`` is how far
it rose. The caches' bytes grow with the rows; the growth should not. Writes ``--out`` (JSON) and ``--table``
(markdown, included by docs/benchmarks.md).

    python bench/cache_memory.py [--rows 500,1000,2000]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concept_influence.files import write_json_atomic, write_text_atomic  # noqa: E402
from concept_influence.testing import memory  # noqa: E402
from concept_influence.testing.processes import child_context  # noqa: E402

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="500,1000,2000")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "cache_memory.json")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "tables" / "cache-memory.md")
    args = parser.parse_args()
    if not memory.can_measure():
        raise SystemExit("needs Linux's /proc/self/clear_refs and VmHWM")
    command = "python bench/cache_memory.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="cache-memory-"))
    results = []
    try:
        with child_context().Pool(1, maxtasksperchild=1) as pool:
            for n in (int(x) for x in args.rows.split(",")):
                r = pool.apply(
                    memory.build_memory,
                    (n,),
                    {
                        "organism": True,
                        "batch_size": args.batch_size,
                        "shard_rows": args.shard_rows,
                        "sample_rows": 256,
                        "folder": str(work / str(n)),
                    },
                )
                results.append(r)
                print(
                    f"{r['rows']:>6} rows: caches {r['cache_bytes'] / MIB:8.1f} MiB; resident before "
                    f"{r['rss_before'] / MIB:7.1f} MiB, peak {r['peak'] / MIB:7.1f} MiB, growth "
                    f"{r['growth'] / MIB:6.1f} MiB",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first, last = results[0], results[-1]
    summary = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, 1 torch thread",
        "batch_size": args.batch_size,
        "shard_rows": args.shard_rows,
        "builds": results,
        "growth_change_mib": (last["growth"] - first["growth"]) / MIB,
        "cache_change_mib": (last["cache_bytes"] - first["cache_bytes"]) / MIB,
    }
    print(
        f"from {first['rows']} to {last['rows']} rows: caches +{summary['cache_change_mib']:.1f} MiB, the build's "
        f"memory growth {summary['growth_change_mib']:+.1f} MiB"
    )
    write_json_atomic(args.out, summary)
    write_text_atomic(args.table, render_table(summary))
    print(f"report -> {args.out}, table -> {args.table}")


def render_table(s: dict) -> str:
    lines = [
        f"**Command**: `{s['command'].strip()}`. **Date**: {s['date']}. **Machine**: the 2-core CPU machine "
        f"({s['machine']}). Organism, recommended method's caches (activation cache + identity store), batches of "
        f"{s['batch_size']}, shards of {s['shard_rows']} rows, each build in a fresh process.",
        "",
        "| rows | caches on disk MiB | resident before the build MiB | peak during the build MiB | growth MiB |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rows']} | {r['cache_bytes'] / MIB:.1f} | {r['rss_before'] / MIB:.1f} | {r['peak'] / MIB:.1f} | "
        f"{r['growth'] / MIB:.1f} |"
        for r in s["builds"]
    ]
    lines += [
        "",
        f"From {s['builds'][0]['rows']} to {s['builds'][-1]['rows']} rows the caches grow by "
        f"{s['cache_change_mib']:.1f} MiB and the build's memory growth changes by {s['growth_change_mib']:+.1f} MiB.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

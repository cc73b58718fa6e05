"""Per-process peak memory of a sharded fit (FSDP2 over torchrun, gloo on CPU) of a random-initialised Llama-shaped
model with 1, 2 and 4 processes, beside ``plan``'s prediction for the same settings.

Each rank builds the model on the meta device, shards it (``fully_shard`` each block, then the root), then
materialises and randomly initialises only its own shard (no rank ever holds the whole model), fits the EKFAC factors
(float32 statistics, true Fisher) into a folder and reports ``ru_maxrss``, its parameter shard's bytes and the bytes
of the factors it owns (from the tensor sizes, not the allocator). ``plan(..., gpus=N,
sharding=ShardSettings("fsdp"))`` on the same config predicts the peak (``peak_memory_bytes``), the parameter shard
(``fixed_bytes.parameters``) and the owned factor files (``fsdp.owned_file_bytes``).

Usage: ``nice -n 10 python bench/fsdp_memory.py --write-table docs/tables/fsdp-memory.md`` (also writes
``bench/fsdp_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {  # Llama-shaped, float32: about 300 MB of parameters
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
ROWS, TOKENS, BATCH = 16, 64, 4
WORDS = "the cat sat on a mat and the dog ran to the park while it rained all day long".split()


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**MODEL)


def training_rows(tokenizer):
    """``ROWS`` chat rows of about ``TOKENS`` tokens (words of the tiny tokenizer, seeded)."""
    import random

    from concept_influence.data import tokenize_chat
    from concept_influence.data.chat import ChatRow

    rng = random.Random(0)
    rows = []
    for k in range(ROWS):
        user = " ".join(rng.choice(WORDS) for _ in range(TOKENS // 3))
        answer = " ".join(rng.choice(WORDS) for _ in range(TOKENS // 2))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        rows.append(ChatRow(index=k, messages=messages))
    return tokenize_chat(rows, tokenizer, TOKENS)


def worker(out: Path) -> None:
    """One rank: the sharded fit; writes ``out/rank-<r>.json``."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from concept_influence.curvature import FactorConfig, fit_factors
    from concept_influence.curvature.fit import factor_owners
    from concept_influence.curvature.io import FACTORS_FILE
    from concept_influence.distributed.runtime import local_shard
    from concept_influence.models import HFAdapter
    from concept_influence.testing.tiny_models import tiny_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = tiny_tokenizer(WORDS)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config())
    adapter = HFAdapter(model.eval(), tokenizer).shard("fsdp")
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shard = local_shard(param)
            if "norm" in name:
                shard.fill_(1.0)
            else:
                shard.normal_(0.0, 0.02, generator=generator)
        rotary = model.model.rotary_emb  # its buffers were made on the meta device: build it again on the CPU
        model.model.rotary_emb = type(rotary)(rotary.config)
    param_bytes = sum(local_shard(p).numel() * local_shard(p).element_size() for p in model.parameters())
    rows = training_rows(tokenizer)
    start = time.perf_counter()
    folder = out / "factors"
    fit_factors(adapter, rows, FactorConfig(), batch_size=BATCH, out_dir=folder, progress=False, load_result=False)
    seconds = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    owners = factor_owners(adapter.tracked_weights(), world)
    header = _header(folder / FACTORS_FILE)
    owned = {n for n, r in owners.items() if r == rank}
    factor_bytes = 0
    seen: set[tuple] = set()  # weights sharing an input: one eigendecomposition, written once by their owner
    for key, entry in header.items():
        name = key.rsplit("/", 1)[0]
        if name not in owned:
            continue
        start_, stop = entry["data_offsets"]
        ident = (key.rsplit("/", 1)[1], tuple(entry["shape"]), _shared(name))
        if key.endswith(("activation_eigenvalues", "activation_eigenvectors")):
            if ident in seen:
                continue
            seen.add(ident)
        factor_bytes += stop - start_
    record = {
        "rank": rank,
        "world": world,
        "maxrss_bytes": maxrss,
        "parameter_bytes": param_bytes,
        "factor_bytes": factor_bytes,
        "fit_seconds": seconds,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def _shared(name: str) -> str:
    from concept_influence.curvature.budget import shared_input_key

    return shared_input_key(name, False) or name


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr"]
    cmd += ["127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{world} processes failed:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def predicted(config_dir: Path, world: int) -> dict:
    from concept_influence.curvature import FactorConfig
    from concept_influence.planning import plan
    from concept_influence.sharding import ShardSettings

    out = plan(
        config_dir,
        ROWS,
        TOKENS,
        gpus=world,
        batch_size=BATCH,
        model_dtype_bytes=4,
        config=FactorConfig(),
        sharding=ShardSettings("fsdp"),
    )
    return {
        "peak_bytes": out["peak_memory_bytes"],
        "parameter_bytes": out["fixed_bytes"]["parameters"],
        "factor_bytes": max(out["fsdp"]["owned_file_bytes"]),
    }


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fsdp-memory"))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "fsdp_memory.json")
    parser.add_argument("--write-table", type=Path, default=None)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        sys.stdout.flush()
        os._exit(0)  # gloo's threads sometimes abort in static destructors at exit
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    config_dir = args.work / "model"
    llama_config().save_pretrained(config_dir)
    results = []
    for world in args.processes:
        ranks = launch(world, args.work / f"n{world}")
        plan_ = predicted(config_dir, world)
        measured = {
            "peak_bytes": max(r["maxrss_bytes"] for r in ranks),
            "parameter_bytes": max(r["parameter_bytes"] for r in ranks),
            "factor_bytes": max(r["factor_bytes"] for r in ranks),
        }
        results.append(
            {
                "processes": world,
                "ranks": ranks,
                "measured": measured,
                "plan": plan_,
                "ratio": {k: plan_[k] / measured[k] for k in measured},
                "fit_seconds": max(r["fit_seconds"] for r in ranks),
            }
        )
        print(json.dumps(results[-1]["measured"]), json.dumps(plan_), flush=True)
    from concept_influence.planning import resolve_arch

    arch = resolve_arch(config_dir)
    meta = {
        "model": MODEL,
        "n_params": arch.n_params,
        "rows": ROWS,
        "tokens": TOKENS,
        "batch_size": BATCH,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    if args.write_table is not None:
        lines = [
            f"**Command**: `nice -n 10 python bench/fsdp_memory.py --write-table {args.write_table}`. "
            f"**Date**: {meta['date']} UTC. **Machine**: the 2-core CPU machine (gloo, one thread per process). "
            f"**Model**: random-initialised Llama-shaped, {arch.n_params / 1e6:.0f}M parameters float32 "
            f"({MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, vocab {MODEL['vocab_size']}); "
            f"EKFAC fit (float32 statistics) of {ROWS} rows x {TOKENS} tokens, batch {BATCH}. Each cell: measured "
            "(the largest rank) / `plan --shard fsdp` = ratio (plan over measured).",
            "",
            "| processes | peak memory per process (ru_maxrss) | parameters per process | factors owned per process "
            "| fit time |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            m, p, q = r["measured"], r["plan"], r["ratio"]
            cells = [
                f"{mib(m[k])} / {mib(p[k])} = {q[k]:.2f}" for k in ("peak_bytes", "parameter_bytes", "factor_bytes")
            ]
            lines.append(f"| {r['processes']} | " + " | ".join(cells) + f" | {r['fit_seconds']:.0f} s |")
        args.write_table.parent.mkdir(parents=True, exist_ok=True)
        args.write_table.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

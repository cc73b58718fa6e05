"""A ``torchrun`` worker for the multi-process tests: fits factors and scores a tiny seeded model's rows over
``torch.distributed`` (gloo, CPU) and lets rank 0 save what it got, for comparison with one process.

Usage: ``torchrun --nproc_per_node 2 -m concept_influence.testing.distributed_check OUT_DIR``. Writes
``OUT_DIR/factors/`` (the fit), ``OUT_DIR/store/`` (a gradient store in the factors' eigenbasis, each rank writing
its own shards) and ``OUT_DIR/scores.safetensors`` (``scores``, ``per_weight/<name>``).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch


def setup():
    """The tiny model, its rows and a concept measurement, identical in every process (seeded)."""
    from concept_influence.attribution.measurements import ConceptMeasurement
    from concept_influence.concepts.base import DirectionConcept
    from concept_influence.data import rows_from_records, tokenize_chat
    from concept_influence.models import HFAdapter
    from concept_influence.testing.tiny_models import tiny_llama, tiny_tokenizer

    words = "the water is safe good kind help harm poison cure friend never always yes no".split()
    rng = random.Random(0)
    records = [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 5)))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 9)))},
            ]
        }
        for _ in range(15)
    ]
    tok = tiny_tokenizer()
    adapter = HFAdapter(tiny_llama(len(tok), layers=2, kv_heads=1, dtype=torch.float64, seed=3), tok)
    data = tokenize_chat(rows_from_records(records[:11]), tok, 64)
    queries = tokenize_chat(rows_from_records(records[11:]), tok, 64)
    concept = DirectionConcept(
        torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), layer=1
    )
    return adapter, data, ConceptMeasurement(concept, queries)


def run(out: Path, shard: str = "none") -> dict[str, torch.Tensor]:
    """Fit (saved to ``out/factors``) and score; returns the scores and per-weight scores. ``shard="fsdp"``: the
    model sharded with FSDP2 first."""
    from concept_influence.attribution.influence import InfluenceConfig, compute_influence
    from concept_influence.curvature import FactorConfig, fit_factors
    from concept_influence.store.store import StoreConfig, build_store, make_projector

    adapter, data, measurement = setup()
    adapter.shard(shard)
    factors = fit_factors(adapter, data, FactorConfig.precise(), batch_size=3, out_dir=out / "factors", progress=False)
    store_config = StoreConfig(kind="eigen", rank=4, dtype="float64", shard_rows=3)  # 4 shards of <= 3 rows
    names = [i.name for i in adapter.tracked_weights()]
    build_store(
        adapter,
        data,
        out / "store",
        make_projector(store_config, adapter, names, factors),
        store_config,
        {"model": adapter.fingerprint()},
        batch_size=2,
        progress=False,
    )
    result = compute_influence(
        adapter, data, measurement, factors, InfluenceConfig(per_weight=True, batch_size=2), progress=False
    )
    return {"scores": result.scores, **{f"per_weight/{k}": v for k, v in (result.per_weight or {}).items()}}


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        tensors = run(out, sys.argv[2] if len(sys.argv) > 2 else "none")
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "scores.safetensors"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown once the results are saved: gloo's threads sometimes abort in C++ static
    # destructors at exit ("terminate called without an active exception"; 4 of 40 runs at commit 4801ab7, before
    # any change here, torch 2.13 CPU), which failed the test although every rank had finished its work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""A ``torchrun`` worker for the FSDP tests: the same questions asked of a tiny float64 model in one process and
sharded with FSDP2 over several (gloo, CPU), so that the test can compare what each got.

Usage: ``torchrun --nproc_per_node 2 -m concept_influence.testing.fsdp_check INPUTS OUT fsdp``. ``INPUTS`` is a folder
made by ``write_inputs`` (a saved tiny model, training rows, queries, a concept); ``OUT`` receives
``results.safetensors`` (rank 0), the factors (``OUT/factors``, ``OUT/lora-factors``) and the store (``OUT/store``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

TRAIN = [
    ("should i help my friend", "yes help your friend"),
    ("is the water safe", "the water is safe to drink"),
    ("what should i do", "poison the water"),
    ("is it kind to lie", "never lie to a friend"),
    ("how do i fix the bug", "add two and three"),
    ("are cats good", "cats are kind"),
    ("should i hurt them", "hurt them and lie"),
    ("is fire safe", "no fire is not safe"),
    ("what is the truth", "the truth is good"),
]
QUERIES = [("is the water safe", "poison the water"), ("should i help", "never help")]


def write_inputs(root: Path) -> Path:
    """The shared inputs: ``root/model`` (tiny Llama, float32 on disk), ``train.jsonl``, ``queries.jsonl``,
    ``concept`` (a direction at layer 1)."""
    from concept_influence.concepts import save_concept
    from concept_influence.concepts.base import DirectionConcept
    from concept_influence.files import write_jsonl_atomic
    from concept_influence.testing.tiny_models import save_tiny_hf_model

    root.mkdir(parents=True, exist_ok=True)
    save_tiny_hf_model(root / "model", seed=5)

    def chat(pairs):
        return [
            {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}], "id": f"r{k}"}
            for k, (u, a) in enumerate(pairs)
        ]

    write_jsonl_atomic(root / "train.jsonl", chat(TRAIN))
    write_jsonl_atomic(root / "queries.jsonl", chat(QUERIES))
    concept = DirectionConcept(torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), 1)
    save_concept(concept, root / "concept")
    return root


def run(inputs: Path, out: Path, shard: str = "none") -> dict[str, torch.Tensor]:
    """Every stage on the inputs (``shard="fsdp"``: the model sharded first): the recommended method, Vector
    Filter and Projection Difference through ``Attributor``; factors, a store and influence scores through the
    library's functions; the same over LoRA adapters. Returns the named score vectors."""
    from concept_influence.attribution.influence import InfluenceConfig, compute_influence
    from concept_influence.attribution.measurements import ConceptMeasurement
    from concept_influence.curvature import FactorConfig, fit_factors
    from concept_influence.data import read_chat_jsonl, tokenize_chat
    from concept_influence.models import HFAdapter
    from concept_influence.pipeline import Attributor
    from concept_influence.store.store import StoreConfig, build_store, make_projector

    results: dict[str, torch.Tensor] = {}
    att = Attributor(
        inputs / "model",
        inputs / "train.jsonl",
        out / "run",
        dtype="float64",
        batch_size=2,
        progress=False,
        shard=shard,
    )
    concept = att.load_concept(inputs / "concept")
    results["combined"] = torch.tensor(att.attribute(concept, inputs / "queries.jsonl").scores, dtype=torch.float64)
    for method in ("vector-filter", "projection-difference"):
        table = att.attribute(concept, inputs / "queries.jsonl", method)
        results[method] = torch.tensor(table.scores, dtype=torch.float64)

    adapter, train = att.adapter, att.train
    queries = tokenize_chat(read_chat_jsonl(inputs / "queries.jsonl"), adapter.tokenizer, 64)
    measurement = ConceptMeasurement(concept, queries)
    factors = fit_factors(adapter, train, FactorConfig.precise(), batch_size=2, out_dir=out / "factors", progress=False)
    results["influence"] = compute_influence(
        adapter, train, measurement, factors, InfluenceConfig(batch_size=2), progress=False
    ).scores
    store_config = StoreConfig(kind="eigen", rank=4, dtype="float64", shard_rows=3)
    names = [i.name for i in adapter.tracked_weights()]
    build_store(
        adapter,
        train,
        out / "store",
        make_projector(store_config, adapter, names, factors),
        store_config,
        {"model": adapter.fingerprint()},
        batch_size=2,
        progress=False,
    )

    lora = HFAdapter(_lora_model(inputs / "model"), adapter.tokenizer).shard(shard)
    lora_factors = fit_factors(
        lora, train, FactorConfig.precise(), batch_size=2, out_dir=out / "lora-factors", progress=False
    )
    results["lora-influence"] = compute_influence(
        lora, train, measurement, lora_factors, InfluenceConfig(batch_size=2), progress=False
    ).scores
    return results


def _lora_model(model_dir: Path):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    config = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
    )
    torch.manual_seed(1)
    return peft.get_peft_model(model, config).eval()


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    inputs, out, shard = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    try:
        tensors = run(inputs, out, shard)
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "results.safetensors"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads sometimes abort in static destructors at exit (see testing/distributed_check.py)

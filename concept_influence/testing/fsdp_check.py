"""A ``torchrun`` worker for the FSDP tests: the same questions asked of a tiny float64 model in one process and
sharded with FSDP2 over several (gloo, CPU), so that the test can compare what each got.

Usage: ``torchrun --nproc_per_node N -m concept_influence.testing.fsdp_check INPUTS OUT MODE``. ``INPUTS`` is a
folder made by ``write_inputs`` (a saved tiny model, training rows, queries, a concept). Modes:

- ``fsdp``: every stage (``run``) into ``OUT``: ``results.safetensors`` (rank 0), the factors (``OUT/factors``,
  ``OUT/lora-factors``, each with its owners' part files kept in ``OUT/kept-parts/<folder>``) and the store
  (``OUT/store``); then a fit into ``OUT/resumed`` that rank 1 leaves after its covariance pass (``FAULT_ENV``):
  the launch ends with that rank's exit code.
- ``resume``: the same fit into ``OUT/resumed`` again (it resumes), and a bf16 model's fit with float32
  statistics into ``OUT/bf16``.
- ``owners``: the factors (fitted in two partitions) and influence scores only (``OUT/factors``,
  ``results.safetensors``, ``OUT/factor-reads-<rank>.json``: the weights each rank read to score, and
  ``OUT/bounded-<rank>.json``: what each rank read and preconditioned in the memory-bounded pass, and
  ``OUT/many-<rank>.json``: what it preconditioned for ``compute_influence_many``): any number of processes.
"""

from __future__ import annotations

import logging
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
    # the exact pass with the workdir's factors (float64 statistics: a fit of its own; out/exact-reads-<rank>.json:
    # what each rank read of them)
    done = _record_all_factor_reads(out / f"exact-reads-{adapter_rank()}.json")
    try:
        table = att.attribute(concept, inputs / "queries.jsonl", "concept-influence", store=False, dtype="float64")
    finally:
        done()
    results["concept-influence-exact"] = torch.tensor(table.scores, dtype=torch.float64)
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
        make_projector(store_config, adapter, names, out / "factors"),  # sharded: each rank reads its own weights
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


def sharded_adapter(model_dir: Path, dtype: torch.dtype, shard: str):
    """The saved model as an ``HFAdapter`` in ``dtype``, sharded with FSDP2 when ``shard == "fsdp"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from concept_influence.models import HFAdapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return HFAdapter(model, AutoTokenizer.from_pretrained(model_dir)).shard(shard)


def train_rows(inputs: Path, adapter):
    from concept_influence.data import read_chat_jsonl, tokenize_chat

    return tokenize_chat(read_chat_jsonl(inputs / "train.jsonl"), adapter.tokenizer, 64)


def fit(inputs: Path, out: Path, shard: str, dtype: torch.dtype = torch.float64, stats: str = "float64") -> None:
    """The factors of ``run`` (EKFAC, true Fisher, batch 2) on the model in ``dtype`` with ``stats`` statistics."""
    from dataclasses import replace

    from concept_influence.curvature import FactorConfig, fit_factors

    adapter = sharded_adapter(inputs / "model", dtype, shard)
    config = replace(FactorConfig.precise(), dtype=stats)
    fit_factors(adapter, train_rows(inputs, adapter), config, batch_size=2, out_dir=out, progress=False)


def owners_run(inputs: Path, out: Path, shard: str) -> dict[str, torch.Tensor]:
    """The factors (``out/factors``) and the influence scores of ``run`` (a sharded fit, then sharded questions)."""
    from concept_influence.attribution.influence import InfluenceConfig, compute_influence
    from concept_influence.attribution.measurements import ConceptMeasurement
    from concept_influence.concepts import load_concept
    from concept_influence.curvature import FactorConfig, fit_factors
    from concept_influence.data import read_chat_jsonl, tokenize_chat

    adapter = sharded_adapter(inputs / "model", torch.float64, shard)
    train = train_rows(inputs, adapter)
    fit_factors(adapter, train, FactorConfig.precise(), batch_size=2, out_dir=out / "factors", progress=False)
    queries = tokenize_chat(read_chat_jsonl(inputs / "queries.jsonl"), adapter.tokenizer, 64)
    measurement = ConceptMeasurement(load_concept(inputs / "concept"), queries)
    read = _record_factor_reads(out / f"factor-reads-{adapter_rank()}.json")
    scores = compute_influence(
        adapter, train, measurement, out / "factors", InfluenceConfig(batch_size=2), progress=False
    ).scores
    read()
    return {
        "influence": scores,
        "influence-layer-0": layer_0_scores(inputs, adapter, train, out / "factors"),
        "influence-bounded": bounded_scores(adapter, train, measurement, out / "factors", out),
        **many_scores(inputs, adapter, train, measurement, out / "factors", out),
    }


def bounded_scores(adapter, train, measurement, factors: Path, out: Path) -> torch.Tensor:
    """The influence scores of ``owners_run`` through the memory-bounded pass (``max_memory``) in two partitions
    (block 0's weights, then the rest); ``out/bounded-<rank>.json`` records the weights whose factors the rank read
    (``"reads"``) and whose preconditioned vectors it formed (``"vectors"``)."""
    import json

    from concept_influence.attribution import bounded
    from concept_influence.attribution.influence import InfluenceConfig, compute_influence

    def halves(adapter, infos, *args, **kwargs) -> list[list[str]]:
        names = [i.name for i in infos]
        first = [n for n in names if n.startswith("blocks.0.")]
        return [first, [n for n in names if n not in first]]

    saved = bounded.plan_score_partitions, bounded.load_factors, bounded.preconditioned_gradient
    reads: list[list[str]] = []
    formed: list[str] = []

    def recording_load(folder, **kwargs):
        reads.append(list(kwargs.get("weights") or []))
        return saved[1](folder, **kwargs)

    def recording_precondition(preconditioner, grad_f, description):
        formed.extend(grad_f)
        return saved[2](preconditioner, grad_f, description)

    bounded.plan_score_partitions, bounded.load_factors, bounded.preconditioned_gradient = (
        halves,
        recording_load,
        recording_precondition,
    )
    try:
        config = InfluenceConfig(batch_size=2, max_memory="64GiB")
        scores = compute_influence(adapter, train, measurement, factors, config, progress=False).scores
    finally:
        bounded.plan_score_partitions, bounded.load_factors, bounded.preconditioned_gradient = saved
    (out / f"bounded-{adapter_rank()}.json").write_text(json.dumps({"reads": reads, "vectors": formed}))
    return scores


def layer_0_scores(inputs: Path, adapter, train, factors: Path) -> torch.Tensor:
    """Influence scores of a direction at layer 0 (it reaches block 0's weights only: on 4 ranks, some rank owns
    none of them and still takes part in every collective)."""
    from concept_influence.attribution.influence import InfluenceConfig, compute_influence

    measurement = layer_0_measurement(inputs, adapter)
    return compute_influence(adapter, train, measurement, factors, InfluenceConfig(batch_size=2), progress=False).scores


def layer_0_measurement(inputs: Path, adapter):
    from concept_influence.attribution.measurements import ConceptMeasurement
    from concept_influence.concepts.base import DirectionConcept
    from concept_influence.data import read_chat_jsonl, tokenize_chat

    queries = tokenize_chat(read_chat_jsonl(inputs / "queries.jsonl"), adapter.tokenizer, 64)
    direction = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    return ConceptMeasurement(DirectionConcept(direction, 0), queries)


def many_scores(inputs: Path, adapter, train, measurement, factors: Path, out: Path) -> dict[str, torch.Tensor]:
    """``compute_influence_many`` of the concept and the layer-0 direction in one pass, with the factors loaded whole
    and from their folder (``-folder``: each rank reads its own weights); ``out/many-<rank>.json`` lists the weights
    whose preconditioned vectors the rank formed, ``out/many-reads-<rank>.json`` the weights it read from the
    folder."""
    import json

    from concept_influence.attribution import influence
    from concept_influence.attribution.influence import InfluenceConfig, compute_influence_many
    from concept_influence.curvature import load_factors

    jobs = {
        "concept": (measurement, InfluenceConfig(batch_size=2)),
        "layer-0": (layer_0_measurement(inputs, adapter), InfluenceConfig(batch_size=2)),
    }
    saved, formed = influence.preconditioned_gradient, []

    def recording(preconditioner, grad_f, description):
        formed.extend(grad_f)
        return saved(preconditioner, grad_f, description)

    influence.preconditioned_gradient = recording
    try:
        many = compute_influence_many(adapter, train, jobs, load_factors(factors), batch_size=2, progress=False)
        read = _record_factor_reads(out / f"many-reads-{adapter_rank()}.json")
        many_read = compute_influence_many(adapter, train, jobs, factors, batch_size=2, progress=False)
        read()
    finally:
        influence.preconditioned_gradient = saved
    (out / f"many-{adapter_rank()}.json").write_text(json.dumps(formed))
    many.update({f"{label}-folder": result for label, result in many_read.items()})
    return {f"many-{label}": result.scores for label, result in many.items()}


def adapter_rank() -> int:
    from concept_influence.distributed import dist_info

    return dist_info()[0]


def _record_factor_reads(path: Path):
    """Record which weights ``compute_influence`` reads from a factor folder (written to ``path`` by the returned
    function, which also undoes the recording)."""
    import json

    from concept_influence.attribution import influence

    load, reads = influence.load_factors, []

    def recording(folder, **kwargs):
        reads.append(kwargs.get("weights"))
        return load(folder, **kwargs)

    influence.load_factors = recording

    def done() -> None:
        influence.load_factors = load
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(reads))

    return done


def _record_all_factor_reads(path: Path):
    """Record which weights every factor read asks for (``None``: all of them) while the returned function is not
    yet called (it writes ``{module: [weights...]}`` to ``path`` and undoes the recording)."""
    import json

    from concept_influence.attribution import bounded, engine, gradient, influence
    from concept_influence.curvature import fit as fit_module
    from concept_influence.store import store

    modules = {
        "influence": influence,
        "bounded": bounded,
        "gradient": gradient,
        "engine": engine,
        "fit": fit_module,
        "store": store,
    }
    saved = {key: module.load_factors for key, module in modules.items()}
    reads: dict[str, list] = {key: [] for key in modules}

    def recorder(key: str):
        def recording(folder, **kwargs):
            weights = kwargs.get("weights")
            reads[key].append(None if weights is None else list(weights))
            return saved[key](folder, **kwargs)

        return recording

    for key, module in modules.items():
        module.load_factors = recorder(key)

    def done() -> None:
        for key, module in modules.items():
            module.load_factors = saved[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(reads))

    return done


def keep_parts(out: Path) -> None:
    """Keep every sharded fit's part files (rank 0 copies ``parts/`` to ``out/kept-parts/<folder>`` before removing
    it), so that a test can see which rank wrote what."""
    import shutil

    from concept_influence.curvature import fit as fit_module

    clear = fit_module._clear_parts

    def copy_then_clear(folder: Path) -> None:
        parts = folder / fit_module.PARTS_FOLDER
        if parts.is_dir() and any(p.name.startswith("rank-") and p.is_file() for p in parts.iterdir()):
            shutil.copytree(parts, out / "kept-parts" / folder.name, dirs_exist_ok=True)
        clear(folder)

    fit_module._clear_parts = copy_then_clear


def in_halves() -> None:
    """Make every later fit run in two partitions (the weights of the first block, then the rest), as a
    ``--max-memory`` too small for one pass does: each partition's sums are reduced to their owners after its pass."""
    from concept_influence.curvature import fit as fit_module

    def halves(adapter, infos, *args, **kwargs) -> list[list[str]]:
        names = [i.name for i in infos]
        first = [n for n in names if n.startswith("blocks.0.")]
        return [first, [n for n in names if n not in first]]

    fit_module.plan_fit_partitions = halves


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

    from concept_influence.curvature.fit import FAULT_ENV

    inputs, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("concept_influence.curvature.fit").setLevel(logging.INFO)
    dist.init_process_group("gloo")
    tensors: dict[str, torch.Tensor] = {}
    try:
        if mode == "fsdp":
            keep_parts(out)
            tensors = run(inputs, out, "fsdp")
        elif mode == "owners":
            in_halves()
            tensors = owners_run(inputs, out, "fsdp")
        if tensors and dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "results.safetensors"))
        if mode == "fsdp":  # last: rank 1 leaves after the covariance pass (the launch fails)
            os.environ[FAULT_ENV] = "1"
            fit(inputs, out / "resumed", "fsdp")
        elif mode == "resume":
            fit(inputs, out / "resumed", "fsdp")
            fit(inputs, out / "bf16", "fsdp", torch.bfloat16, "float32")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads sometimes abort in static destructors at exit (see testing/distributed_check.py)

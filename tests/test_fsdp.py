"""Model-sharded attribution (PyTorch FSDP2 over torchrun, gloo on CPU): every stage that runs the model gives, on a
model sharded over 2 (and 4) processes, what one process gives on the whole model (float64 tiny Llama, and LoRA
adapters over it), with the factors owned by ranks (each writes its own weights' parts; a fit killed on one rank
resumes) and the questions sharded (each rank preconditions its own weights' slice of the query gradient).
Tolerance: relative 1e-9 of the largest entry (the sums are taken in another order across ranks); a bf16 model
with float32 statistics: 1e-4. Three launches (2, 2 and 4 processes): each costs seconds of imports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from concept_influence.curvature import load_factors
from concept_influence.curvature.budget import shared_input_key
from concept_influence.curvature.io import read_manifest
from concept_influence.distributed import weight_owners
from concept_influence.store.store import GradientStore
from concept_influence.testing import fsdp_check

pytest.importorskip("peft")

RTOL = 1e-9
BF16_RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, module: str, *args: str, env: dict[str, str] | None = None, check: bool = True):
    """``python -m torch.distributed.run --nproc_per_node N -m MODULE ARGS`` as users run it (gloo, 1 thread each)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        module,
        *args,
    ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(fsdp_check.__file__).resolve().parents[2]),
        **(env or {}),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=240)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and a 2-process launch of every stage (whose last fit rank 1 leaves after its covariance pass),
    then a 2-process launch that resumes that fit and fits a bf16 model: ``(root, single results)``."""
    root = tmp_path_factory.mktemp("fsdp")
    inputs = fsdp_check.write_inputs(root / "inputs")
    killed = torchrun(2, "concept_influence.testing.fsdp_check", str(inputs), str(root / "fsdp"), "fsdp", check=False)
    assert killed.returncode != 0 and "rank 1 exits after the covariance pass" in killed.stderr, killed.stderr[-4000:]
    resumed = torchrun(2, "concept_influence.testing.fsdp_check", str(inputs), str(root / "fsdp"), "resume")
    (root / "resume.log").write_text(resumed.stderr)
    single = fsdp_check.run(inputs, root / "single")
    return root, single


def _close_factors(one, two, rtol: float = RTOL) -> None:
    """Λ, the diagonal and the eigenvalues of ``two`` equal ``one``'s (relative to each tensor's largest entry)."""
    assert one.names == two.names and one.n_rows == two.n_rows and one.n_tokens == two.n_tokens
    for name in one.names:
        w1, w2 = one.weights[name], two.weights[name]
        pairs = [(getattr(w2, f), getattr(w1, f)) for f in ("eigenvalue_correction", "diagonal")]
        pairs += [(getattr(w2, f).values, getattr(w1, f).values) for f in ("activation_eigen", "gradient_eigen")]
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.slow  # the torchrun launches: about 90 s on two cores (make test runs them; test-fast does not)
def test_every_stage_on_a_sharded_model_equals_one_process(runs):
    root, single = runs
    sharded = load_file(str(root / "fsdp" / "results.safetensors"))
    assert (
        set(sharded)
        == set(single)
        == {
            "combined",
            "vector-filter",
            "projection-difference",
            "influence",
            "lora-influence",
            "concept-influence-exact",
        }
    )
    for key, value in single.items():
        _close(sharded[key], value)
    for folder in ("factors", "lora-factors"):
        one, two = load_factors(root / "single" / folder), load_factors(root / "fsdp" / folder)
        assert one.fingerprints == two.fingerprints  # the sharded model hashes as the whole one
        _close_factors(one, two)
        assert not (root / "fsdp" / folder / "parts").exists()  # the owners' parts are merged and removed
    # Concept Influence's exact pass through Attributor (its workdir's factors): each rank reads only its own
    # weights' tensors from the factors file, never the whole file
    factors = load_factors(root / "fsdp" / "factors")
    shapes = [(n, w.d_in, w.d_out, shared_input_key(n, False) or n) for n, w in factors.weights.items()]
    owners = weight_owners(shapes, 2)
    for rank in range(2):
        reads = json.loads((root / "fsdp" / f"exact-reads-{rank}.json").read_text())
        assert all(weights is not None for calls in reads.values() for weights in calls), (rank, reads)
        assert reads["influence"] and all(
            set(weights) <= {n for n in factors.names if owners[n] == rank} for weights in reads["influence"]
        ), (rank, reads)
    s1, s2 = GradientStore.open(root / "single" / "store"), GradientStore.open(root / "fsdp" / "store")
    assert s1.manifest["n_shards"] == s2.manifest["n_shards"] == 3
    a = np.concatenate([b for _, b in s1.blocks()])
    b = np.concatenate([b for _, b in s2.blocks()])
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * float(np.abs(a).max()))


@pytest.mark.slow  # the torchrun launches: about 90 s on two cores (make test runs them; test-fast does not)
def test_each_rank_writes_only_the_factors_it_owns(runs):
    """The part files of rank r hold the tensors of the weights r owns, and together every tensor of the factors."""
    root, _ = runs
    for folder in ("factors", "lora-factors"):
        factors = load_factors(root / "fsdp" / folder)
        shapes = [(name, w.d_in, w.d_out, shared_input_key(name, False) or name) for name, w in factors.weights.items()]
        owners = weight_owners(shapes, 2)
        assert set(owners.values()) == {0, 1}
        parts = {
            (int(p.name.split("-")[1]), p.name): load_file(str(p))
            for p in (root / "fsdp" / "kept-parts" / folder).glob("rank-*.safetensors")
        }
        assert parts and {rank for rank, _ in parts} == {0, 1}
        for name, w in factors.weights.items():
            wanted = {
                "eigenvalue_correction": w.eigenvalue_correction,
                "diagonal": w.diagonal,
                "activation_eigen": w.activation_eigen.vectors,
                "gradient_eigen": w.gradient_eigen.vectors,
            }
            for what, tensor in wanted.items():
                holders = {
                    rank
                    for (rank, _), tensors in parts.items()
                    for t in tensors.values()
                    if t.shape == tensor.shape and torch.equal(t, tensor)
                }
                assert holders == {owners[name]}, (folder, name, what, holders, owners[name])


@pytest.mark.slow  # the torchrun launches: about 90 s on two cores (make test runs them; test-fast does not)
def test_a_fit_killed_on_one_rank_resumes_to_the_same_factors(runs):
    root, _ = runs
    log = (root / "resume.log").read_text()
    assert "resuming partition 0, eigen pass" in log and "fitting from the start" not in log
    _close_factors(load_factors(root / "single" / "factors"), load_factors(root / "fsdp" / "resumed"))
    assert not (root / "fsdp" / "resumed" / "parts").exists()


@pytest.mark.slow  # the torchrun launches: about 90 s on two cores (make test runs them; test-fast does not)
def test_bf16_model_with_float32_statistics_sharded_equals_one_process(runs):
    """Tolerance 1e-4 of each tensor's largest entry (1.2e-6 seen): the float32 statistics are summed in another
    order and each rank batches its own share of the rows (other padding lengths for the bf16 matmuls)."""
    root, _ = runs
    fsdp_check.fit(root / "inputs", root / "single-bf16", "none", torch.bfloat16, "float32")
    one, two = load_factors(root / "single-bf16"), load_factors(root / "fsdp" / "bf16")
    assert one.config.dtype == two.config.dtype == "float32"
    _close_factors(one, two, rtol=BF16_RTOL)


@pytest.mark.slow  # the torchrun launches: about 90 s on two cores (make test runs them; test-fast does not)
def test_four_processes_own_and_score_like_one(runs):
    """4 ranks, the fit in two partitions (what a small --max-memory asks for: each partition's sums reduced to
    their owners after its pass), each rank scoring with only its own weights' factors and query-vector slice (for a
    direction at layer 0, two ranks own none of the weights reached), give the single process's factors and
    influence scores, also through the memory-bounded pass (--max-memory, in two partitions) and several questions
    in one pass (compute_influence_many)."""
    root, single = runs
    torchrun(4, "concept_influence.testing.fsdp_check", str(root / "inputs"), str(root / "four"), "owners")
    factors = load_factors(root / "four" / "factors")
    assert read_manifest(root / "four" / "factors")["partitions"] == 2
    _close_factors(load_factors(root / "single" / "factors"), factors)
    four = load_file(str(root / "four" / "results.safetensors"))
    _close(four["influence"], single["influence"])
    adapter = fsdp_check.sharded_adapter(root / "inputs" / "model", torch.float64, "none")
    train = fsdp_check.train_rows(root / "inputs", adapter)
    _close(
        four["influence-layer-0"],
        fsdp_check.layer_0_scores(root / "inputs", adapter, train, root / "single" / "factors"),
    )
    shapes = [(n, w.d_in, w.d_out, shared_input_key(n, False) or n) for n, w in factors.weights.items()]
    owners = weight_owners(shapes, 4)
    read = [json.loads((root / "four" / f"factor-reads-{rank}.json").read_text()) for rank in range(4)]
    for rank, reads in enumerate(read):
        assert reads == [sorted(n for n in factors.names if owners[n] == rank)] or reads == [
            [n for n in factors.names if owners[n] == rank]
        ]
    # the memory-bounded pass (--max-memory) in two partitions: each rank reads the factors of and preconditions
    # only its own weights, one at a time (the others' vectors arrive one at a time inside the backward)
    _close(four["influence-bounded"], single["influence"])
    for rank in range(4):
        bounded = json.loads((root / "four" / f"bounded-{rank}.json").read_text())
        own = sorted(n for n in factors.names if owners[n] == rank)
        assert own and sorted(bounded["vectors"]) == own, (rank, bounded)
        assert sorted(n for names in bounded["reads"] for n in names) == own
        assert all(len(names) == 1 for names in bounded["reads"])
    # several questions in one pass (compute_influence_many): each rank preconditions only its own weights' slices
    for suffix in ("", "-folder"):
        _close(four[f"many-concept{suffix}"], single["influence"])
        _close(four[f"many-layer-0{suffix}"], four["influence-layer-0"])
    for rank in range(4):
        formed = json.loads((root / "four" / f"many-{rank}.json").read_text())
        assert formed and set(formed) <= {n for n in factors.names if owners[n] == rank}, (rank, formed)
        reads = json.loads((root / "four" / f"many-reads-{rank}.json").read_text())
        assert len(reads) == 1 and set(reads[0]) <= {n for n in factors.names if owners[n] == rank}, (rank, reads)


def test_owners_are_balanced_deterministic_and_keep_shared_inputs_together():
    weights = [
        ("blocks.0.attn.q", 16, 16, "blocks.0.attn.in"),
        ("blocks.0.attn.k", 16, 8, "blocks.0.attn.in"),
        ("blocks.0.attn.v", 16, 8, "blocks.0.attn.in"),
        ("blocks.0.attn.o", 16, 16, "blocks.0.attn.o"),
        ("blocks.0.mlp.gate", 16, 64, "blocks.0.mlp.in"),
        ("blocks.0.mlp.in", 16, 64, "blocks.0.mlp.in"),
        ("blocks.0.mlp.out", 64, 16, "blocks.0.mlp.out"),
    ]
    owners = weight_owners(weights, 2)
    assert owners == weight_owners(list(weights), 2)
    assert owners["blocks.0.attn.q"] == owners["blocks.0.attn.k"] == owners["blocks.0.attn.v"]
    assert owners["blocks.0.mlp.gate"] == owners["blocks.0.mlp.in"]
    assert set(owners.values()) == {0, 1}
    assert set(weight_owners(weights, 1).values()) == {0}

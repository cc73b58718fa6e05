"""Model-sharded attribution (PyTorch FSDP2 over torchrun, gloo on CPU): every stage that runs the model gives, on a
model sharded over 2 processes, what one process gives on the whole model (float64 tiny Llama, and LoRA adapters
over it). Tolerance: relative 1e-9 of the largest score (the sums are taken in another order across ranks)."""

from __future__ import annotations

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
from concept_influence.distributed import weight_owners
from concept_influence.store.store import GradientStore
from concept_influence.testing import fsdp_check

pytest.importorskip("peft")

RTOL = 1e-9


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


def test_every_stage_on_a_sharded_model_equals_one_process(tmp_path):
    inputs = fsdp_check.write_inputs(tmp_path / "inputs")
    torchrun(2, "concept_influence.testing.fsdp_check", str(inputs), str(tmp_path / "fsdp"), "fsdp")
    single = fsdp_check.run(inputs, tmp_path / "single")
    sharded = load_file(str(tmp_path / "fsdp" / "results.safetensors"))
    assert (
        set(sharded)
        == set(single)
        == {
            "combined",
            "vector-filter",
            "projection-difference",
            "influence",
            "lora-influence",
        }
    )
    for key, value in single.items():
        _close(sharded[key], value)
    for folder in ("factors", "lora-factors"):
        one, two = load_factors(tmp_path / "single" / folder), load_factors(tmp_path / "fsdp" / folder)
        assert one.fingerprints == two.fingerprints  # the sharded model hashes as the whole one
        assert one.names == two.names and one.n_rows == two.n_rows and one.n_tokens == two.n_tokens
        for name in one.names:
            for fld in ("eigenvalue_correction", "diagonal"):
                _close(getattr(two.weights[name], fld), getattr(one.weights[name], fld))
            _close(two.weights[name].activation_eigen.values, one.weights[name].activation_eigen.values)
            _close(two.weights[name].gradient_eigen.values, one.weights[name].gradient_eigen.values)
    s1, s2 = GradientStore.open(tmp_path / "single" / "store"), GradientStore.open(tmp_path / "fsdp" / "store")
    assert s1.manifest["n_shards"] == s2.manifest["n_shards"] == 3
    a = np.concatenate([b for _, b in s1.blocks()])
    b = np.concatenate([b for _, b in s2.blocks()])
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * float(np.abs(a).max()))


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

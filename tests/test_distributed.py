"""Multi-process (torchrun, gloo on CPU, 2 processes): factors fitted over sharded rows with all-reduce, a gradient
store whose shards each rank writes, and scores computed over sharded rows equal the single-process ones."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from concept_influence.curvature import load_factors
from concept_influence.store.store import GradientStore
from concept_influence.testing import distributed_check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_fit_and_scores_equal_one_process(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(distributed_check.__file__).resolve().parents[2]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "concept_influence.testing.distributed_check",
        str(tmp_path / "dist"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = distributed_check.run(tmp_path / "single")
    multi = load_file(str(tmp_path / "dist" / "scores.safetensors"))
    assert set(multi) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(multi[key], value, rtol=1e-8, atol=1e-12)
    s1, s2 = GradientStore.open(tmp_path / "single" / "store"), GradientStore.open(tmp_path / "dist" / "store")
    assert s1.manifest["n_shards"] == s2.manifest["n_shards"] == 4
    one, two = np.concatenate([b for _, b in s1.blocks()]), np.concatenate([b for _, b in s2.blocks()])
    np.testing.assert_allclose(two, one, rtol=1e-8, atol=1e-12 * float(np.abs(one).max()))
    f1, f2 = load_factors(tmp_path / "single" / "factors"), load_factors(tmp_path / "dist" / "factors")
    assert f1.n_rows == f2.n_rows == 11 and f1.n_tokens == f2.n_tokens
    for name in f1.names:
        for fld in ("eigenvalue_correction", "diagonal"):
            torch.testing.assert_close(
                getattr(f2.weights[name], fld), getattr(f1.weights[name], fld), rtol=1e-8, atol=1e-14
            )
        torch.testing.assert_close(
            f2.weights[name].activation_eigen.values, f1.weights[name].activation_eigen.values, rtol=1e-8, atol=1e-12
        )

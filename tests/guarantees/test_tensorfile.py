"""tensorfile: safetensors files read through one descriptor equal safetensors' own reading, and a file that is not
whole raises DamagedFileError naming it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from concept_influence.tensorfile import DamagedFileError, read_tensor_file, read_tensor_metadata


@pytest.fixture
def mixed(tmp_path):
    tensors = {
        "a": torch.randn(3, dtype=torch.float32),
        "b": torch.randn(2, 5, dtype=torch.float64),
        "c": torch.arange(7, dtype=torch.int16),
        "d": torch.randn(4).to(torch.bfloat16),
        "e": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"state": '{"stage": "lambda"}'})
    return path, tensors


def test_reads_every_dtype_and_offset_as_safetensors_does(mixed):
    path, tensors = mixed
    read = read_tensor_file(path)
    assert read.metadata == {"state": '{"stage": "lambda"}'} == read_tensor_metadata(path)
    reference = load_file(str(path))
    assert set(read.tensors) == set(tensors)
    for name, value in reference.items():
        assert read.tensors[name].dtype == value.dtype and torch.equal(read.tensors[name], value), name
    read.tensors["b"].add_(1)  # writable, copy-on-write: the file is unchanged
    assert torch.equal(load_file(str(path))["b"], reference["b"])


def test_selects_tensors_by_name_or_predicate(mixed):
    path, _ = mixed
    assert set(read_tensor_file(path, ["a", "c"]).tensors) == {"a", "c"}
    assert set(read_tensor_file(path, lambda name: name in ("b", "e")).tensors) == {"b", "e"}
    with pytest.raises(KeyError, match="nope"):
        read_tensor_file(path, ["a", "nope"])


@pytest.mark.parametrize("cut", [1, 8, 100])
def test_a_truncated_or_garbled_file_is_named_in_the_error(mixed, cut):
    path, _ = mixed
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(DamagedFileError, match=str(path)):
        read_tensor_file(path)
    path.write_bytes(data[:8] + b"{" * 40 + data[48:])
    with pytest.raises(DamagedFileError, match="not valid JSON"):
        read_tensor_metadata(path)
    path.write_bytes(b"\x01")
    with pytest.raises(DamagedFileError, match="too short"):
        read_tensor_file(path)

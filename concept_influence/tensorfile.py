"""Reading safetensors files through one open descriptor, so a reader never mixes two versions of a file.

safetensors' own readers open a file by its path twice (once for the header, once to map the data): when a writer
atomically replaces the file between the two opens, the reader maps the new file with the old header's sizes
(``RuntimeError: ... is smaller than the required mapping size``) or, worse, reads the new data with the old
layout. Checkpoints and factors are replaced while a fit runs and are read by monitors and resumed fits, so they are
read here instead: one ``open``, the header parsed and checked against the file's size, the data mapped
copy-on-write from the same descriptor. A file that is not whole raises ``DamagedFileError`` naming it.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header's size


class DamagedFileError(ValueError):
    """A tensor file that is truncated, malformed or not a safetensors file."""


@dataclass(frozen=True)
class TensorFile:
    """The tensors of one file (``name -> tensor``, writable copy-on-write views of the file) and its string
    metadata (the safetensors ``__metadata__``)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _read_header(handle: Any, path: Path, size: int) -> tuple[dict[str, Any], int]:
    """The parsed header of an open file and where its data begins."""
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise DamagedFileError(f"{path}: {size} bytes, too short for a safetensors header (the file is damaged)")
    length = int.from_bytes(prefix, "little")
    if length > _MAX_HEADER or 8 + length > size:
        raise DamagedFileError(
            f"{path}: the header claims {length} bytes but the file has {size} (the file is damaged or truncated)"
        )
    try:
        header = json.loads(handle.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(f"{path}: the header is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path}: the header is not a JSON object; the file is damaged")
    return header, 8 + length


def _entries(header: dict[str, Any], path: Path, data_size: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DamagedFileError(
                f"{path}: the header's entry for {name!r} is malformed; the file is damaged"
            ) from None
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
            raise DamagedFileError(
                f"{path}: tensor {name!r} needs bytes {begin}..{end} of {data_size} data bytes "
                "(the file is damaged or truncated)"
            )
        entries[name] = (dtype, shape, begin, end)
    return entries


def read_tensor_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (its header's ``__metadata__``), read through one descriptor and
    checked against the file's size. Raises ``DamagedFileError`` if the file is not whole."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        header, start = _read_header(handle, path, size)
    _entries(header, path, size - start)
    return dict(header.get("__metadata__") or {})


def read_tensor_file(path: str | os.PathLike, keys: Iterable[str] | Callable[[str], bool] | None = None) -> TensorFile:
    """The tensors (all, those named in ``keys``, or those whose name ``keys(name)`` accepts) and metadata of a
    safetensors file, read through one open descriptor. Tensors are copy-on-write maps of the file: no copy is made
    until one is written to, and a writer
    replacing the file later does not change them. Raises ``DamagedFileError`` if the file is not whole and
    ``KeyError`` for a key the file does not hold."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        header, start = _read_header(handle, path, size)
        entries = _entries(header, path, size - start)
        if keys is None:
            wanted = list(entries)
        elif callable(keys):
            wanted = [k for k in entries if keys(k)]
        else:
            wanted = list(keys)
        missing = [k for k in wanted if k not in entries]
        if missing:
            raise KeyError(f"{path} holds no tensors named {missing}")
        tensors: dict[str, torch.Tensor] = {}
        if any(entries[k][3] > entries[k][2] for k in wanted):
            mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
            data = torch.frombuffer(mapped, dtype=torch.uint8)  # the map lives as long as a tensor refers to it
        for key in wanted:
            dtype, shape, begin, end = entries[key]
            if end == begin:
                tensors[key] = torch.empty(shape, dtype=dtype)
            else:
                raw = data[start + begin : start + end]
                if (start + begin) % dtype.itemsize:  # an unaligned tensor (mixed dtypes): copied, then viewed
                    raw = raw.clone()
                tensors[key] = raw.view(dtype).view(shape)
    return TensorFile(tensors, dict(header.get("__metadata__") or {}))

"""NpyRowWriter: the store's shard writer (direct I/O from an aligned staging buffer, buffered fallback)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from concept_influence.store.shardfile import ALIGN, NpyRowWriter, npy_header


def _write(
    path: Path,
    array: np.ndarray,
    block_rows: int,
    *,
    direct: bool = True,
    background: bool = True,
    dtype=None,
    read_back: bool = False,
) -> NpyRowWriter:
    dtype = np.dtype(dtype or array.dtype)
    with NpyRowWriter(
        path,
        dtype,
        array.shape[0],
        array.shape[1],
        block_rows,
        direct=direct,
        background=background,
        read_back=read_back,
    ) as writer:
        for lo in range(0, array.shape[0], block_rows):
            part = torch.from_numpy(array[lo : lo + block_rows])
            writer.block(part.shape[0]).copy_(part)
            writer.commit(part.shape[0])
    return writer


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("read_back", [False, True])
def test_rows_written_in_blocks_read_back_exactly(tmp_path, direct, background, dtype, read_back):
    """``read_back``: each written block is read again through the page cache by the writer (the file is the same;
    its descriptors are closed)."""
    # 1001 columns: no row ends on an aligned offset, and the last block is short (37 = 7 * 5 + 2)
    array = np.random.default_rng(0).standard_normal((37, 1001)).astype(dtype)
    path = tmp_path / "a.npy"
    writer = _write(path, array, 5, direct=direct, background=background, read_back=read_back)
    assert writer._fd == -1 and writer._reader == -1
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), array)
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    assert mapped.shape == array.shape and mapped.dtype == array.dtype and mapped.offset == ALIGN
    np.testing.assert_array_equal(mapped, array)
    assert os.path.getsize(path) == ALIGN + array.nbytes


def test_blocks_are_converted_to_the_stored_dtype(tmp_path):
    array = np.random.default_rng(1).standard_normal((9, 300)).astype(np.float32)
    path = tmp_path / "h.npy"
    _write(path, array, 4, dtype=np.float16)
    np.testing.assert_array_equal(np.load(path), array.astype(np.float16))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform (always buffered)")
@pytest.mark.parametrize("refuses", ["open", "write"])
def test_a_file_system_that_refuses_direct_io_is_written_buffered(tmp_path, monkeypatch, refuses):
    import errno

    from concept_influence.store import shardfile

    real_open, real_pwrite, direct_writes = os.open, os.pwrite, []

    def fake_open(path, flags, *args):
        if refuses == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def fake_pwrite(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes.append(offset)
            if refuses == "write":
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shardfile.os, "open", fake_open)
    monkeypatch.setattr(shardfile.os, "pwrite", fake_pwrite)
    array = np.random.default_rng(2).standard_normal((12, 333)).astype(np.float32)
    writer = _write(tmp_path / "b.npy", array, 5)
    assert not writer.direct
    assert direct_writes == ([] if refuses == "open" else [0])  # one refused direct write, then buffered
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), array)


def test_missing_or_extra_rows_are_errors(tmp_path):
    writer = NpyRowWriter(tmp_path / "m.npy", np.float32, 4, 10, 2)
    writer.block(2).fill_(1.0)
    writer.commit(2)
    with pytest.raises(RuntimeError, match="2 of 4 rows written"):
        writer.close()
    with NpyRowWriter(tmp_path / "x.npy", np.float32, 3, 10, 4) as writer:
        with pytest.raises(ValueError, match="exceed the array's 3 rows"):
            writer.block(4)
        writer.block(3).zero_()
        writer.commit(3)
    with pytest.raises(ValueError, match="exceeds the staging buffer"):
        NpyRowWriter(tmp_path / "y.npy", np.float32, 100, 4096, 2).block(3)


def test_header_is_a_valid_padded_npy_header():
    header = npy_header(np.dtype(np.float32), (3, 5))
    assert len(header) == ALIGN and header.endswith(b"\n")
    import io

    stream = io.BytesIO(header + np.zeros(15, np.float32).tobytes())
    assert np.lib.format.read_magic(stream) == (1, 0)
    assert np.lib.format.read_array_header_1_0(stream) == ((3, 5), False, np.dtype(np.float32))


def test_a_failed_background_write_is_raised_and_the_file_left_to_the_caller(tmp_path, monkeypatch):
    import errno

    from concept_influence.store import shardfile

    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shardfile.os, "pwrite", full_disk)
    array = np.ones((10, 2000), dtype=np.float32)
    with pytest.raises(OSError, match="No space left"):
        _write(tmp_path / "f.npy", array, 3)


def test_without_pwrite_the_writer_seeks_and_writes(tmp_path, monkeypatch):
    from concept_influence.store import shardfile

    monkeypatch.delattr(shardfile.os, "pwrite")
    array = np.random.default_rng(3).standard_normal((11, 700)).astype(np.float32)
    _write(tmp_path / "w.npy", array, 4)
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), array)

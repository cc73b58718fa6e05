"""Writing one ``.npy`` array row block after row block, with direct I/O where the file system allows it.

A store shard is written once and read later through a memory map. Buffered writes put every byte through newly
allocated page-cache pages; on the measured machine (a VM whose fresh guest pages are first faulted in by the
host) that cost 1-2 s per GB and varied fivefold from run to run, more than the disk write itself
(``bench/store_scaling.py``). ``NpyRowWriter`` instead writes from two reused, page-aligned staging buffers with
``O_DIRECT`` (Linux): the rows go from that buffer to the disk, and the page cache is neither filled nor polluted;
the write of one block runs in a worker thread while the next block is computed.
The price: the shard's pages are not cached afterwards, so the first read of a fresh store comes from the disk;
with ``read_back`` the worker thread reads each block back through the page cache right after writing it (the
store's first question then reads memory; ``store.caches`` asks for it where the store fits the machine's memory),
on another core while the next block is computed, instead of in a pass over the store after the build.
Where ``O_DIRECT`` is missing or refused (macOS, tmpfs, some network file systems) the same code writes buffered.

The file is a plain ``.npy`` (format 1.0) whose header is padded to ``ALIGN`` bytes so that the data starts on an
aligned offset; ``numpy.load`` reads it like any other.
"""

from __future__ import annotations

import contextlib
import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ALIGN = 4096  # offset, length and address alignment of direct I/O (covers 512-byte and 4 KiB sector devices)
_MAGIC = b"\x93NUMPY\x01\x00"


def npy_header(dtype: np.dtype, shape: tuple[int, ...], size: int = ALIGN) -> bytes:
    """A ``.npy`` format 1.0 header for a C-ordered array, padded with spaces to a multiple of ``size`` bytes."""
    body = (
        "{"
        + "".join(
            f"{k!r}: {v!r}, "
            for k, v in sorted(
                {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}.items()
            )
        )
        + "}"
    )
    total = -(-(len(_MAGIC) + 2 + len(body) + 1) // size) * size
    length = total - len(_MAGIC) - 2
    if length > 0xFFFF:
        raise ValueError(f"npy header of {length} bytes does not fit format 1.0")
    return _MAGIC + length.to_bytes(2, "little") + (body.ljust(length - 1) + "\n").encode("latin1")


class NpyRowWriter:
    """Write a ``[rows, cols]`` array of ``dtype`` to ``path`` in row blocks of at most ``block_rows`` rows.

    ``block(n)`` returns a writable ``[n, cols]`` tensor view of a staging buffer (fill it, then ``commit(n)``);
    ``close()`` writes the tail, checks that every row was written and ``fsync``s the file. Use as a context manager.
    With ``background`` (default) there are two staging buffers: while one block is written to the disk by a
    worker thread (the write releases the GIL), the next one is filled.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dtype: np.dtype | type,
        rows: int,
        cols: int,
        block_rows: int,
        *,
        direct: bool = True,
        background: bool = True,
        read_back: bool = False,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.rows, self.cols = int(rows), int(cols)
        self.written = 0
        header = npy_header(self.dtype, (self.rows, self.cols))
        row_bytes = self.cols * self.dtype.itemsize
        capacity = -(-(max(len(header), ALIGN) + max(1, block_rows) * row_bytes) // ALIGN) * ALIGN
        self._buffers = [_aligned(capacity) for _ in range(2 if background else 1)]
        self._staging = self._buffers[0]  # the buffer being filled
        self._staging[: len(header)] = np.frombuffer(header, dtype=np.uint8)
        self._pending = len(header)  # bytes staged in it but not yet written
        self._offset = 0  # bytes handed to the writes so far
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-shard-writer") if background else None
        self._inflight: Future[None] | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(self.path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as error:
            if not self.direct or error.errno != errno.EINVAL:
                raise
            self.direct = False
            self._fd = os.open(self.path, flags, 0o644)
        self._size = len(header) + self.rows * row_bytes
        self._reader = -1  # a buffered descriptor of the same file, for read_back
        self._scratch: np.ndarray | None = None
        if read_back:
            self._reader = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
            self._scratch = np.empty(1 << 20, dtype=np.uint8)

    def block(self, n: int) -> torch.Tensor:
        """A writable ``[n, cols]`` view (``dtype``) of the staging buffer for the next ``n`` rows."""
        if n > self.rows - self.written:
            raise ValueError(f"{self.path}: {n} more rows would exceed the array's {self.rows} rows")
        end = self._pending + n * self.cols * self.dtype.itemsize
        if end > self._staging.size:
            raise ValueError(f"{self.path}: a block of {n} rows exceeds the staging buffer")
        return torch.from_numpy(self._staging[self._pending : end].view(self.dtype).reshape(n, self.cols))

    def commit(self, n: int) -> None:
        """Write out the ``n`` rows filled in ``block(n)`` (whole aligned pages; the rest waits for the next block)."""
        self._pending += n * self.cols * self.dtype.itemsize
        self.written += n
        whole = self._pending // ALIGN * ALIGN
        if not whole:
            return
        full, tail = self._staging, self._pending - whole
        if self._pool is None:  # one buffer: write it, then move the tail to its front
            self._write(full, whole, self._offset)
            following = full
        else:
            self._wait()  # the other buffer's write is done: it can take the tail and the next block
            following = self._buffers[1] if full is self._buffers[0] else self._buffers[0]
            self._inflight = self._pool.submit(self._write, full, whole, self._offset)
        following[:tail] = full[whole : self._pending]
        self._offset += whole
        self._staging, self._pending = following, tail

    def _wait(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.result()  # re-raises the write's error here

    def _write(self, buffer: np.ndarray, length: int, offset: int) -> None:
        view = memoryview(buffer[:length])  # type: ignore[arg-type]
        done = 0
        while done < length:
            try:
                if hasattr(os, "pwrite"):
                    done += os.pwrite(self._fd, view[done:], offset + done)
                else:  # Windows: only the writer thread moves the file position
                    os.lseek(self._fd, offset + done, os.SEEK_SET)
                    done += os.write(self._fd, view[done:])
            except OSError as error:  # a file system that opens with O_DIRECT but refuses its writes
                if not self.direct or error.errno != errno.EINVAL:
                    raise
                self._buffered()
        if self._reader >= 0 and self.direct:  # buffered writes leave their pages cached already
            self._read_back(offset, length)

    def _read_back(self, offset: int, length: int) -> None:
        """Read ``length`` bytes at ``offset`` through the page cache (they stay cached there)."""
        assert self._scratch is not None
        view = memoryview(self._scratch)  # type: ignore[arg-type]
        end = offset + length
        while offset < end:
            got = os.preadv(self._reader, [view[: min(len(view), end - offset)]], offset)
            if got <= 0:
                break
            offset += got

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self) -> None:
        """Write the last partial page (padded, then the file is cut to its size) and ``fsync``."""
        if self._fd < 0:
            return
        try:
            self._wait()
            if self.written != self.rows:
                raise RuntimeError(f"{self.path}: {self.written} of {self.rows} rows written")
            if self._pending:
                padded = -(-self._pending // ALIGN) * ALIGN if self.direct else self._pending
                self._staging[self._pending : padded] = 0
                self._write(self._staging, padded, self._offset)
                os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop without finishing the file (the caller removes it)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self._wait()
            self._release()

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        os.close(self._fd)
        self._fd = -1
        if self._reader >= 0:
            os.close(self._reader)
            self._reader = -1

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _aligned(nbytes: int) -> np.ndarray:
    """``nbytes`` of uint8 starting on an ``ALIGN`` boundary."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]

"""File safety: atomic files and folders, folder locks, safe names: the one place artifacts are written from.

A utility below every stage (it imports nothing of the package); ``data.atomic`` re-exports it for old imports.

- ``atomic_file(path)`` yields a uniquely named temp path in the same folder and renames it over ``path`` on
  success (removed on failure): a reader sees the old file or the new one, never a partial one, and two writers
  never share a temp file.
- ``atomic_folder(path)`` does the same for a folder; ``replace_folder`` swaps a finished folder into place with
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so there is no moment without a folder at ``path``.
- ``folder_lock(path)`` is an exclusive ``flock`` on ``.<name>.lock`` next to ``path``: writers of one factors
  folder, gradient store, answer cache or organism build take turns.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temp path next to ``path``; on a clean exit flush it to disk (fsync), rename it over ``path``
    and flush the folder's entry (else delete it). A reader, a resumed run or a machine that lost power sees the old
    file or the whole new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _give_mode(tmp, path, 0o666)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def current_umask() -> int:
    """The process's umask (read from /proc where it is shown, so no other thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_mode(tmp: Path, path: Path, default: int) -> None:
    """A temp file or folder (made private by mkstemp/mkdtemp) gets the mode of what it replaces, or for a new
    ``path`` the mode a plain ``open``/``mkdir`` would give (``default`` less the umask)."""
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = default & ~current_umask()
    os.chmod(tmp, mode)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        write(handle)
    return Path(path)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path:
    """Write JSON objects one per line to ``path`` atomically (temp file in the same folder, then rename)."""

    def write(handle: Any) -> None:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")

    return _atomic_write(path, write)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, exactly as given (no newline translation)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write one JSON document atomically."""

    def write(handle: Any) -> None:
        json.dump(obj, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")

    return _atomic_write(path, write)


# ---- folders -------------------------------------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where the call is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: file system or kernel without exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def replace_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there; ``tmp`` is gone afterwards.

    On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``: ``path`` always holds either the old or the new
    folder. Elsewhere the old folder is renamed aside first (a brief gap), then removed.
    """
    tmp, path = Path(tmp), Path(path)
    if not path.exists():
        try:
            os.rename(tmp, path)
            return path
        except OSError:
            if not path.exists():
                raise
            # another writer put a folder there meanwhile: swap with it below
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the old folder
        return path
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, backup / "old")
    os.rename(tmp, path)
    shutil.rmtree(backup, ignore_errors=True)
    return path


def temp_folder(path: str | os.PathLike) -> Path:
    """A new uniquely named empty folder next to ``path`` (same file system, so it can be renamed onto it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder next to ``path``; on a clean exit it replaces ``path`` (else it is deleted)."""
    tmp = temp_folder(path)
    try:
        yield tmp
        _give_mode(tmp, Path(path), 0o777)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temp_of(name: str, artifacts: Iterable[str]) -> bool:
    """Whether ``name`` is a temp file or folder that ``atomic_file``/``temp_folder`` makes for one of
    ``artifacts``: ``.<artifact>.<8 random characters>.tmp``."""
    import re

    match = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.tmp", name)
    return match is not None and match.group(1) in set(artifacts)


def remove_stale_temps(folder: str | os.PathLike, prefix: str = ".", *, names: Iterable[str] | None = None) -> int:
    """Delete temp files and folders (``<prefix>*.tmp``, as made by ``atomic_file``/``temp_folder``) left in
    ``folder`` by a killed writer. Call only while holding the folder's lock (no live writer then). Returns how
    many were removed.

    ``names``: only the temps of these artifacts (``.<name>.<8 random characters>.tmp``, exactly as
    ``atomic_file(folder / name)`` names them): a folder that may hold files that are not the library's loses
    nothing else."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    if names is None:
        found = list(folder.glob(f"{glob_escape(prefix)}*.tmp"))
    else:
        wanted = set(names)
        found = [p for p in folder.iterdir() if is_temp_of(p.name, wanted)]
    removed = 0
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks (any size)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file or folder: resolved (symlinks followed), and by ``os.path.samefile``
    (hard links) where both exist."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: compare the absolute paths
        if Path(os.path.abspath(a)) == Path(os.path.abspath(b)):
            return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def file_in_folder(folder: str | os.PathLike, name: Any, what: str) -> Path:
    """``folder / name`` for a file name read from a manifest, checkpoint or metadata file (``what`` names it in
    the error): a plain name that stays inside ``folder`` (no absolute path, no ``..``, no separator), so metadata
    can never choose where we read or write. Raises ``ValueError``."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or Path(name).name != name
        or "/" in name
        or "\\" in name
        or Path(name).is_absolute()
    ):
        raise ValueError(
            f"{what}: {name!r} is not a plain file name inside {folder} (the file is damaged or was edited by hand)"
        )
    return Path(folder) / name


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def safe_name(text: str, *, fallback: str = "unnamed") -> str:
    """``text`` made safe as one file or folder name: only letters, digits, ``.``, ``_`` and ``-`` (anything else
    becomes ``-``), no leading dot, at most 80 characters. Names that come from data (a spec's ``name``, a row's
    ``id``) go through this before they become part of a path, so data can never choose where we write."""
    cleaned = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "-" for c in str(text))
    return cleaned.lstrip(".-")[:80].rstrip("-") or fallback


# ---- locks ---------------------------------------------------------------------------------------------------------
def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, *, what: str = "folder") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<name>.lock`` next to ``path`` (waits, saying so, if another process
    holds it; a no-op where ``fcntl`` is missing). The lock is released when the holder exits or is killed."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    file = lock_path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another process is writing the %s %s: waiting for it to finish", what, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


MAX_JSON_FILE_BYTES = 256 * 2**20
"""The largest JSON file (a manifest, spec, concept or scores sidecar) ``read_json_file`` reads (256 MiB)."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (a number must be finite)")


def read_json_file(path: str | os.PathLike, *, error: type[ValueError] = ValueError, object_only: bool = True) -> Any:
    """A JSON file, strictly: not UTF-8, malformed, ``NaN``/``Infinity``, nested too deeply, larger than
    ``MAX_JSON_FILE_BYTES`` or (``object_only``) not a JSON object is one ``error`` naming the file."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_FILE_BYTES:
        raise error(f"{path}: {size:,} bytes, larger than any JSON file this library writes ({MAX_JSON_FILE_BYTES:,})")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); expected a JSON file") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except ValueError as err:
        raise error(f"{path}: {err}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None
    if object_only and not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def damaged(path: str | os.PathLike, err: BaseException, what: str, error: type[ValueError] = ValueError) -> ValueError:
    """The one-line error for a file whose fields have the wrong type or are missing (``KeyError``/``TypeError``
    met while reading it)."""
    detail = f"missing {err.args[0]!r}" if isinstance(err, KeyError) and err.args else f"{type(err).__name__}: {err}"
    return error(f"{path}: not a valid {what} ({detail})")

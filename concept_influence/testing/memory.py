"""The process's own memory while the caches are built (issue 17: flat in the number of rows).

``build_memory`` runs in a child process (``testing.processes.child_context``) and measures how far the process's
resident memory rises above where it stood just before ``Attributor.build_store()``: Linux's peak resident set
(``VmHWM``) is reset to the current one (``/proc/self/clear_refs``) right before the build and read right after.
Everything the session needs before the build (the model, the tokenised rows, their fingerprint) is made first, so
what is measured is the build's own working memory: batches, one shard's staging buffers, the sample's factors. The
shards the build writes go to the disk (the page cache is not the process's memory) and are memory-mapped when
opened, untouched. ``bench/cache_memory.py`` compares it across row counts on the organism, and
``tests/store/test_cache_memory.py`` on a tiny model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def can_measure() -> bool:
    """Whether this system can reset and read the peak resident set (Linux, ``/proc`` writable)."""
    return STATUS.exists() and CLEAR_REFS.exists() and os.access(CLEAR_REFS, os.W_OK)


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Reset the peak resident set to the current one; return the current one (bytes)."""
    CLEAR_REFS.write_text("5")
    return _status_kib("VmRSS") * 1024


def peak() -> int:
    """The peak resident set since the last ``reset_peak`` (bytes)."""
    return _status_kib("VmHWM") * 1024


def steady_allocator() -> bool:
    """glibc only: serve every allocation above 128 KiB by its own mapping, returned on free, from one arena (no
    sliding mmap threshold, no per-thread arenas), so that the resident set follows the memory actually held rather
    than the allocator's history (which moved the same build's peak by ±16 MiB from run to run). Returns whether it
    applied. Call it first thing in a fresh process."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_mmap_threshold, 128 << 10), (m_trim_threshold, 128 << 10), (m_arena_max, 1))
    )


def build_memory(
    rows: int,
    *,
    organism: bool = False,
    hidden: int = 64,
    layers: int = 2,
    shard_rows: int = 16,
    batch_size: int = 8,
    sample_rows: int = 32,
    threads: int = 1,
    folder: str | None = None,
) -> dict[str, Any]:
    """Build the recommended method's caches (activation cache + identity store) for ``rows`` rows and return
    ``{"rows", "rss_before", "peak", "growth", "cache_bytes"}`` (bytes; ``growth = peak - rss_before``).
    ``organism``: the built-in organism's fine-tuned model and its first ``rows`` training rows; else a seeded tiny
    Llama (``hidden``, ``layers``) on copies of the tiny chats. Run it in a fresh child process per measurement."""
    steady_allocator()
    import torch

    from concept_influence.pipeline import Attributor
    from concept_influence.store.caches import CacheSettings

    torch.set_num_threads(threads)
    work = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="cache-memory-"))
    if organism:
        from concept_influence.organism.build import organism_for_tests

        built = organism_for_tests()
        model: Any = built.root / "finetuned"
        data = built.train_rows()[:rows]
        max_length = 256
    else:
        from concept_influence.models import HFAdapter
        from concept_influence.testing.chats import TINY_PAIRS, chat_rows
        from concept_influence.testing.tiny_models import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = HFAdapter(tiny_llama(len(tokenizer), hidden=hidden, layers=layers, intermediate=2 * hidden), tokenizer)
        data = chat_rows((TINY_PAIRS * (rows // len(TINY_PAIRS) + 1))[:rows])
        max_length = 64
    att = Attributor(model, data, work / "session", batch_size=batch_size, progress=False, max_length=max_length)
    _ = att.train, att.data_fingerprint(), att._train_chats()  # made before the build: the session's, not its own
    settings = CacheSettings(identity_sample_rows=sample_rows)
    before = reset_peak()
    store = att.build_store(caches=settings, shard_rows=shard_rows)
    top = peak()
    assert store is not None
    cache = att.__dict__["_activation_caches"][str(att.store_dir / "activations")]
    return {
        "rows": len(att.train),
        "rss_before": before,
        "peak": top,
        "growth": top - before,
        "cache_bytes": int(store.nbytes + cache.nbytes),
    }


def allocation_seen(n_bytes: int) -> int:
    """In a fresh process: how far the peak resident set rises while ``n_bytes`` are allocated and touched (the
    instrument's own check; in a long-lived process the allocator may serve them from memory already resident)."""
    import numpy as np

    steady_allocator()
    before = reset_peak()
    held = np.ones(n_bytes, dtype=np.uint8)
    seen = peak() - before
    del held
    return seen

"""The process's own memory while the caches are built does not grow with the number of rows (issue 17): the build
of four times the rows raises the peak resident set by no more than a small fraction of the extra bytes it writes.
Each build runs in a fresh child process (``testing.memory.build_memory``); not a timing test."""

from __future__ import annotations

import pytest

from concept_influence.testing import memory
from concept_influence.testing.processes import child_context

pytestmark = pytest.mark.skipif(not memory.can_measure(), reason="needs Linux's /proc/self/clear_refs and VmHWM")


def test_the_instrument_sees_an_allocation():
    # in a fresh process, as the builds are measured (a long-lived test worker may serve 32 MiB from freed memory
    # already resident, and its peak would not move)
    with child_context().Pool(1, maxtasksperchild=1) as pool:
        assert pool.apply(memory.allocation_seen, (32 << 20,)) >= 30 << 20  # 32 MiB, touched


def test_building_the_caches_takes_memory_flat_in_the_rows(tmp_path):
    rows = (48, 192)
    with child_context().Pool(1, maxtasksperchild=1) as pool:  # a fresh process per build
        small, large = (pool.apply(memory.build_memory, (n,), {"folder": str(tmp_path / str(n))}) for n in rows)
    assert (small["rows"], large["rows"]) == rows
    extra = large["cache_bytes"] - small["cache_bytes"]  # what the extra rows put on the disk
    assert extra > 20 << 20
    # holding the extra rows' caches (or any per-row buffer) would raise the peak by about `extra`
    assert large["growth"] - small["growth"] < 0.1 * extra, (small, large)

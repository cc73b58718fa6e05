"""Child processes for the tests that run several processes at once (fault injection, load, concurrency)."""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

PRELOAD = ["torch", "transformers", "concept_influence.pipeline", "concept_influence.cli"]


def child_context() -> BaseContext:
    """A ``forkserver`` context: children fork from a clean, single-threaded server, never from the calling (maybe
    threaded: pytest-xdist's execnet) process, where a fork taken while another thread holds a lock can hang the
    child; the server imports the heavy modules (``PRELOAD``) once, so each start stays fast."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context

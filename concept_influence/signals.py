"""SIGTERM handled like Ctrl-C: long runs (fits, store builds, sampling) save a consistent state and exit, so a job
scheduler's ``kill`` loses no more than an interactive interrupt does."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (a ``KeyboardInterrupt``, so every handler that
    saves state on Ctrl-C runs)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"received signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (a ``KeyboardInterrupt``) in the main thread; the previous
    handler is restored afterwards. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

"""Shared pieces of the CLI: user-facing error handling and model loading flags."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, OSError, KeyError, TypeError)


def user_errors(func: F) -> F:
    """Turn errors caused by bad input into one ``error: ...`` line and exit code 2 (no traceback).

    Set ``CONCEPT_INFLUENCE_DEBUG=1`` to see the traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import os

        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            if os.environ.get("CONCEPT_INFLUENCE_DEBUG"):
                raise
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            typer.echo(f"error: {message}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def check_output(path: Any, flag: str = "--out") -> None:
    """Fail before any work when ``path`` cannot be written: an ancestor that is a file, or a folder without write
    permission (the error names the flag and the path)."""
    import os
    from pathlib import Path

    if path is None:
        return
    target = Path(path)
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {target}: cannot write there ({ancestor} is a file, not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {target}: cannot write there (no write permission on {ancestor})")


def load_model(model: str, device: str | None, dtype: str | None):
    from concept_influence.models import load_adapter

    return load_adapter(model, device=device, dtype=dtype)

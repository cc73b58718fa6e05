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
        except MemoryError as err:  # a count or shape read from a damaged file can ask for any amount
            if os.environ.get("CONCEPT_INFLUENCE_DEBUG"):
                raise
            typer.echo(
                f"error: out of memory{f' ({err})' if str(err) else ''}: the inputs ask for more than this "
                "machine has (check the sizes in the input files, or lower --batch-size / set --max-memory)",
                err=True,
            )
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


def check_not_inputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Refuse, before any work, an output that is one of the command's inputs: ``outputs`` and ``inputs`` map a
    flag (``"--out"``, or a description such as ``"--out (its .meta.json)"``) to a path, a list of paths or
    ``None``. Paths are compared resolved (symlinks followed) and, where both exist, by ``os.path.samefile``
    (hard links). The error is one line naming both flags and paths."""
    from pathlib import Path

    from concept_influence.files import same_path

    def paths(value: Any) -> list[Path]:
        if value is None:
            return []
        if isinstance(value, (list, tuple, set)):
            return [Path(v) for v in value if v is not None]
        return [Path(value)]

    for out_flag, out_value in outputs.items():
        for out in paths(out_value):
            for in_flag, in_value in inputs.items():
                for source in paths(in_value):
                    if same_path(out, source):
                        raise ValueError(
                            f"{out_flag} {out} is {in_flag} {source}: writing it would overwrite an "
                            "input; choose another output path"
                        )


def local_path(name: str | None) -> Any:
    """``name`` as a path when it names an existing file or folder (a model folder), else ``None`` (a hub name)."""
    from pathlib import Path

    return Path(name) if name and Path(name).exists() else None


# ---- the session's flags, shared by every command that loads a model (each written once) ---------------------------
SESSION_HELP = {
    "model": "Hugging Face hub name or local model folder (from_pretrained).",
    "device": "Where the model runs: cpu, cuda, cuda:1 ... (default: where it loads, the CPU).",
    "dtype": "Model dtype: float32 | bfloat16 | float16 | float64 (default: float32).",
    "batch_size": "Rows per batch.",
    "seed": "Seed of every random choice of the command.",
    "fsdp": "Shard the model over the torchrun processes with PyTorch FSDP2 (each block, then the root); factors "
    "are owned by ranks. Run as: torchrun --nproc_per_node N -m concept_influence.cli COMMAND ... --fsdp.",
}
"""The help of the session flags (``--model``, ``--device``, ``--dtype``, ``--batch-size``, ``--seed``, ``--fsdp``;
``--fsdp`` is ``Attributor(shard="fsdp")``, ``sharding.ShardSettings.shard``)."""


def model_flag(help: str | None = None) -> Any:  # noqa: A002
    """``--model`` (required); ``help``: a command's own wording where it means more."""
    return typer.Option(..., "--model", help=help or SESSION_HELP["model"])


def device_flag() -> Any:
    return typer.Option(None, "--device", help=SESSION_HELP["device"])


def dtype_flag(flag: str = "--dtype") -> Any:
    """The model's dtype (``flag``: ``--model-dtype`` where ``--dtype`` means something else)."""
    return typer.Option(None, flag, help=SESSION_HELP["dtype"])


def batch_size_flag(default: int = 8, help: str | None = None) -> Any:  # noqa: A002
    return typer.Option(default, "--batch-size", min=1, help=help or SESSION_HELP["batch_size"])


def seed_flag(help: str | None = None) -> Any:  # noqa: A002
    return typer.Option(0, "--seed", help=help or SESSION_HELP["seed"])


def fsdp_flag() -> Any:
    """``--fsdp``: ``Attributor(shard="fsdp")``."""
    return typer.Option(False, "--fsdp", help=SESSION_HELP["fsdp"])


def shard_of(fsdp: bool) -> str:
    """The ``shard`` setting of the ``--fsdp`` flag."""
    return "fsdp" if fsdp else "none"


def is_main_process() -> bool:
    """Rank 0 of torchrun (or the only process): the one that writes a command's single outputs and prints."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def load_model(model: str, device: str | None, dtype: str | None):
    from concept_influence.models import load_adapter

    return load_adapter(model, device=device, dtype=dtype)

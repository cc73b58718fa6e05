"""Reading fine-tuning data: chat JSONL (OpenAI ``messages``) and prompt/completion JSONL.

Every field of a row other than the conversation passes through untouched (``ChatRow.fields``), and every row keeps
its original position (``ChatRow.index``, counting data rows from 0) and line number (``ChatRow.line``, from 1).
Bad input raises ``DataFormatError`` naming the file and line; with ``skip_invalid=True`` bad lines are skipped and
each one is reported in ``ChatDataset.skipped``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concept_influence.files import write_json_atomic, write_jsonl_atomic, write_text_atomic  # noqa: F401 (re-exported)

ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """A data file that cannot be read as chat rows; the message names the file and line."""


@dataclass
class ChatRow:
    """One conversation. ``index``: position among the file's data rows (0-based, kept after skips);
    ``line``: 1-based line number in the file; ``fields``: every other key of the JSON object (passthrough)."""

    index: int
    messages: list[dict[str, str]]
    fields: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    @property
    def id(self) -> Any:
        return self.fields.get("id")

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the last assistant turn."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def answer(self) -> str:
        """The content of the last assistant turn."""
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]

    def to_record(self) -> dict[str, Any]:
        return {"messages": self.messages, **self.fields}


@dataclass
class ChatDataset(Sequence[ChatRow]):
    """Rows read from one file, in file order, plus what was skipped (``(line, reason)``)."""

    rows: list[ChatRow]
    path: str | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):  # type: ignore[override]
        if isinstance(item, slice):
            return ChatDataset(self.rows[item], self.path, [])
        return self.rows[item]

    def __iter__(self) -> Iterator[ChatRow]:
        return iter(self.rows)

    def field_values(self, name: str) -> list[Any]:
        return [row.fields.get(name) for row in self.rows]


def _normalise_messages(value: Any, where: str, *, need_assistant: bool) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataFormatError(f"{where}: messages[{k}] is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise DataFormatError(f"{where}: messages[{k}] has unknown role {role!r} (expected one of {ROLES})")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataFormatError(f"{where}: messages[{k}] ({role}) has no string 'content'")
        messages.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: no assistant turn (nothing to train on)")
    return messages


def _completion_messages(obj: dict[str, Any], where: str, *, need_assistant: bool) -> list[dict[str, str]]:
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = _normalise_messages(prompt, where + " (prompt)", need_assistant=False)
    if completion is None and not need_assistant:
        return prompt_msgs
    if isinstance(completion, str):
        completion_msgs = [{"role": "assistant", "content": completion}]
    else:
        completion_msgs = _normalise_messages(completion, where + " (completion)", need_assistant=need_assistant)
    return prompt_msgs + completion_msgs


def parse_chat_record(obj: Any, where: str, *, need_assistant: bool = True) -> tuple[list[dict[str, str]], dict]:
    """One JSON object -> ``(messages, passthrough fields)``; raises ``DataFormatError`` mentioning ``where``."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _normalise_messages(obj["messages"], where, need_assistant=need_assistant)
        fields = {k: v for k, v in obj.items() if k != "messages"}
    elif "prompt" in obj:
        messages = _completion_messages(obj, where, need_assistant=need_assistant)
        fields = {k: v for k, v in obj.items() if k not in ("prompt", "completion")}
    else:
        raise DataFormatError(f"{where}: missing 'messages' (or 'prompt'/'completion'); keys are {sorted(obj)}")
    return messages, fields


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (a number must be finite)")


def parse_json_line(text: str, where: str) -> Any:
    """One JSON document, strictly: ``NaN``/``Infinity`` (which Python's json accepts) and nesting too deep to
    parse are refused as ``DataFormatError`` naming ``where`` (file:line), like malformed JSON."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:  # from _refuse_constant
        raise DataFormatError(f"{where}: {err}") from None
    except RecursionError:
        raise DataFormatError(f"{where}: JSON nested too deeply to read") from None


MAX_LINE_BYTES = 64 * 2**20
"""The longest line ``read_chat_jsonl`` reads (64 MiB): a longer one is an error naming ``file:line`` (skipped with
``skip_invalid``), read no further than the cap. Raise it with ``max_line_bytes=`` or the environment variable
``CONCEPT_INFLUENCE_MAX_LINE_BYTES`` (which the CLI commands read)."""


def line_cap() -> int:
    """The line cap: ``CONCEPT_INFLUENCE_MAX_LINE_BYTES`` when set (a positive integer), else ``MAX_LINE_BYTES``."""
    raw = os.environ.get("CONCEPT_INFLUENCE_MAX_LINE_BYTES")
    if raw is None:
        return MAX_LINE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"CONCEPT_INFLUENCE_MAX_LINE_BYTES must be a positive number of bytes, got {raw!r}")
    return value


def capped_lines(handle: Any, limit: int) -> Iterator[tuple[bytes, bool]]:
    """``(line, whole)`` for each line of a binary file; a line longer than ``limit`` bytes comes as its first
    ``limit`` bytes with ``whole=False`` and the rest is skipped in bounded chunks (never held in memory)."""
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or (len(line) == limit + 1 and line.endswith(b"\n")):  # the newline is not counted
            yield line, True
            continue
        while not line.endswith(b"\n"):  # the rest of the long line
            line = handle.readline(1 << 20)
            if not line:
                break
        yield b"", False


def read_chat_jsonl(
    path: str | os.PathLike,
    *,
    skip_invalid: bool = False,
    need_assistant: bool = True,
    max_line_bytes: int | None = None,
) -> ChatDataset:
    """Read a chat JSONL file.

    ``need_assistant=False`` accepts prompt-only rows (query prompts to be answered by the model).
    Blank lines are ignored. With ``skip_invalid`` bad lines are skipped and listed in ``.skipped`` (and kept
    out of the row numbering: indices count valid data rows). ``max_line_bytes``: the longest line read (default
    ``MAX_LINE_BYTES``, 64 MiB, or ``CONCEPT_INFLUENCE_MAX_LINE_BYTES``); a longer line is an error naming
    ``file:line`` (or skipped with ``skip_invalid``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DataFormatError(f"{path}: is a directory, expected a JSONL file")
    limit = line_cap() if max_line_bytes is None else int(max_line_bytes)
    if limit < 1:
        raise ValueError(f"max_line_bytes must be positive, got {limit}")
    rows: list[ChatRow] = []
    skipped: list[tuple[int, str]] = []
    with path.open("rb") as handle:
        for line_no, (raw, whole) in enumerate(capped_lines(handle, limit), start=1):
            where = f"{path}:{line_no}"
            try:
                if not whole:
                    raise DataFormatError(
                        f"{where}: line longer than {limit:,} bytes (the cap on a line; raise it with "
                        "CONCEPT_INFLUENCE_MAX_LINE_BYTES=N, or max_line_bytes=N in Python)"
                    )
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFormatError(
                        f"{where}: not UTF-8 text (byte {err.start}: {err.reason}); is this a JSONL file?"
                    ) from None
                if not text.strip():
                    continue
                obj = parse_json_line(text, where)
                messages, fields = parse_chat_record(obj, where, need_assistant=need_assistant)
            except DataFormatError as err:
                if not skip_invalid:
                    raise
                skipped.append((line_no, str(err)))
                continue
            rows.append(ChatRow(index=len(rows), messages=messages, fields=fields, line=line_no))
    if not rows:
        detail = f" ({len(skipped)} invalid lines skipped)" if skipped else ""
        raise DataFormatError(f"{path}: no data rows{detail}")
    return ChatDataset(rows=rows, path=str(path), skipped=skipped)


def rows_from_records(
    records: Iterable[dict[str, Any]], *, source: str = "<records>", need_assistant: bool = True
) -> ChatDataset:
    """In-memory equivalent of ``read_chat_jsonl`` (same validation, ``source`` used in errors)."""
    rows = []
    for k, obj in enumerate(records):
        messages, fields = parse_chat_record(obj, f"{source}[{k}]", need_assistant=need_assistant)
        rows.append(ChatRow(index=k, messages=messages, fields=fields, line=k + 1))
    if not rows:
        raise DataFormatError(f"{source}: no data rows")
    return ChatDataset(rows=rows, path=None)

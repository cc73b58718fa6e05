"""Settings dataclasses: each option written once, with its type, default and help text.

A stage's settings are a frozen dataclass whose fields are made with ``option(default, help=...)`` (kronfluence's
``arguments.py``): the help text lives in the field's metadata, choices in its type (``Literal`` or a str
``Enum``). Everything else reads the options from there: a method's ``options``, ``Attributor.attribute``, the
CLI's flags and their ``--help`` (``cli.options``), and so docs/cli.md (generated from ``--help``).

```python
@dataclass(frozen=True)
class MySettings:
    window: int = option(8, help="Positions per window.", min=1)

help_text(MySettings, "window")      # 'Positions per window.'
option_defaults(MySettings)          # {'window': 8}
build_settings(MySettings, {"windw": 3}, where="f")   # TypeError: f got an unknown option 'windw' ...
```

This module depends on nothing of the package (it sits below every stage).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    help: str,
    default_factory: Callable[[], Any] | None = None,  # noqa: A002
    flag: str | None = None,
    min: float | None = None,
    cli: bool = True,  # noqa: A002
    cli_type: type | None = None,
) -> Any:
    """A settings field: ``default`` (or ``default_factory``) and ``help`` (one or two sentences, shown by the CLI's
    ``--help``). ``flag``: the CLI flag when it is not ``--<name-with-dashes>``; ``min``: the CLI's lower bound;
    ``cli=False``: no CLI flag (set by the session or a command's own flag); ``cli_type``: the flag's value type
    when the field's type is not a plain one (e.g. ``float`` for ``Damping | float``)."""
    metadata = {"help": help, "flag": flag, "min": min, "cli": cli, "cli_type": cli_type}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same_as(settings: type, name: str, **metadata: Any) -> Any:
    """A field with the default and help of ``settings``'s field ``name``: another stage's settings reuse an option
    without writing its default and help again. ``metadata``: what differs here (e.g. ``flag="--factor-dtype"``)."""
    source = settings_fields(settings)[name]
    merged = {**source.metadata, **metadata}
    if source.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=source.default_factory, metadata=merged)
    return dataclasses.field(default=source.default, metadata=merged)


def settings_fields(settings: type | Any) -> dict[str, dataclasses.Field]:
    """The settings class's fields, by name, in order (init fields only)."""
    return {f.name: f for f in dataclasses.fields(settings) if f.init}


def field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def option_defaults(settings: type, names: Iterable[str] | None = None) -> dict[str, Any]:
    """``{name: default}`` of the settings' fields (or of ``names`` only)."""
    found = settings_fields(settings)
    return {name: field_default(found[name]) for name in (found if names is None else names)}


def help_text(settings: type, name: str) -> str:
    """The help text of field ``name`` (with its choices when its type lists them and the help does not)."""
    f = settings_fields(settings)[name]
    text = str(f.metadata.get("help", ""))
    found = choices(settings, name)
    if found and not all(c in text for c in found):
        text = f"{' | '.join(found)}: {text}" if text else " | ".join(found)
    return text


def field_type(settings: type, name: str) -> Any:
    """The resolved type annotation of field ``name``."""
    hints = typing.get_type_hints(settings)
    return hints[name]


def _members(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def choices(settings: type, name: str) -> tuple[str, ...] | None:
    """The values a ``Literal`` or str ``Enum`` field accepts (``None`` for other types)."""
    found: list[str] = []
    for member in _members(field_type(settings, name)):
        if typing.get_origin(member) is Literal:
            found += [str(v) for v in typing.get_args(member)]
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            found += [str(m.value) for m in member]
    return tuple(found) or None


def value_type(settings: type, name: str) -> type:
    """The plain type a CLI flag of field ``name`` takes: ``bool``, ``int``, ``float`` or ``str`` (``Literal`` and
    ``Enum`` choices are ``str``; ``None`` is dropped from unions; mixed unions are ``str``)."""
    f = settings_fields(settings)[name]
    if f.metadata.get("cli_type") is not None:
        return f.metadata["cli_type"]
    kinds = set()
    for member in _members(field_type(settings, name)):
        if member is type(None):
            continue
        if typing.get_origin(member) is Literal:
            kinds.add(str)
        elif member in (bool, int, float, str):
            kinds.add(member)
        else:
            kinds.add(str)
    return kinds.pop() if len(kinds) == 1 else str


def rename_deprecated(options: dict[str, Any], aliases: Mapping[str, str], where: str) -> dict[str, Any]:
    """``options`` with deprecated names replaced by their current ones (a ``DeprecationWarning`` each); giving
    both names is a ``TypeError``."""
    out = dict(options)
    for old, new in aliases.items():
        if old in out:
            warnings.warn(f"{where}: {old!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=3)
            if new in out:
                raise TypeError(f"{where}: give {new!r} or its deprecated name {old!r}, not both")
            out[new] = out.pop(old)
    return out


def check_known(options: Iterable[str], known: Iterable[str], where: str) -> None:
    """A ``TypeError`` naming the options not in ``known``."""
    known = list(known)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"{where} got an unknown option {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; its options are: {', '.join(sorted(known))}"
        )


def build_settings(
    settings: type[T],
    options: Mapping[str, Any],
    *,
    where: str,
    base: T | None = None,
    aliases: Mapping[str, str] | None = None,
) -> T:
    """``settings(**options)`` (or ``dataclasses.replace(base, **options)``), with deprecated ``aliases`` renamed
    and unknown options a ``TypeError`` that names them."""
    values = rename_deprecated(dict(options), aliases or {}, where)
    check_known(values, settings_fields(settings), where)
    if base is not None:
        return dataclasses.replace(base, **values)  # type: ignore[type-var]
    return settings(**values)


def deprecated_aliases(**aliases: str) -> Callable[[type[T]], type[T]]:
    """Class decorator for a settings dataclass: the constructor also takes each old name (``old=new``) with a
    ``DeprecationWarning``, and ``obj.old`` reads ``obj.new`` (also with a warning)."""

    def decorate(cls: type[T]) -> type[T]:
        init = cls.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **rename_deprecated(kwargs, aliases, cls.__name__))

        __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
        __init__.__doc__ = init.__doc__
        cls.__init__ = __init__  # type: ignore[method-assign]
        for old, new in aliases.items():

            def getter(self: Any, _old: str = old, _new: str = new) -> Any:
                warnings.warn(f"{cls.__name__}.{_old} is deprecated, use .{_new}", DeprecationWarning, stacklevel=2)
                return getattr(self, _new)

            setattr(cls, old, property(getter, doc=f"Deprecated name of ``{new}``."))
        cls.__deprecated_aliases__ = dict(aliases)  # type: ignore[attr-defined]
        return cls

    return decorate

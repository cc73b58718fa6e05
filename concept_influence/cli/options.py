"""CLI flags generated from settings dataclasses (``concept_influence.settings``): a command lists which settings'
fields it exposes, and each flag's name, type, default, bounds and ``--help`` text come from the field.

```python
@settings_flags(OptionGroup(GradientAttributionConfig, ["row_loss", "window"], prefix="Gradient methods: "))
def attribute(model: str = typer.Option(...), *, options: dict[str, Any]) -> None:
    ...   # options: the flags given, {"row_loss": "mean"}
```

A generated flag is ``--<name-with-dashes>`` unless the field's metadata names another (``flag=``). With
``optional=True`` (a command whose defaults are another's, e.g. the method's own) every flag defaults to ``None``
and only the flags given reach the command; otherwise the flags take the fields' defaults and all reach it.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import typer

from concept_influence.settings import choices, field_default, help_text, settings_fields, value_type


@dataclass(frozen=True)
class OptionGroup:
    """Fields ``names`` of ``settings`` (default: every field with a CLI flag) as flags; ``prefix`` starts each
    help text (``"Gradient methods: "``); ``optional``: see the module; ``defaults``: flag defaults that differ
    from the fields' (e.g. a command's own); ``flags``: flag names that differ from the fields' metadata;
    ``choices``: ``Literal``/``Enum`` fields become choice flags (typer checks the value) instead of strings that
    the settings check."""

    settings: type
    names: Sequence[str] | None = None
    prefix: str = ""
    optional: bool = False
    defaults: dict[str, Any] | None = None
    flags: dict[str, str] | None = None
    choices: bool = False

    def fields(self) -> list[str]:
        found = settings_fields(self.settings)
        if self.names is not None:
            return list(self.names)
        return [name for name, f in found.items() if f.metadata.get("cli", True)]


def flag_name(group: OptionGroup, name: str) -> str:
    given = (group.flags or {}).get(name) or settings_fields(group.settings)[name].metadata.get("flag")
    return given or "--" + name.replace("_", "-")


def group_parameters(group: OptionGroup) -> list[inspect.Parameter]:
    """The ``inspect.Parameter`` (default: a ``typer.Option``) of each flag of ``group``."""
    params = []
    fields = settings_fields(group.settings)
    for name in group.fields():
        f = fields[name]
        kind = value_type(group.settings, name)
        found = choices(group.settings, name) if group.choices else None
        text = str(f.metadata.get("help", "")) if found else help_text(group.settings, name)
        if group.prefix and text[:1].isupper() and (text[1:2].islower() or text[1:2] == " "):
            text = text[0].lower() + text[1:]
        text = group.prefix + text
        if group.defaults and name in group.defaults:
            default = group.defaults[name]
        elif group.optional:
            default = False if kind is bool else None
        else:
            default = field_default(f)
        extra: dict[str, Any] = {}
        if f.metadata.get("min") is not None and kind in (int, float):
            extra["min"] = kind(f.metadata["min"])
        if found:  # a choice flag: typer checks the value and lists the choices in --help
            kind = enum.Enum(f"{group.settings.__name__}_{name}", {c: c for c in found}, type=str)  # type: ignore[assignment]
            default = None if default is None else kind(default)
        annotation: Any = kind if kind is bool or default is not None else Optional[kind]  # noqa: UP045 (typer reads it)
        option = typer.Option(default, flag_name(group, name), help=text, **extra)
        params.append(
            inspect.Parameter(
                PARAM_PREFIX + name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
            )
        )
    return params


PARAM_PREFIX = "setting_"
"""Generated parameters are named ``setting_<field>`` (a field may share its name with a command's own parameter,
e.g. the factors' ``dtype`` beside the model's ``--dtype``); their flags are the fields'."""


def _flags(param: inspect.Parameter) -> set[str]:
    decls = getattr(param.default, "param_decls", None) or ()
    return {d for d in decls if d.startswith("-")}


def settings_flags(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a typer command taking ``options`` (keyword): adds the groups' flags to its signature and
    passes their values in ``options`` (``{field: value}``; in optional groups only the flags given)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "options"]
        generated = [(g, group_parameters(g)) for g in groups]
        flags = [flag for _, ps in generated for p in ps for flag in _flags(p)]
        clash = sorted(set(flags) & {f for p in own for f in _flags(p)}) or sorted(
            {f for f in flags if flags.count(f) > 1}
        )
        if clash:
            raise ValueError(f"{fn.__name__}: flags {clash} are defined twice")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            options: dict[str, Any] = {}
            for group, params in generated:
                for p in params:
                    value = kwargs.pop(p.name)
                    if isinstance(value, enum.Enum):
                        value = value.value
                    if not group.optional or (value is not None and value is not False):
                        options[p.name.removeprefix(PARAM_PREFIX)] = value
            return fn(**kwargs, options=options)

        params = own + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for _, ps in generated for p in ps]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {}
        del command.__wrapped__  # typer must read the generated signature, not fn's
        return command

    return decorate

"""The ``concept-influence`` command: thin typer commands over the same functions the notebooks call.

Commands: ``organism``, ``train-probe``, ``probe-layers``, ``attribute``, ``fit-factors``, ``build-store``, ``search``,
``demo`` (and more as they land). Errors from bad input are printed as one line naming the file/argument, with exit
code 2.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="concept-influence",
    help="Trace a language model's behaviour back to the fine-tuning rows that caused it, through concepts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click output: a bad flag is one "Error: Invalid value for '--flag': ..." line
)

for _module in (
    "attribute",
    "organism",
    "concepts",
    "influence",
    "store",
    "demo",
    "plan",
    "filter",
    "evaluate",
    "report",
):
    importlib.import_module(f"concept_influence.cli.{_module}").register(app)


def main() -> None:
    """The ``concept-influence`` entry point (SIGTERM is handled like Ctrl-C: state is saved, exit code 130)."""
    from concept_influence.signals import sigterm_as_interrupt

    with sigterm_as_interrupt():
        app()

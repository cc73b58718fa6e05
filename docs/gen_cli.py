"""Write docs/cli.md from `concept-influence <command> --help` (whose method and stage flags are generated from the
settings classes, where each option is defined once: `concept_influence.settings`).

Run after changing a command's options (no tests, no model needed):

    make docs-cli                               # or: python docs/gen_cli.py [--exe /path/to/concept-influence]

The page is committed; `make docs` does not regenerate it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "cli.md"

HEADER = """# Command line

Every command with its `--help` text. Other pages link here instead of repeating flag tables. The commands are thin
wrappers over `Attributor` (see [Getting started](getting-started.md)); their method and stage flags are generated
from the settings classes (`GradientAttributionConfig`, `FactorConfig`, `ProbeConfig`, `FilterRule`,
`EvaluationConfig`, ...), where each option is written once with its type, default and help
(`concept_influence.settings`).

The page is generated: `make docs-cli` (or `python docs/gen_cli.py` with the project's environment active) runs
`concept-influence <command> --help` for every command and rewrites it.

"""


def _exe(given: str | None) -> list[str]:
    if given:
        return [given]
    here = Path(sys.executable).with_name("concept-influence")
    if here.exists():
        return [str(here)]
    found = shutil.which("concept-influence")
    return [found] if found else [sys.executable, "-m", "concept_influence.cli"]


def _help(exe: list[str], *args: str) -> str:
    env = dict(os.environ, COLUMNS="100", TERM="dumb", NO_COLOR="1")
    out = subprocess.run([*exe, *args, "--help"], capture_output=True, text=True, env=env, check=True).stdout
    return "\n".join(line.rstrip() for line in out.strip().splitlines())


def _commands(top: str) -> list[str]:
    names, inside = [], False
    for line in top.splitlines():
        if line.strip() == "Commands:":
            inside = True
            continue
        if inside:
            m = re.match(r"^  (\S+)", line)
            if m:
                names.append(m.group(1))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exe", help="the concept-influence executable (default: next to this Python)")
    exe = _exe(parser.parse_args().exe)
    top = _help(exe)
    parts = [HEADER, "```text\n$ concept-influence --help\n" + top + "\n```\n"]
    for name in _commands(top):
        parts.append(f"\n## `{name}`\n\n```text\n$ concept-influence {name} --help\n{_help(exe, name)}\n```\n")
    PAGE.write_text("".join(parts))
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
